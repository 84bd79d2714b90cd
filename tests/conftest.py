import gin
import pytest


@pytest.fixture(autouse=True)
def _clean_gin():
    """Every test starts and ends with an empty gin config (gin state is global)."""
    gin.clear_config()
    yield
    gin.clear_config()
