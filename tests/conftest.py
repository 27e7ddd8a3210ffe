"""Shared test fixtures: every device-parametrized test runs on the CPU, and on CUDA when present."""
import atexit
import os
import shutil
import tempfile

import pytest
import torch

# A compile cache of this process's own, removed at exit: Inductor keys its cached graphs on the
# traced graph, not on the extension's code, so graphs that inline the op's backward or its
# torch.func composite, cached by an earlier build, would be reused and test that build instead.
# A caller's TORCHINDUCTOR_CACHE_DIR wins.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="torch_ops_tests_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
