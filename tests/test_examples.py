"""examples/lora.py on a small model: LoRA adapters over 4-bit layers learn, the 4-bit weights do
not move, and the per-sample gradients of torch.func equal autograd's, sample by sample; the
README's Python code runs and prints what its comments say."""
import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_ops

ROOT = Path(__file__).resolve().parents[1]
# tests/ copied on its own to run against an installed torch_ops: the examples and the README are
# the source tree's (their absence was a FileNotFoundError at collection that stopped the run)
if not (ROOT / "examples" / "lora.py").is_file():
    pytest.skip("examples/ and README.md are not beside tests/ (not run from a source tree)",
                allow_module_level=True)

spec = importlib.util.spec_from_file_location("lora_example", ROOT / "examples" / "lora.py")
lora = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lora)


def test_lora_example_learns_and_keeps_the_base(device):
    before, after, unchanged, model = lora.train(hidden=128, ffn=256, steps=100, batch=32,
                                                 device=device, log=lambda line: None)
    assert unchanged
    assert after < before / 3, (before, after)  # 5.3x lower on the CPU
    x, y = torch.randn(3, 128, device=device), torch.randn(3, 128, device=device)
    norms = lora.per_sample_grad_norms(model, x, y)
    params = [p for name, p in model.named_parameters() if name.endswith((".a", ".b"))]
    for i in range(3):
        loss = torch.nn.functional.mse_loss(model(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, params)
        expected = torch.sqrt(sum(g.square().sum() for g in grads))
        torch.testing.assert_close(norms[i], expected, rtol=1e-4, atol=1e-6)


def test_readme_python_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks
    for block in blocks:
        ns = {}
        exec(compile(block, "README.md", "exec"), ns)
        # what its comments say the fused linear equals ("x @ w.T" said so of an fp32 x and an
        # fp16 w, which raises a dtype error): evaluated in the block's namespace
        for name, expr in re.findall(r"^(\w+) = torch_ops\.w4a16_linear\(.*?\)\s+# (?:==|≈) "
                                     r"(.+?)\s*$", block, re.M):
            got, want = ns[name], eval(expr, ns)
            assert got.dtype == want.dtype, (expr, got.dtype, want.dtype)
            assert (got - want).abs().max() <= 1e-3 * want.abs().max(), expr
    # the values its comments give (pack of 0..7, sequential and AWQ order; the 2-bit byte)
    shown = re.findall(r"^(torch_ops\.pack\(.*?\))\s+# (tensor\(.*?\))(?:\s|$)", readme, re.M)
    assert len(shown) >= 3
    namespace = {}
    exec("import torch, torch_ops\nv = torch.arange(8, dtype=torch.uint8)[None]", namespace)
    for call, printed in shown:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print(eval(call, namespace))
        assert out.getvalue().strip() == printed, call


def test_demo_commands_run_the_torch_ops_it_imports(tmp_path):
    """examples/demo.py runs `python -m torch_ops convert` and `inspect` in child processes, and
    `python -m` puts the working directory first on sys.path: `python examples/demo.py` in a
    source tree after a non-editable `pip install .` failed halfway, the children importing the
    tree's unbuilt torch_ops (no _C) instead of the installed one. Here the working directory
    holds a torch_ops that fails to import; the demo's own process finds the real one."""
    decoy = tmp_path / "torch_ops"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('not this torch_ops')\n")
    root = str(Path(torch_ops.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    demo = ROOT / "examples" / "demo.py"
    r = subprocess.run([sys.executable, str(demo), "--hidden", "128", "--ffn", "256", "--layers",
                        "1", "--no-compile"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "converted 3 quantized layers" in r.stdout, r.stdout
