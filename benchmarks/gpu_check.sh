#!/usr/bin/env bash
# One call on the GPU machine: build for sm_90, run the whole test suite, then the benchmarks.
# Logs go to $OUT (or ./gpu_logs). Usage: bash benchmarks/gpu_check.sh [build|tests|bench|all] [pytest args]
# The whole suite outgrew one 600 s call on the H100 (fortieth session: ~880 tests, about 500 s
# with -n 12): run the CUDA tests in one call (pytest args: -n 12 -k "cuda or gpu or graph" tests,
# 242 s) and the rest, if needed, in another (-n 12 -k "not (cuda or gpu or graph)" tests)
# (BENCH_ARGS: extra arguments for bench_linear.py)
set -o pipefail
what=${1:-all}; shift || true
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
# the image's CC/CXX (/opt/gcc) wrap g++ with a static libstdc++, whose iostreams nobody
# initialises inside an extension: every error message torch formats would crash. Use the plain one.
[ -x /usr/bin/g++ ] && export CC=/usr/bin/gcc CXX=/usr/bin/g++
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/env.txt"
# (the device tool copies the working tree; its .git may be an older snapshot: a count of
# changed files says the HEAD printed is not what ran)
echo "git HEAD $(git rev-parse --short HEAD 2>/dev/null), $(git status --porcelain 2>/dev/null | wc -l) files differ from it" | tee -a "$OUT/env.txt"
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
[ "$what" = build ] && exit 0
if [ "$what" != bench ]; then
    timeout 420 python3 -m pytest -q -p no:cacheprovider "${@:-tests}" 2>&1 | tee "$OUT/tests.log" | tail -25
fi
if [ "$what" != tests ]; then
    timeout 120 python3 benchmarks/bench_repack.py 2>&1 | tee "$OUT/bench_repack.md"
    timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_linear.py $BENCH_ARGS 2>&1 | tee "$OUT/bench_linear.md"
fi
