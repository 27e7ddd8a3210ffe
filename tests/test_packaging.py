"""The source distribution builds on its own: it holds every file of csrc/ that setup.py compiles
or includes (it held only csrc/bindings/ops.cpp, and `pip install torch_ops-*.tar.gz` or
`python -m build` failed at the compile with the C core missing); setup.py run where torch cannot
be imported (pip's isolated build) says what to do."""
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (".c", ".h", ".cpp", ".cu", ".cuh")


def test_sdist_holds_every_source(tmp_path):
    if not (ROOT / "setup.py").is_file():
        pytest.skip("not run from a source tree")
    # egg_info into tmp_path: the tree's own egg-info (an editable install's) is left alone
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                    "sdist", "-d", str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    (archive,) = tmp_path.glob("torch_ops-*.tar.gz")
    with tarfile.open(archive) as tar:
        held = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
              if p.suffix in SOURCES}
    assert wanted and wanted <= held, sorted(wanted - held)
    assert {"setup.py", "README.md", "torch_ops/__init__.py"} <= held



def test_setup_without_torch_says_to_build_without_isolation():
    """`pip install .` runs setup.py in pip's isolated build environment (setuptools, no torch):
    it ended in a bare "ModuleNotFoundError: No module named 'torch'" with torch installed."""
    if not (ROOT / "setup.py").is_file():
        pytest.skip("not run from a source tree")
    no_torch = ("import runpy, sys; sys.modules['torch'] = None; "  # (import torch: ImportError)
                "sys.argv = ['setup.py', '--version']; "
                "runpy.run_path('setup.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", no_torch], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert "install torch first" in r.stderr and "pip install --no-build-isolation ." in r.stderr, \
        r.stderr
