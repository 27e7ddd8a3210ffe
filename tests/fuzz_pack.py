#!/usr/bin/env python3
"""Random cases of the packing ops against the pure-PyTorch reference, bit for bit, for as long
as asked (pytest does not collect this file; the suite's cases are in test_ops.py).

    python3 tests/fuzz_pack.py [--seconds 120] [--seed 1] [--device cpu|cuda]

Ops: pack / unpack (bits 1/2/3/4/8, int32 or uint8 words, any dim of 1-3-D tensors, sequential
or AWQ order), awq_to_gptq / gptq_to_awq (v1 / v2 zeros, optional trivial g_idx),
convert_gptq_zeros (rows of any width), pack_v2 / unpack_v2, dequantize (GPTQ bits 2/3/4/8 with
or without zeros and g_idx, AWQ; fp16 / bf16 / fp32 scales), quantize, prepack_w4a16 and its
inverse, act_order_prepack; inputs contiguous, strided or transposed; on CPU any ISA level and one
or two threads. Where the reference raises, the op
must raise too; where both return, the results must be equal. Values out of range (a few cases
on purpose) must make pack / pack_v2 raise (the reference masks them). Prints each failing case
and exits 1 if any failed.
"""
import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_ops  # noqa: E402
from torch_ops import _C  # noqa: E402
from torch_ops import reference as ref  # noqa: E402

WORDS = [1, 2, 3, 8, 16, 24, 32, 40, 64, 96, 128, 256, 264]


def same(a, b):
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if not torch.is_tensor(a):
        return a == b
    return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


