"""Build torch_ops._C: the C core (compiled as C11), the C++ op registry and, when torch was built
with CUDA and nvcc is found, the CUDA kernels.

    pip install --no-build-isolation -e .       # uses the torch already installed

Environment: TORCH_OPS_CUDA=0 forces a CPU-only build, 1 fails where the CUDA kernels cannot be
built (default auto: built where they can be); TORCH_CUDA_ARCH_LIST picks the CUDA targets
(default "8.0;9.0a": sm_90a enables the Hopper wgmma path); MAX_JOBS bounds parallel compilation.
"""
import glob
import os
import sys

try:
    import torch
except ImportError:
    # pip's default isolated build environment holds setuptools only, not the torch installed
    # beside it: `pip install .` ended in a bare "No module named 'torch'" with torch installed
    sys.exit("torch_ops builds against the torch it will run with, and this build's Python cannot "
             "import torch: install torch first, then build without pip's isolated environment "
             "(which hides the installed torch): pip install --no-build-isolation .")
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
C_SOURCES = sorted(glob.glob(os.path.join("csrc", "core", "*.c")))
CPP_SOURCES = ["csrc/bindings/ops.cpp"]
CUDA_SOURCES = ["csrc/bindings/ops_cuda.cpp"] + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
# -fno-wrapv undoes the -fwrapv that Python's own CFLAGS (sysconfig) put before these: defined
# signed overflow keeps GCC from folding the kernels' int64 index arithmetic, and the M = 1 GEMV
# ran 8% slower with it (AVX2, Zen 3: 147 against 136 us at 2048 x 2048 on one thread). The core
# has no signed overflow to define (its tests run under UBSan).
C_FLAGS = ["-std=c11", "-O3", "-fno-wrapv", "-fPIC", "-Wall", "-Wextra", "-fvisibility=hidden"]


CUDA_SETTINGS = {"0": False, "false": False, "no": False, "off": False,
                 "1": True, "true": True, "yes": True, "on": True, "auto": None, "": None}


def want_cuda() -> bool:
    """TORCH_OPS_CUDA: unset or auto builds the CUDA kernels where they can be built; 1 requires
    them; 0 leaves them out. Either way the build says which it made and why: a CPU-only build
    was silent (found only at the first CUDA call), TORCH_OPS_CUDA=1 on a CPU torch quietly gave
    one, and any value but "0" (false, off, no) meant CUDA."""
    value = os.environ.get("TORCH_OPS_CUDA", "auto")
    if value.strip().lower() not in CUDA_SETTINGS:
        sys.exit(f"torch_ops: TORCH_OPS_CUDA={value!r} is not one of 0, 1 or auto "
                 "(also false / true, no / yes, off / on)")
    want = CUDA_SETTINGS[value.strip().lower()]
    if want is False:
        why = f"TORCH_OPS_CUDA={value}"
    elif torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is a CPU build"
    elif CUDA_HOME is None:
        why = "no CUDA toolkit was found (set CUDA_HOME, or put nvcc on PATH)"
    elif not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        why = f"{os.path.join(CUDA_HOME, 'bin', 'nvcc')} is missing"
    else:
        print(f"torch_ops: building the CUDA kernels (nvcc of {CUDA_HOME})", file=sys.stderr)
        return True
    if want:
        sys.exit(f"torch_ops: TORCH_OPS_CUDA={value} asks for the CUDA kernels, which cannot be "
                 f"built here: {why}")
    print(f"torch_ops: building without the CUDA kernels: {why}", file=sys.stderr)
    return False


class Build(BuildExtension):
    """Compiles csrc/core/*.c with the C compiler and C flags (BuildExtension would push them
    through the C++ flags), then links the objects into the extension."""

    def build_extensions(self):
        for ext in self.extensions:
            objects = self.compiler.compile(
                C_SOURCES, output_dir=self.build_temp, include_dirs=["csrc/core"],
                extra_postargs=C_FLAGS)
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extensions()


# at::parallel_for is an OpenMP loop compiled into the caller: without -fopenmp the CPU kernels
# would run on one thread whatever torch.set_num_threads says.
OPENMP = ["-fopenmp"]


def extension():
    # no -std: torch picks the standard its headers were built with (C++17 in 2.11, C++20 in 2.13)
    cxx = ["-O3", "-Wall", "-Wno-unused-function"] + OPENMP
    include = [os.path.join(ROOT, "csrc")]
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")  # 9.0a: the wgmma path
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "torch_ops._C", CPP_SOURCES + CUDA_SOURCES, include_dirs=include,
            define_macros=[("TOPS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx + ["-DTOPS_WITH_CUDA=1"], "nvcc": nvcc},
            extra_link_args=OPENMP)
    return CppExtension("torch_ops._C", CPP_SOURCES, include_dirs=include,
                        extra_compile_args={"cxx": cxx}, extra_link_args=OPENMP)


setup(
    name="torch_ops",
    version="0.1.0",
    description="Bit packing, AWQ/GPTQ repacking and a fused w4a16 linear as PyTorch ops (C/CUDA)",
    packages=["torch_ops"],
    ext_modules=[extension()],
    cmdclass={"build_ext": Build},
    python_requires=">=3.10",
    # _C links against this torch's C++ symbols, which change between releases: a wheel built on
    # 2.13.0 that said torch>=2.4 got torch 2.14.1 from pip in a fresh venv and failed to load
    # (undefined symbol). The build's own torch release (its local label, +cpu / +cu130, dropped).
    install_requires=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "tqdm"],
)
