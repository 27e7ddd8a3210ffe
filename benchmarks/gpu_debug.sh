#!/usr/bin/env bash
# Build on the GPU machine, then run a one-line repro; on a crash print the native backtrace.
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
[ -x /usr/bin/g++ ] && export CC=/usr/bin/gcc CXX=/usr/bin/g++  # see gpu_check.sh
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
code=${1:-"import torch, torch_ops; print(torch_ops.pack(torch.arange(8, dtype=torch.uint8)[None], 4))"}
if ! python3 -c "$code"; then
    cuda-gdb -batch -ex run -ex bt --args python3 -c "$code" 2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -40
fi
