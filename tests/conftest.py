import os

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


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> str:
    """Shared by the bad-input suites (tests/test_bad_input*.py), which prove they change nothing in it:
    a working directory holding a tiny trained run and every bad file the table names."""
    from bad_input_world import make_files

    from advews.cli.train import main as train_main

    root = str(tmp_path_factory.mktemp("bad_input"))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        params = ["data.dataset = 'mnist5k'", "model.arch = 'small_preact_resnet'", "optimizer.name = 'adam'",
                  "schedule.name = 'constant'", "train.defense = 'AT'", "train.epochs = 1", "train.batch_size = 64",
                  "AT.eps = 0.3", "AT.step_size = 0.3", "AT.steps = 1", "train.val_steps = 1",
                  "data.train_limit = 128", "data.val_size = 64"]
        argv = ["--quiet", "--output", "run"]
        for p in params:
            argv += ["--gin-param", p]
        assert train_main(argv) == 0
        make_files(root)
    finally:
        os.chdir(cwd)
    return root
