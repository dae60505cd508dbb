import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/utils.py


def pytest_collection_modifyitems(config, items):
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    has_cuda = torch.cuda.is_available()
    skip_interp = pytest.mark.skip(reason="Triton interpreter tests need TRITON_INTERPRET=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "interpreter" in item.keywords and not interp:
            item.add_marker(skip_interp)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
