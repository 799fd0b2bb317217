"""Test order for pytest-xdist (`-n 2 --dist loadfile --no-loadscope-reorder`, scripts/test.sh).

xdist hands out whole files in collection order: the first file goes to worker 1, the next to
worker 2, then each worker gets more as it runs low. The end-to-end DVC test is one test of ~10
minutes, so it must start first and alone on its worker while the other worker takes the rest
(test_dist.py, the next longest file, first); a tiny file is queued behind the end-to-end test.
Without this, xdist's default order (files with the most tests first) starts the end-to-end test
last and the suite takes its full length on top of everything else.
"""

from __future__ import annotations

from pathlib import Path

import pytest

FIRST = ["test_pipeline_dvc.py", "test_dist.py", "test_runtime.py"]


def pytest_collection_modifyitems(session, config, items) -> None:
    def rank(item) -> int:
        name = item.path.name
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: the order within and among the other files is kept


@pytest.fixture(scope="session")
def random_mobilenet_v2(tmp_path_factory) -> Path:
    """A random-init MobileNetV2 state dict (seed 0), for the stage tests that need no ImageNet weights.

    Seeded inside `fork_rng`, so the init is the same whatever ran before in this worker (an
    unseeded init took the worker's global RNG state, and a loss-curve comparison once drifted out
    of its tolerance with it) and the worker's own RNG state is left as it was. Copy it into place:
    `shutil.copy(random_mobilenet_v2, dst)`."""
    import torch
    import torchvision

    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_random.pt"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models, and no OpenMP spinning on a shared 2-core machine.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
