#!/usr/bin/env python3
"""Random cases of w4a16_linear against the float64 reference, for as long as asked (pytest does
not collect this file; the suite's parametrised cases are in test_linear.py).

    python3 tests/fuzz_linear.py [--seconds 300] [--seed 1] [--device cpu|cuda] [--large]

Each case draws K, N (odd multiples of 8 included), M = 0..100 in 1-3-D batches, fp32 / fp16 /
bf16 x with scales of any of the three dtypes (fp32 x only; others match x), group sizes
32..256 and -1, v1 / v2 / symmetric zeros, act-order through g_idx, act_order_prepack + perm
(its sorted qweight k-interleaved or not) or a row-parallel shard (rows of qweight and g_idx,
whole scales and qzeros), the k-interleaved qweight, bias, non-contiguous, transposed or
broadcast (stride 0) x, and on CPU the ISA level and one or two threads. --large: N up to 4800
and K up to 12288 (or K = 4096) now and then. Prints each failing case and exits 1 if any failed.
"""
import argparse
import math
import os
import random
import sys
import time

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
import torch_ops  # noqa: E402
from torch_ops import _C  # noqa: E402
from test_linear import TOL, make_weights, reference, rel_err  # noqa: E402


def one_case(rnd, device, large, desc):
    """one random case; desc: filled with its parameters (printed if it fails)"""
    gs = rnd.choice([32, 64, 96, 128, 256, -1])
    K = gs * rnd.randint(1, 6) if gs > 0 else 8 * rnd.randint(1, 80)
    N = 8 * rnd.randint(1, 80)
    if large and rnd.random() < 0.2:
        N = 8 * rnd.randint(80, 600)
    if large and rnd.random() < 0.1:
        K *= 8
    if large and rnd.random() < 0.05:  # (M = 1 with a perm: each GEMM block gathers its own x there)
        K = 4096 if gs == -1 or 4096 % gs == 0 else gs * (4096 // gs)  # (group 96: 4032)
    M = rnd.choice([0, 1, 2, 3, 5, 8, 9, 13, 16, 17, 24, 25, 31, 33, 64, 65, 100])
    dtype = rnd.choice([torch.float32, torch.float16, torch.bfloat16])
    sdt = rnd.choice([torch.float16, torch.bfloat16, torch.float32]) if dtype == torch.float32 else dtype
    zeros = rnd.choice(["v1", "v2", "sym"])
    act = rnd.random() < 0.3
    t = make_weights(K, N, gs, zeros, act, device=device, scales_dtype=sdt)
    lead = rnd.choice([(M,), (1, M), (2, max(1, M // 2))]) if M else (0,)
    r = rnd.random()
    if r < 0.3:  # a column slice of a wider tensor
        off = rnd.choice([0, 3])
        x = torch.randn(*lead, K + 8, dtype=dtype, device=device)[..., off:off + K]
    elif r < 0.4 and len(lead) == 1:
        x = torch.randn(K, lead[0], dtype=dtype, device=device).t()
    elif r < 0.45:  # one row broadcast over the batch (stride 0)
        x = torch.randn(*lead[:-1], 1, K, dtype=dtype, device=device).expand(*lead, K)
    else:
        x = torch.randn(*lead, K, dtype=dtype, device=device)
    bias = torch.randn(N, dtype=dtype, device=device) if rnd.random() < 0.4 else None
    desc.update(K=K, N=N, M=lead, gs=gs, x=dtype, scales=sdt, zeros=zeros, act=act, x_stride=x.stride(),
                bias=bias is not None)
    if device == "cpu":
        desc["isa"] = rnd.choice(range(_C.cpu_isa_detected() + 1))
        desc["threads"] = rnd.choice([1, 2])
        _C.cpu_isa_set(desc["isa"])
        torch.set_num_threads(desc["threads"])
    kw = dict(qzeros=t["qzeros"], group_size=gs, bias=bias, zero_format=t["zero_format"])
    mode = rnd.choice(["plain", "prepack", "perm"])
    if mode == "perm" and act:
        sorted_ = torch_ops.act_order_prepack(t["qweight"], t["g_idx"], gs)
        if sorted_ is None:
            mode = "g_idx (not sortable)"
            out = torch_ops.w4a16_linear(x, t["qweight"], t["scales"], g_idx=t["g_idx"], **kw)
        else:
            qw = sorted_[0]
            if K % 32 == 0 and rnd.random() < 0.5:  # (as QuantLinear holds an act-order layer)
                mode, qw = "perm, k-interleaved", torch_ops.prepack_w4a16(qw)
            out = torch_ops.w4a16_linear(x, qw, t["scales"], perm=sorted_[1], **kw)
    elif mode == "prepack" and not act and K % 32 == 0:
        out = torch_ops.w4a16_linear(x, torch_ops.prepack_w4a16(t["qweight"]), t["scales"], **kw)
    elif mode == "prepack" and act and K >= 16:
        # a row-parallel shard: rows [a, b) of qweight, g_idx and x, the whole scales and qzeros
        a = 8 * rnd.randint(0, K // 8 - 1)
        b = 8 * rnd.randint(a // 8 + 1, K // 8)
        mode, t = f"row shard [{a}, {b})", dict(t, qweight=t["qweight"][a // 8:b // 8],
                                                 g_idx=t["g_idx"][a:b])
        x = x[..., a:b]
        out = torch_ops.w4a16_linear(x, t["qweight"], t["scales"], g_idx=t["g_idx"], **kw)
    else:
        mode = "plain"
        out = torch_ops.w4a16_linear(x, t["qweight"], t["scales"], g_idx=t["g_idx"], **kw)
    desc["mode"] = mode
    if out.shape != (*lead, N) or out.dtype != dtype:
        return desc, f"shape {tuple(out.shape)} dtype {out.dtype}"
    if math.prod(lead) == 0:
        return None, ""
    exp = reference(x, t, bias)
    e = rel_err(out, exp)
    return (None, "") if e < TOL[dtype] else (desc, f"rel err {e:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--large", action="store_true")
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    torch.manual_seed(args.seed)
    t0, n, bad = time.time(), 0, 0
    try:
        while time.time() - t0 < args.seconds:
            info = {"case": n}
            try:
                desc, msg = one_case(rnd, args.device, args.large, info)
            except Exception as e:  # an error on valid input is a failure too
                desc, msg = info, repr(e)[:300]
            if desc is not None:
                bad += 1
                print("FAIL", desc, msg, flush=True)
            n += 1
    finally:
        if args.device == "cpu":
            _C.cpu_isa_set(-1)
    print(f"seed {args.seed}: {n} cases, {bad} failed, {time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
