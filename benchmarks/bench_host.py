"""Host time of one call: what an eager decode step (no CUDA graph, no torch.compile) pays per
linear layer before any kernel runs, side by side with nn.Linear in one run.

    python benchmarks/bench_host.py                  # CPU, and CUDA when present
    python benchmarks/bench_host.py --device cpu

Median over rounds of the mean us per call of a loop of calls, interleaved. On the CPU the layer
is tiny (64 x 64, one row: the work is a few hundred multiply-adds), so the time is the call's
overhead; on CUDA a 4096 x 4096 layer, one row, where the kernel (~5 us) is shorter than the
host's part, so the loop runs at the host's pace (no synchronisation inside it). Rows: nn.Linear
(16-bit weight), torch.ops.torch_ops.w4a16_linear (the registered op, no Python), the Python
function torch_ops.w4a16_linear, and the QuantLinear module; each under torch.no_grad() and
with autograd on (no input requiring grad).
"""
import argparse
import statistics
import time

import torch
from torch import nn

import torch_ops


def per_call_us(fn, device, calls, rounds):
    for _ in range(calls // 4 + 10):
        fn()
    times = []
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def bench(device, calls, rounds):
    K = N = 4096 if device == "cuda" else 64
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    torch.manual_seed(0)
    linear = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    layer = torch_ops.QuantLinear.from_linear(linear, group_size=64 if K == 64 else 128)
    x = torch.randn(1, K, device=device, dtype=dtype)
    op = torch.ops.torch_ops.w4a16_linear.default
    b = dict(layer.named_buffers())
    args = (x, b["qweight"], b["scales"], b["qzeros"], layer.group_size, None, None, "v1", None)
    cases = {
        "nn.Linear (16-bit)": lambda: linear(x),
        "torch.ops.torch_ops.w4a16_linear": lambda: op(*args),
        "torch_ops.w4a16_linear": lambda: torch_ops.w4a16_linear(*args),
        "QuantLinear": lambda: layer(x),
    }
    print(f"\n{device}: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch "
          f"{torch.__version__}, {K} x {N}, one row, {dtype}, us per call (host)")
    print("| call | no_grad | autograd on |")
    print("|---|---|---|")
    res = {name: ([], []) for name in cases}
    for _ in range(3):  # (interleaved, so that a slow stretch of the machine hits every row)
        for name, fn in cases.items():
            with torch.no_grad():
                res[name][0].append(per_call_us(fn, device, calls, rounds))
            res[name][1].append(per_call_us(fn, device, calls, rounds))
    for name, (ng, ag) in res.items():
        print(f"| {name} | {statistics.median(ng):.1f} | {statistics.median(ag):.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: both where present)")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    torch.set_num_threads(1)
    devices = [a.device] if a.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        bench(device, a.calls, a.rounds)


if __name__ == "__main__":
    main()
