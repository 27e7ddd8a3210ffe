"""The source distribution builds on its own: it holds every file of csrc/ that setup.py compiles
or includes (it held only csrc/bindings/ops.cpp, and `pip install torch_ops-*.tar.gz` or
`python -m build` failed at the compile with the C core missing); setup.py run where torch cannot
be imported (pip's isolated build) says what to do, and so does an import of a torch_ops whose _C
is missing or does not load."""
import os
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
    # the tests run from it (conftest.py's fixtures, the examples test_examples loads)
    runs = {p.relative_to(ROOT).as_posix() for d in ("tests", "examples")
            for p in (ROOT / d).glob("*.py")}
    assert "tests/conftest.py" in runs and runs <= held, sorted(runs - held)
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


def test_metadata_requires_the_torch_it_was_built_with(tmp_path):
    """_C loads only with the torch release it was compiled against: the metadata said
    torch>=2.4, and a wheel built on 2.13.0, installed into a fresh venv, got torch 2.14.1 from pip
    and failed to import (undefined symbol)."""
    import torch

    if not (ROOT / "setup.py").is_file():
        pytest.skip("not run from a source tree")
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True)
    requires = (tmp_path / "torch_ops.egg-info" / "requires.txt").read_text().split()
    torch_req = [r for r in requires if r.startswith("torch")]
    assert torch_req == [f"torch=={torch.__version__.split('+')[0]}"], requires


def _unbuilt_copy(tmp_path, extension: bytes | None = None) -> Path:
    """The Python files of torch_ops, without its compiled _C, as a package of another name: an
    editable install's import finder maps ``torch_ops._C`` to its own tree's _C, which a copy
    named torch_ops would pick up (and load) wherever one is installed."""
    import torch_ops

    pkg = tmp_path / "unbuilt_torch_ops"
    pkg.mkdir()
    for f in Path(torch_ops.__file__).parent.glob("*.py"):
        (pkg / f.name).write_bytes(f.read_bytes())
    if extension is not None:
        import importlib.machinery
        (pkg / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(extension)
    return tmp_path


def _import_error(path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(path)}
    r = subprocess.run([sys.executable, "-c", "import unbuilt_torch_ops"], cwd=path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, r.stdout
    return r.stderr.strip().splitlines()[-1]


def test_import_of_a_tree_never_built_says_to_build(tmp_path):
    """`import torch_ops` with PYTHONPATH at a clone never built (or from its folder) said
    "cannot import name '_C' from partially initialized module 'torch_ops' (most likely due to a
    circular import)": no word of the missing extension or of how to build it."""
    last = _import_error(_unbuilt_copy(tmp_path))
    assert last.startswith("ImportError: torch_ops: the compiled extension torch_ops._C is "
                           "missing"), last
    assert "pip install --no-build-isolation -e ." in last and "build_ext --inplace" in last, last
    assert "circular import" not in last, last


def test_import_of_an_extension_that_fails_to_load_says_to_rebuild(tmp_path):
    """A _C that is there but does not load (built against another torch: an undefined symbol;
    here a file that is no shared object) is named, with the loader's reason and what to do."""
    last = _import_error(_unbuilt_copy(tmp_path, extension=b"not a shared object"))
    assert "torch_ops._C in" in last and "failed to load" in last, last
    assert "rebuild it against the torch installed here" in last, last


def _setup_version(setting: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_OPS_CUDA"}
    if setting is not None:
        env["TORCH_OPS_CUDA"] = setting
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_setup_says_whether_it_builds_the_cuda_kernels():
    """A CPU-only build said nothing (found at the first CUDA call); TORCH_OPS_CUDA=1 on a CPU
    torch quietly built one, and any value but "0" (off, false) meant CUDA."""
    import torch

    if not (ROOT / "setup.py").is_file():
        pytest.skip("not run from a source tree")
    for off in ("0", "off", "False"):
        r = _setup_version(off)
        assert r.returncode == 0, r.stderr
        assert f"building without the CUDA kernels: TORCH_OPS_CUDA={off}" in r.stderr, r.stderr
    r = _setup_version("maybe")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "TORCH_OPS_CUDA='maybe' is not one of 0, 1 or auto" in r.stderr, r.stderr
    if torch.version.cuda is None:
        for auto in (None, "auto"):
            r = _setup_version(auto)
            assert r.returncode == 0, r.stderr
            assert f"building without the CUDA kernels: this torch ({torch.__version__}) is a " \
                   "CPU build" in r.stderr, r.stderr
        r = _setup_version("1")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "TORCH_OPS_CUDA=1 asks for the CUDA kernels, which cannot be built here: this " \
               "torch" in r.stderr, r.stderr


def test_import_warns_of_another_trees_extension(tmp_path):
    """An editable install of another checkout maps torch_ops._C to that checkout's build for
    any torch_ops imported: PYTHONPATH at an unbuilt clone ran the clone's Python over the other
    tree's kernels without a word. Here a finder of the same kind maps it to this tree's _C."""
    import torch_ops

    real = Path(torch_ops._C.__file__).resolve()
    pkg = tmp_path / "torch_ops"
    pkg.mkdir()
    for f in Path(torch_ops.__file__).parent.glob("*.py"):
        (pkg / f.name).write_bytes(f.read_bytes())
    mapped = ("import importlib.util, sys\n"
              "class Finder:\n"
              "    @classmethod\n"
              "    def find_spec(cls, name, path=None, target=None):\n"
              "        if name == 'torch_ops._C':\n"
              f"            return importlib.util.spec_from_file_location(name, {str(real)!r})\n"
              "sys.meta_path.insert(0, Finder)\n"
              "import torch_ops\n"
              f"assert torch_ops.__file__.startswith({str(tmp_path)!r}), torch_ops.__file__\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", mapped], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"torch_ops._C was loaded from {real.parent}, not from this package's folder " \
           f"{pkg.resolve()}" in r.stderr, r.stderr
    # the package with its own _C imports without it
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", "import torch_ops"],
                       cwd=tmp_path.parent, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "RuntimeWarning" not in r.stderr, r.stderr
