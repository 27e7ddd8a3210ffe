#!/usr/bin/env python3
"""Accuracy of w4a16_linear on the CPU where a factored zero point cancels: weights mostly at
their zero point (a sparse layer), x of one sign. Prints the relative error against the float64
reference at every ISA level (scalar / AVX2 / AVX-512) for a few such layers.

    python benchmarks/zero_point_cancellation.py

The scalar path and the blocked fp32 path (M > 20 or 24) subtract z per weight; the GEMVs factor
it out of their sums (RESULTS.md, thirty-seventh session)."""
import sys
from pathlib import Path

import torch

import torch_ops
from torch_ops import _C

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_linear import reference, rel_err  # noqa: E402


def sparse_layer(K, N, group_size, off, zeros, act_order):
    """GPTQ tensors whose codes sit at the zero point except a fraction `off` at z +- 1"""
    gs = K if group_size == -1 else group_size
    z = (torch.full((K // gs, N), 8, dtype=torch.uint8) if zeros == "8"
         else torch.randint(1, 15, (K // gs, N), dtype=torch.uint8))
    g_idx = (torch.randperm(K) // gs).int() if act_order else torch.arange(K) // gs
    q = z[g_idx.long()].clone()
    moved = torch.rand(K, N) < off
    q[moved] = (q[moved].int() + torch.randint(0, 2, (int(moved.sum()),)) * 2 - 1).to(torch.uint8)
    return {"qweight": torch_ops.pack(q, 4, dim=0),
            "scales": ((torch.rand(K // gs, N) + 0.5) / 64).half(),
            "qzeros": torch_ops.pack(((z.int() - 1) & 15).to(torch.uint8), 4, dim=1),
            "group_size": group_size, "g_idx": g_idx.int() if act_order else None,
            "zero_format": "v1"}


def main():
    torch.manual_seed(0)
    levels = ["scalar", "avx2", "avx512"][:_C.cpu_isa_detected() + 1]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; relative error at "
          + " / ".join(levels))
    for K, gs, off, zeros, act, M, dtype in [
            (16384, -1, 0.02, "8", False, 1, torch.float32),
            (16384, -1, 0.001, "8", False, 11, torch.float32),
            (16384, 128, 0.01, "random", False, 4, torch.float32),
            (8192, 128, 0.01, "random", True, 1, torch.float32),
            (8192, 128, 0.01, "random", True, 8, torch.float32),
            (16384, -1, 0.02, "8", False, 64, torch.float32),
            (16384, 128, 0.0005, "8", False, 16, torch.bfloat16)]:
        t = sparse_layer(K, 64, gs, off, zeros, act)
        if dtype != torch.float32:
            t["scales"] = t["scales"].to(dtype)
        x = (torch.rand(M, K) + 1).to(dtype)
        expected = reference(x, t)
        errors = []
        for level in range(len(levels)):
            _C.cpu_isa_set(level)
            errors.append(rel_err(torch_ops.w4a16_linear(x, **t), expected))
        _C.cpu_isa_set(-1)
        print(f"K={K} group={gs} off z {off:.2%} z={zeros} act_order={act} M={M} {dtype}: "
              + " / ".join(f"{e:.1e}" for e in errors))


if __name__ == "__main__":
    main()
