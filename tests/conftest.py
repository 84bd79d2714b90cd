import gin
import pytest
import torch


@pytest.fixture(autouse=True)
def _clean_gin():
    """Every test starts and ends with an empty gin config (gin state is global)."""
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def one_thread():
    """One intra-op thread (``pytestmark = pytest.mark.usefixtures("one_thread")``): on 2 cores shared
    with other jobs, two spinning OpenMP threads per process run many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