class Fuzz:
    def __init__(self, seed, device):
        self.rnd = random.Random(seed)
        torch.manual_seed(seed)
        self.device = device
        self.n = self.bad = 0

    def layout(self, t):
        """t as it is, as every other column of a wider tensor, or (2-D) transposed storage"""
        r = self.rnd.random()
        if t.dim() >= 1 and r < 0.3:
            big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
            big[..., ::2] = t
            return big[..., ::2]
        if t.dim() == 2 and r < 0.5:
            return t.t().contiguous().t()
        return t

    def ints(self, shape, dtype):
        lo, hi = {torch.int32: (-2**31, 2**31 - 1), torch.int16: (-2**15, 2**15 - 1), torch.uint8: (0, 256)}[dtype]
        return torch.randint(lo, hi, shape, dtype=dtype).to(self.device)

    def check(self, name, f, g, args, kw, must_raise=False):
        """f (the op) against g (the reference, run on CPU copies)"""
        self.n += 1
        cpu = [a.cpu() if torch.is_tensor(a) else a for a in args]
        cpu_kw = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}
        try:
            exp, eerr = g(*cpu, **cpu_kw), None
        except Exception as e:
            exp, eerr = None, e
        try:
            got, gerr = f(*args, **kw), None
        except Exception as e:
            got, gerr = None, e
        if must_raise:
            ok = gerr is not None
        elif eerr is not None:
            ok = gerr is not None
        else:
            ok = gerr is None and same(got, exp)
        if not ok:
            self.bad += 1
            shapes = [(tuple(a.shape), a.dtype, a.stride()) if torch.is_tensor(a) else a for a in args]
            print("FAIL", name, shapes, kw, "| reference:", repr(eerr)[:120] if eerr else "ok",
                  "| op:", repr(gerr)[:160] if gerr else "ok", flush=True)

    def one(self):
        rnd, dev = self.rnd, self.device
        if dev == "cpu":
            _C.cpu_isa_set(rnd.choice(range(_C.cpu_isa_detected() + 1)))
            torch.set_num_threads(rnd.choice([1, 2]))
        op = rnd.choice(["pack", "unpack", "awq_to_gptq", "gptq_to_awq", "convert_gptq_zeros", "pack_v2", "unpack_v2",
                         "dequantize", "quantize", "prepack_w4a16", "act_order_prepack"])
        bits = rnd.choice([1, 2, 3, 4, 8])
        if op in ("pack", "unpack"):
            nd = rnd.choice([1, 2, 3])
            shape = [rnd.choice(WORDS) for _ in range(nd)]
            dim = rnd.randrange(-nd, nd)
            order = rnd.choice(["sequential", "awq"])
            dtype = rnd.choice([torch.int32, torch.uint8])
            if order == "awq":
                bits, dtype = 4, torch.int32
            if op == "pack":
                v = torch.randint(0, 1 << bits, shape, dtype=torch.uint8, device=dev)
                wild = bits < 8 and rnd.random() < 0.05
                if wild:
                    v.view(-1)[rnd.randrange(v.numel())] = 1 << bits
                self.check(op, torch_ops.pack, ref.pack, (self.layout(v), bits), dict(dim=dim, order=order, dtype=dtype),
                           must_raise=wild)
            else:
                self.check(op, torch_ops.unpack, ref.unpack, (self.layout(self.ints(shape, dtype)), bits),
                           dict(dim=dim, order=order))
        elif op in ("awq_to_gptq", "gptq_to_awq"):
            K, N = 8 * rnd.randint(1, 40), 8 * rnd.randint(1, 40)
            G = rnd.choice([8, 16, 32, 64, 128, K])
            G = G if K % G == 0 else K
            zf = rnd.choice(["v1", "v2"])
            qz = self.layout(self.ints((K // G, N // 8), torch.int32))
            if op == "awq_to_gptq":
                self.check(op, torch_ops.awq_to_gptq, ref.awq_to_gptq,
                           (self.layout(self.ints((K, N // 8), torch.int32)), qz), dict(zero_format=zf))
            else:
                kw = dict(zero_format=zf)
                if rnd.random() < 0.3:
                    kw["g_idx"] = (torch.arange(K, device=dev) // G).to(torch.int32)
                self.check(op, torch_ops.gptq_to_awq, ref.gptq_to_awq,
                           (self.layout(self.ints((K // 8, N), torch.int32)), qz), kw)
        elif op == "convert_gptq_zeros":
            qz = self.layout(self.ints((rnd.choice([1, 2, 32, 33]), rnd.randint(1, 20)), torch.int32))
            src, dst = rnd.sample(["v1", "v2"], 2) if rnd.random() < 0.9 else ("v1", "v1")
            self.check(op, torch_ops.convert_gptq_zeros, ref.convert_gptq_zeros,
                       (qz, rnd.choice([2, 3, 4, 8]), src, dst), {})
        elif op == "pack_v2":
            u = torch.randint(0, 16, (rnd.choice([4, 8, 16, 64, 128, 132]), rnd.choice([64, 128, 192, 256])),
                              dtype=torch.uint8, device=dev)
            wild = rnd.random() < 0.05
            if wild:
                u.view(-1)[rnd.randrange(u.numel())] = 16
            self.check(op, torch_ops.pack_v2, ref.pack_v2, (self.layout(u),), {}, must_raise=wild)
        elif op == "unpack_v2":
            p = self.ints((rnd.choice([1, 2, 4, 16, 33]), rnd.choice([64, 128, 192, 256])), torch.int16)
            self.check(op, torch_ops.unpack_v2, ref.unpack_v2, (self.layout(p),), {})
        else:
            self.formats(op)

    def formats(self, op):
        """dequantize, quantize, prepack_w4a16 (and back), act_order_prepack"""
        rnd, dev = self.rnd, self.device
        gs = rnd.choice([16, 32, 64, 128, -1])
        K = gs * rnd.randint(1, 4) if gs > 0 else 32 * rnd.randint(1, 8)
        G = K if gs == -1 else gs
        bits = rnd.choice([2, 3, 4, 8]) if op in ("dequantize", "quantize") else 4
        N = 32 * rnd.randint(1, 6) if bits == 3 else 8 * rnd.randint(1, 30)
        sdt = rnd.choice([torch.float16, torch.bfloat16, torch.float32])
        if op == "dequantize":
            fmt = "gptq" if bits != 4 or rnd.random() < 0.6 else "awq"
            if fmt == "gptq":
                if K * bits % 32:
                    return
                qw = self.ints((K * bits // 32, N), torch.int32)
                qz = self.ints((K // G, (N * bits + 31) // 32), torch.int32) if rnd.random() < 0.8 else None
                gi = (torch.randperm(K, device=dev) // G).to(torch.int32) if rnd.random() < 0.3 else None
            else:
                qw, qz, gi = self.ints((K, N // 8), torch.int32), self.ints((K // G, N // 8), torch.int32), None
            sc = (torch.rand(K // G, N, device=dev) + 0.1).to(sdt)
            self.check(op, torch_ops.dequantize, ref.dequantize, (self.layout(qw), sc, qz, fmt, bits, gs, gi,
                                                                 rnd.choice(["v1", "v2"])), {})
        elif op == "quantize":
            fmt = "gptq" if bits != 4 or rnd.random() < 0.5 else "awq"
            if K % (32 // bits if bits != 3 else 32) or N % (32 // bits if bits != 3 else 32):
                return
            w = torch.randn(N, K, device=dev) * rnd.choice([1e-3, 1.0, 100.0])
            if rnd.random() < 0.2:
                w[0] = 0  # a constant group
            self.check(op, torch_ops.quantize, ref.quantize,
                       (self.layout(w), bits, gs, rnd.random() < 0.3, fmt, rnd.choice(["v1", "v2"]),
                        sdt if sdt != torch.float32 else None), {})
        elif op == "prepack_w4a16":
            if K % 32:
                return
            qw = self.layout(self.ints((K // 8, N), torch.int32))
            self.check(op, torch_ops.prepack_w4a16, ref.prepack_w4a16, (qw,), {})
            self.check("unprepack_w4a16", lambda q: torch_ops.unprepack_w4a16(torch_ops.prepack_w4a16(q)),
                       lambda q: q.clone(), (qw,), {})
        else:
            qw = self.ints((K // 8, N), torch.int32)
            gi = (torch.randperm(K, device=dev) // G).to(torch.int32)
            if rnd.random() < 0.2:
                gi[0] = (gi[0] + 1) % (K // G)  # groups of unequal size: not sortable

            def expected(qweight, g_idx, group_size):
                """the rows stably sorted by group, or None where that is not arange(K) // G"""
                perm = torch.argsort(g_idx.long(), stable=True)
                if not torch.equal(g_idx.long()[perm], torch.arange(K) // G):
                    return None
                return ref.pack(ref.unpack(qweight, 4, dim=0)[perm], 4, dim=0), perm.to(torch.int32)

            def got(qweight, g_idx, group_size):
                r = torch_ops.act_order_prepack(qweight, g_idx, group_size)
                return None if r is None else tuple(t.cpu() for t in r)

            self.n += 1
            a, b = got(qw, gi, gs), expected(qw.cpu(), gi.cpu(), gs)
            if (a is None) != (b is None) or (a is not None and not same(a, b)):
                self.bad += 1
                print("FAIL act_order_prepack", K, N, gs, "op:", "None" if a is None else "sorted",
                      "expected:", "None" if b is None else "sorted", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    fz = Fuzz(args.seed, args.device)
    t0 = time.time()
    try:
        while time.time() - t0 < args.seconds:
            fz.one()
    finally:
        if args.device == "cpu":
            _C.cpu_isa_set(-1)
    print(f"seed {args.seed}: {fz.n} cases, {fz.bad} failed, {time.time() - t0:.0f} s")
    return 1 if fz.bad else 0


if __name__ == "__main__":
    sys.exit(main())
