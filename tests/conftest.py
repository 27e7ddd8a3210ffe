"""Shared test fixtures: every device-parametrized test runs on the CPU, and on CUDA when present."""
import atexit
import os
import shutil
import subprocess
import sys
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


# (run by the fresh process of aoti_package_check)
_AOTI_CHECK = """
import sys, torch, torch_ops
io = torch.load(sys.argv[2])
run = torch._inductor.aoti_load_package(sys.argv[1])
for x, want in zip(io["inputs"], io["outputs"]):
    got = run(x)
    got, want = ((o if isinstance(o, (tuple, list)) else [o]) for o in (got, want))
    assert len(got) == len(want), (len(got), len(want))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), (a.dtype, b.dtype, (a - b).abs().max())
print("ok", len(io["inputs"]))
"""


@pytest.fixture
def aoti_package_check(tmp_path):
    """check(package, inputs, outputs): an AOTInductor package, loaded in a fresh process that
    imports torch_ops (as a deployment would: no model code), maps each input to its output, bit
    for bit (the same kernels run)"""
    def check(package, inputs, outputs):
        io = tmp_path / "aoti_io.pt"
        torch.save({"inputs": inputs, "outputs": outputs}, io)
        r = subprocess.run([sys.executable, "-c", _AOTI_CHECK, package, str(io)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and r.stdout.split() == ["ok", str(len(inputs))], r.stderr[-3000:]
    return check
