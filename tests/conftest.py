import os

import pytest

# Tests share 2 cores; torch's own thread pool only adds contention.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu; run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
