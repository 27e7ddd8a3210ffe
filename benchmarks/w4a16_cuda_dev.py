#!/usr/bin/env python3
"""Development harness for the CUDA w4a16 linear (csrc/cuda/w4a16_kernels.cu), without the torch
extension: builds (or loads) the kernel file as a plain shared library, calls
tops_cuda_w4a16_linear through ctypes, checks it against a float64 reference over many shapes and
formats, then times it against cuBLAS fp16 with triton.testing.do_bench.

    python3 benchmarks/w4a16_cuda_dev.py [--lib PATH] [--quick] [--no-bench] [--out DIR]

The library is built with
    nvcc -shared -Xcompiler -fPIC -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc \
         -o .devbuild/libw4.so csrc/cuda/w4a16_kernels.cu csrc/cuda/w4a16_wgmma.cu
(sm_90a enables the wgmma path; with plain sm_90 the mma.sync kernels serve every batch)
when --lib does not exist. Full logs go to --out (default: $OUT or .devbuild).
"""
import argparse
import ctypes
import math
import os
import subprocess
import sys
import time

import torch

from timing import time_graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WS = []


def ws():
    """(pointer, bytes) of a 64 MB workspace for tops_cuda_w4a16_linear (the small-batch tiles'
    split-K partials; enough for every shape here)"""
    if not _WS:
        _WS.append(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))
    return ctypes.c_void_p(_WS[0].data_ptr()), _WS[0].numel()


def cur_stream():
    """the current CUDA stream as the C launchers take it (read at each call: under graph capture
    it is the capture stream)"""
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


TOPS_F32, TOPS_F16, TOPS_BF16 = 0, 1, 2
ZV1, ZV2 = 1, 2
DT = {torch.float32: TOPS_F32, torch.float16: TOPS_F16, torch.bfloat16: TOPS_BF16}
SWEEP_DT = {"f16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


class Args(ctypes.Structure):
    """mirror of tops_w4a16_args (csrc/core/tops.h)"""
    _fields_ = [
        ("M", ctypes.c_int64), ("K", ctypes.c_int64), ("N", ctypes.c_int64),
        ("groups", ctypes.c_int64), ("group_size", ctypes.c_int64),
        ("x", ctypes.c_void_p), ("x_dtype", ctypes.c_int), ("x_row_stride", ctypes.c_int64),
        ("qweight", ctypes.c_void_p),
        ("scales", ctypes.c_void_p), ("scales_dtype", ctypes.c_int),
        ("qzeros", ctypes.c_void_p), ("zero_format", ctypes.c_int),
        ("g_idx", ctypes.c_void_p),
        ("bias", ctypes.c_void_p), ("bias_dtype", ctypes.c_int),
        ("out", ctypes.c_void_p), ("out_dtype", ctypes.c_int),
        ("perm", ctypes.c_void_p),
        ("kinterleaved", ctypes.c_int),
        ("weights_fresh", ctypes.c_int),
    ]


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOGF.write(s + "\n")
    LOGF.flush()


def build(lib):
    os.makedirs(os.path.dirname(lib), exist_ok=True)
    cmd = ["nvcc", "-shared", "-Xcompiler", "-fPIC", "-O3", "-std=c++17",
           "-gencode=arch=compute_90a,code=sm_90a", "-I" + os.path.join(ROOT, "csrc"),
           "-o", lib, os.path.join(ROOT, "csrc/cuda/w4a16_kernels.cu"),
           os.path.join(ROOT, "csrc/cuda/w4a16_wgmma.cu")]
    log("building:", " ".join(cmd))
    t = time.time()
    subprocess.check_call(cmd)
    log(f"built in {time.time() - t:.1f} s")


# ---- data -----------------------------------------------------------------------------------

def make_case(M, K, N, gs, zf, act, bias, dtype, dev="cuda", seed=0):
    """random GPTQ layer: zf in (None, 1, 2); gs == -1 means K"""
    g = torch.Generator(device="cpu").manual_seed(seed)
    G_ = K if gs == -1 else gs
    G = K // G_
    qweight = torch.randint(-2**31, 2**31, (K // 8, N), generator=g, dtype=torch.int64).to(torch.int32)
    qzeros = None
    if zf is not None:
        qzeros = torch.randint(-2**31, 2**31, (G, N // 8), generator=g, dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(G, N, generator=g) * 1.5 + 0.25) / math.sqrt(K) * 0.25
    x = torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    g_idx = None
    if act:
        perm = torch.randperm(K, generator=g)
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = (torch.arange(K) // G_).to(torch.int32)
    c = dict(M=M, K=K, N=N, gs=G_, G=G, zf=zf, dtype=dtype,
             qweight=qweight.to(dev), qzeros=None if qzeros is None else qzeros.to(dev),
             scales=scales.to(dtype).to(dev), x=x.to(dtype).to(dev),
             bias=None if b is None else b.to(dtype).to(dev),
             g_idx=None if g_idx is None else g_idx.to(dev))
    return c


def dequant_ref(c):
    """float64 W [K, N]"""
    K, N = c["K"], c["N"]
    dev = c["qweight"].device
    k = torch.arange(K, device=dev)
    q = (c["qweight"][k // 8] >> (4 * (k % 8)).to(torch.int32)[:, None]) & 15
    grp = c["g_idx"].long() if c["g_idx"] is not None else k // c["gs"]
    if c["qzeros"] is None:
        z = torch.full((c["G"], N), 8, dtype=torch.int32, device=dev)
    else:
        n = torch.arange(N, device=dev)
        z = (c["qzeros"][:, n // 8] >> (4 * (n % 8)).to(torch.int32)[None, :]) & 15
        if c["zf"] == ZV1:
            z = (z + 1) & 15
    s = c["scales"].double()
    return s[grp] * (q.double() - z[grp].double())


def kil_ok(c):
    """the case can take the k-interleaved qweight (prepack_w4a16): plain groups, whole 32-k blocks"""
    return c["g_idx"] is None and c["K"] % 32 == 0 and (c["gs"] % 32 == 0 or c["gs"] == c["K"])


def kp_order(K):
    """storage order of the k-interleaved layout: stored k (8 r + i, r = 4 b + t) holds real k
    32 b + 16 ((i >> 1) & 1) + 8 (i & 1) + 2 t + (i >> 2)"""
    s = torch.arange(K)
    i, r = s % 8, s // 8
    b, t = r // 4, r % 4
    return 32 * b + 16 * ((i >> 1) & 1) + 8 * (i & 1) + 2 * t + (i >> 2)


def prepack_kil(qweight, K, N):
    """GPTQ qweight [K/8, N] -> the k-interleaved layout, same shape (K % 32 == 0)"""
    dev = qweight.device
    sh = (4 * torch.arange(8, device=dev, dtype=torch.int32))
    q = ((qweight[:, None, :] >> sh[None, :, None]) & 15).reshape(K, N).to(torch.int64)
    q = q[kp_order(K).to(dev)].view(K // 8, 8, N)
    w = (q << (4 * torch.arange(8, device=dev, dtype=torch.int64))[None, :, None]).sum(1)
    return w.where(w < 2**31, w - 2**32).to(torch.int32).contiguous()


def self_test_prepack():
    g = torch.Generator().manual_seed(3)
    K, N = 96, 40
    qw = torch.randint(-2**31, 2**31, (K // 8, N), generator=g, dtype=torch.int64).to(torch.int32)
    pp = prepack_kil(qw, K, N)
    assert pp.shape == qw.shape
    for r in range(K // 8):
        for n in (0, 7, 39):
            word = int(pp[r, n]) & 0xFFFFFFFF
            b, t = r // 4, r % 4
            for i in range(8):
                k = 32 * b + 16 * ((i >> 1) & 1) + 8 * (i & 1) + 2 * t + (i >> 2)
                want = (int(qw[k // 8, n]) >> (4 * (k % 8))) & 15
                assert (word >> (4 * i)) & 15 == want, (r, n, i)
    assert sorted(kp_order(64).tolist()) == list(range(64))
    log("prepack self-test: ok")


def ref_out(c):
    y = c["x"].double() @ dequant_ref(c)
    if c["bias"] is not None:
        y = y + c["bias"].double()
    return y


def self_test_reference():
    """the reference against a scalar loop, on the CPU (a wrong oracle would waste a GPU run)"""
    for act in (False, True):
        for zf in (None, ZV1, ZV2):
            c = make_case(3, 64, 16, 32, zf, act, True, torch.float32, dev="cpu", seed=5)
            W = dequant_ref(c)
            qw, qz = c["qweight"], c["qzeros"]
            for kk in (0, 7, 33, 63):
                for nn in (0, 5, 9, 15):
                    gg = int(c["g_idx"][kk]) if act else kk // 32
                    q = (int(qw[kk // 8, nn]) >> (4 * (kk % 8))) & 15
                    if qz is None:
                        z = 8
                    else:
                        z = (int(qz[gg, nn // 8]) >> (4 * (nn % 8))) & 15
                        if zf == ZV1:
                            z = (z + 1) & 15
                    w = float(c["scales"][gg, nn]) * (q - z)
                    assert abs(float(W[kk, nn]) - w) < 1e-12, (kk, nn, float(W[kk, nn]), w)
    # FORMATS.md worked example: v1 zeros [0,5,3,9,15,1,8,2] pack to 0x170E824F
    zs = [0, 5, 3, 9, 15, 1, 8, 2]
    word = 0
    for i, z in enumerate(zs):
        word |= ((z - 1) & 15) << (4 * i)
    assert word == 0x170E824F
    log("reference self-test: ok")


# ---- calling the kernel ---------------------------------------------------------------------

def ptr(t):
    return None if t is None else t.data_ptr()


def make_args(c, out, x=None, qweight=None, perm=None, kil=False):
    a = Args()
    a.M, a.K, a.N = c["M"], c["K"], c["N"]
    a.groups, a.group_size = c["G"], c["gs"]
    xx = c["x"] if x is None else x
    a.x, a.x_dtype, a.x_row_stride = ptr(xx), DT[c["dtype"]], c["K"]
    a.qweight = ptr(c["qweight"] if qweight is None else qweight)
    a.scales, a.scales_dtype = ptr(c["scales"]), DT[c["dtype"]]
    a.qzeros = ptr(c["qzeros"])
    a.zero_format = c["zf"] if c["zf"] is not None else 0
    a.g_idx = ptr(c["g_idx"])
    a.bias, a.bias_dtype = ptr(c["bias"]), DT[c["dtype"]]
    a.out, a.out_dtype = ptr(out), DT[c["dtype"]]
    a.perm = ptr(perm)
    a.kinterleaved = int(kil)
    return a


def call(a):
    st = LIB.tops_cuda_w4a16_linear(ctypes.byref(a), *ws(), cur_stream())
    return st


def check(c, force=(-1, 0), kil=False):
    LOGF.write("run " + desc(c, force) + "\n")
    LOGF.flush()
    LIB.tops_cuda_w4a16_dev_force(force[0], force[1])
    out = torch.full((c["M"], c["N"]), float("nan"), dtype=c["dtype"], device="cuda")
    qk = prepack_kil(c["qweight"], c["K"], c["N"]) if kil else None  # (kept alive: a holds pointers)
    a = make_args(c, out, qweight=qk, kil=kil)
    st = call(a)
    torch.cuda.synchronize()
    LIB.tops_cuda_w4a16_dev_force(-1, 0)
    if st != 0:
        return False, f"status {st}"
    ref = ref_out(c)
    o = out.double()
    if torch.isnan(o).any():
        return False, f"NaN/unwritten: {int(torch.isnan(o).sum())} of {o.numel()}"
    rel = float((o - ref).norm() / ref.norm().clamp_min(1e-30))
    return rel < TOL[c["dtype"]], f"rel {rel:.2e}"


def desc(c, force=None):
    dn = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}[c["dtype"]]
    z = {None: "sym", 1: "v1", 2: "v2"}[c["zf"]]
    s = (f"M={c['M']} K={c['K']} N={c['N']} gs={c['gs']} {z} act={int(c['g_idx'] is not None)} "
         f"bias={int(c['bias'] is not None)} {dn}")
    if force is not None and force != (-1, 0):
        s += f" cfg={force[0]} split={force[1]}"
    return s


FORCED_CFGS = (0, 1, 2, 3, 4, 5, 10, 11, 14, 16)  # every built-in configuration


def correctness(quick, forced_cfgs=FORCED_CFGS):
    fails = 0
    total = 0
    worst = {}

    def run(c, force=(-1, 0)):
        nonlocal fails, total
        if kil_ok(c):  # the k-interleaved qweight too
            total += 1
            ok, msg = check(c, force, kil=True)
            if not ok:
                fails += 1
                log("FAIL kil", desc(c, force), msg)
        ok, msg = check(c, force)
        total += 1
        key = (c["dtype"], c["g_idx"] is not None)
        r = float(msg.split()[1]) if msg.startswith("rel") else float("inf")
        worst[key] = max(worst.get(key, 0.0), r)
        if not ok:
            fails += 1
            log("FAIL", desc(c, force), msg)
        return ok

    Ms = [1, 2, 3, 5, 8, 16, 17, 33, 64, 65, 128, 256, 1024]
    shapes = [(32, 8, [32, -1]), (128, 24, [32, 64, -1]), (256, 200, [64, 128, -1]),
              (4224, 72, [32, 128, -1]), (1024, 520, [128, 64]), (4224, 4104, [128, 32, -1]),
              (96, 40, [32, -1]), (8, 16, [-1]), (24, 8, [-1, 8])]
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    zfs = [ZV1, ZV2, None]
    seed = 0
    for si, (K, N, gss) in enumerate(shapes):
        for mi, M in enumerate(Ms):
            if K * N > 1_000_000 and M not in (1, 5, 16, 17, 64, 65, 256, 1024):
                continue
            if quick and mi % 3 != 0:
                continue
            seed += 1
            gs = gss[(mi + si) % len(gss)]
            zf = zfs[(mi + 2 * si) % 3]
            dt = dtypes[(mi + si) % 3]
            if dt == torch.float32 and M * K * N > 2e9:
                dt = torch.float16
            act = (mi + si) % 4 == 1
            bias = (mi % 2) == 0
            run(make_case(M, K, N, gs, zf, act, bias, dt, seed=seed))
            # the other dtype / act-order on the same shape, now and then
            if mi % 4 == 2:
                run(make_case(M, K, N, gs, zfs[(mi + 1) % 3], not act, not bias,
                              torch.bfloat16 if dt == torch.float16 else torch.float16, seed=seed + 1000))
    log(f"random shapes: {total - fails}/{total} passed")

    # every tile config and split, forced, on awkward shapes (the automatic choice covers few)
    t0 = total
    for cfg in forced_cfgs:
        for split in (1, 3, 8):
            for (M, K, N, gs, act, dt) in [(5, 4224, 4104, 128, False, torch.float16),
                                           (37, 2048, 1000, 64, True, torch.bfloat16),
                                           (130, 1024, 520, 32, False, torch.bfloat16),
                                           (70, 4096, 264, -1, True, torch.float16),
                                           (65, 160, 24, 32, False, torch.float16)]:
                if quick and split == 3:
                    continue
                seed += 1
                run(make_case(M, K, N, gs, [ZV1, ZV2, None][seed % 3], act, seed % 2 == 0, dt, seed=seed),
                    force=(cfg, split))
    log(f"forced configs: {total - t0} cases run; total so far {total - fails}/{total} passed")

    def perm_run(M, K, N, gs, dt, seed, kil=False):
        """one perm case under the current dev overrides: (status, rel err, config that ran);
        kil: the k-interleaved qweight (K % 32 == 0)"""
        c = make_case(M, K, N, gs, [ZV1, ZV2, None][seed % 3], False, seed % 2 == 0, dt, seed=seed)
        perm = (torch.randperm(K) if seed % 2 else torch.randint(0, K, (K,))).to(torch.int32).cuda()
        out = torch.full((M, N), float("nan"), dtype=dt, device="cuda")
        # the gathered x only (K then split through clusters), or room for the partials too
        small = torch.empty(M * K * 2, dtype=torch.uint8, device="cuda")
        w = (ctypes.c_void_p(small.data_ptr()), small.numel()) if (seed // 2) % 2 else ws()
        q = prepack_kil(c["qweight"], K, N) if kil else None
        st = LIB.tops_cuda_w4a16_linear(ctypes.byref(make_args(c, out, qweight=q, perm=perm, kil=kil)), *w,
                                        cur_stream())
        torch.cuda.synchronize()
        used = last_cfg()
        ref = ref_out(dict(c, x=c["x"][:, perm.long()]))
        o = out.double()
        rel = float((o - ref).norm() / ref.norm().clamp_min(1e-30)) if not torch.isnan(o).any() else float("nan")
        return st, rel, used

    # perm (x[:, perm], gathered by a kernel first, or by the GEMM's own grid at M <= 16 with room
    # for the partials, forced for half the cases) with every small-batch config, forced or not,
    # both qweight layouts
    t0 = total
    for cfg in [-1, 0, 1, 2, 10]:
        for split in (0, 1, 3, 8):
            for (M, K, N, gs, dt) in [(1, 4224, 4104, 128, torch.float16), (5, 2048, 1000, 64, torch.bfloat16),
                                      (16, 8192, 520, 32, torch.float16), (13, 1024, 264, -1, torch.bfloat16),
                                      (40, 1024, 264, 128, torch.float16), (8, 4096, 4096, 128, torch.bfloat16),
                                      (3, 8192, 8192, 128, torch.float16)]:
                seed += 1
                LIB.tops_cuda_w4a16_dev_force(cfg, split)
                # by the GEMM's grid or each of its blocks, where they can
                LIB.tops_cuda_w4a16_dev_gather((0, 4, 5)[(seed // 8) % 3])
                st, rel, used = perm_run(M, K, N, gs, dt, seed, kil=(seed // 4) % 2 == 1)
                LIB.tops_cuda_w4a16_dev_gather(0)
                LIB.tops_cuda_w4a16_dev_force(-1, 0)
                total += 1
                if st != 0 or not rel < TOL[dt]:
                    fails += 1
                    log(f"FAIL perm M={M} K={K} N={N} cfg {cfg} split {split}: status {st} rel {rel:.2e} ran {used}")
    # each way of gathering x (forced), rows of x above the default 48 KB of shared memory and
    # blocks that gather several rows included
    for mode in (1, 2, 3, 4, 5):
        for (M, K, N, gs, dt) in [(1, 4224, 4104, 128, torch.float16), (40, 1024, 264, 128, torch.bfloat16),
                                  (33, 28672, 264, 128, torch.float16), (70, 2056, 136, -1, torch.bfloat16),
                                  (600, 1024, 72, 128, torch.float16), (300, 12288, 72, 128, torch.bfloat16)]:
            seed += 1
            LIB.tops_cuda_w4a16_dev_gather(mode)
            st, rel, _ = perm_run(M, K, N, gs, dt, seed, kil=mode == 5 and K % 32 == 0)  # (5: that layout only)
            LIB.tops_cuda_w4a16_dev_gather(0)
            total += 1
            if st != 0 or not rel < TOL[dt]:
                fails += 1
                log(f"FAIL perm gather {mode} M={M} K={K} N={N}: status {st} rel {rel:.2e}")
    log(f"perm: {total - t0} cases run; total so far {total - fails}/{total} passed")

    # the benchmark shapes themselves
    t1 = total
    for (M, K, N) in [(1, 8192, 8192), (16, 8192, 8192), (64, 8192, 8192), (256, 8192, 8192),
                      (1, 4096, 4096), (3, 8192, 28672)] + ([] if quick else [(1024, 8192, 8192)]):
        for dt in (torch.float16, torch.bfloat16):
            for act in (False, True):
                seed += 1
                run(make_case(M, K, N, 128, ZV1 if act else ZV2, act, M == 1, dt, seed=seed))
    log(f"benchmark shapes: {total - t1} cases run")

    # argument checks
    c = make_case(4, 64, 16, 32, ZV2, False, False, torch.float16, seed=1)
    out = torch.empty(4, 16, dtype=torch.float16, device="cuda")
    bad = []
    for field, val in [("N", 12), ("K", 60), ("group_size", 48), ("x_dtype", TOPS_BF16),
                       ("out_dtype", TOPS_F32), ("x_row_stride", 72), ("zero_format", 3), ("groups", 3)]:
        a = make_args(c, out)
        setattr(a, field, val)
        st = call(a)
        total += 1
        if st != 1:
            fails += 1
            bad.append((field, val, st))
    a = make_args(c, out)
    a.M = 0
    st = call(a)
    total += 1
    if st != 0:
        fails += 1
        bad.append(("M", 0, st))
    log("argument checks:", "ok" if not bad else f"FAIL {bad}")

    # CUDA graph capture (split-K cluster launch inside a graph)
    for (M, K, N, dt) in [(1, 4096, 4096, torch.float16), (300, 1024, 1024, torch.bfloat16)]:
        c = make_case(M, K, N, 128, ZV1, False, True, dt, seed=77)
        out = torch.full((M, N), float("nan"), dtype=dt, device="cuda")
        a = make_args(c, out)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            call(a)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            st = call(a)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = ref_out(c)
        rel = float((out.double() - ref).norm() / ref.norm())
        total += 1
        ok = st == 0 and not torch.isnan(out.double()).any() and rel < TOL[dt]
        if not ok:
            fails += 1
        log(f"graph capture M={M} K={K} N={N}: {'ok' if ok else 'FAIL'} rel {rel:.2e} status {st}")

    wl = ", ".join(f"{ {torch.float16: 'f16', torch.bfloat16: 'bf16', torch.float32: 'f32'}[k[0]]}{'/act' if k[1] else ''}: {v:.1e}"
                   for k, v in sorted(worst.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])))
    log(f"CORRECTNESS: {total - fails}/{total} passed; worst rel err: {wl}")
    return fails


# ---- timing ---------------------------------------------------------------------------------

def bench_us(fn):
    import triton
    return triton.testing.do_bench(fn, warmup=20, rep=60, return_mode="median") * 1000.0


def last_cfg():
    c, sp = ctypes.c_int(), ctypes.c_int()
    LIB.tops_cuda_w4a16_dev_last(ctypes.byref(c), ctypes.byref(sp))
    return c.value, sp.value


def bench_case(M, K, N, dt=torch.float16, act=False, force=(-1, 0), cublas=True):
    c = make_case(M, K, N, 128, ZV2 if not act else ZV1, act, False, dt, seed=123)
    wbytes = K * N // 2
    ncopy = max(1, min(8, (200 << 20) // wbytes + 1))
    qws = [c["qweight"]] + [c["qweight"].clone() for _ in range(ncopy - 1)]
    out = torch.empty(M, N, dtype=dt, device="cuda")
    args = [make_args(c, out, qweight=q) for q in qws]
    stream = cur_stream()
    fnc = LIB.tops_cuda_w4a16_linear
    i = [0]

    def ours():
        i[0] += 1
        fnc(ctypes.byref(args[i[0] % ncopy]), *ws(), stream)

    LIB.tops_cuda_w4a16_dev_force(force[0], force[1])
    st = call(args[0])
    torch.cuda.synchronize()
    assert st == 0, st
    used = last_cfg()
    t = bench_us(ours)
    LIB.tops_cuda_w4a16_dev_force(-1, 0)
    tc = float("nan")
    if cublas:
        w = torch.randn(N, K, device="cuda", dtype=torch.float16)
        xh = c["x"].to(torch.float16)
        tc = bench_us(lambda: xh @ w.t())
        del w
    G = K // 128
    floor = (K * N / 2 + G * N * 2 + G * N / 2 + M * K * 2 + M * N * 2) / 3.0e12 * 1e6
    del qws, args
    return t, tc, floor, used


def benchmarks(quick):
    rows = []

    def row(K, N, M, dt=torch.float16, act=False, force=(-1, 0), cublas=True, tag=""):
        LOGF.write(f"bench {K}x{N} M={M} {dt} act={act} force={force}\n")
        LOGF.flush()
        t, tc, fl, used = bench_case(M, K, N, dt, act, force, cublas)
        dn = "f16" if dt == torch.float16 else "bf16"
        r = dict(K=K, N=N, M=M, dt=dn + ("/act" if act else ""), cfg=f"{used[0]}/{used[1]}", t=t, tc=tc, fl=fl, tag=tag)
        rows.append(r)
        log(f"{K}x{N} M={M} {r['dt']} cfg={r['cfg']}: ours {t:.1f} us  cublas {tc:.1f} us  floor {fl:.1f} us {tag}")
        return r

    K = N = 8192
    for M in [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]:
        row(K, N, M)
    for M in [1, 16] + ([] if quick else [1024]):
        row(8192, 28672, M)
    row(8192, 28672, 1, force=(0, 0), cublas=False, tag="sweep")
    row(4096, 4096, 1)
    row(4096, 4096, 16)
    row(4096, 4096, 64)
    row(14336, 4096, 1)
    row(4096, 14336, 1)
    for M in [1, 16, 64, 256, 1024]:
        row(K, N, M, dt=torch.bfloat16, cublas=False)
        row(K, N, M, act=True, cublas=False)
    # config sweeps (forced) to tune the thresholds
    for (M, cfg, split) in [(1, 0, 6), (16, 1, 6), (32, 10, 0), (64, 2, 0), (128, 11, 0), (256, 14, 0),
                            (1024, 11, 0), (1024, 14, 0)]:
        row(K, N, M, force=(cfg, split), cublas=False, tag="sweep")
    return rows


MID_CFGS = {32: (2, 10), 64: (3, 10, 11, 14), 128: (4, 11, 14), 256: (5, 11, 14, 16), 1024: (14, 16)}
MID_MS = (32, 64, 128, 256)  # --sweep-mid without --mid-ms
SWEEP_SHAPES = ((4096, 4096), (8192, 8192), (14336, 4096), (28672, 4096), (8192, 28672))  # K x N


def perm_sweep(small=False, kil=False, ms=(), shapes=()):
    """x[:, perm]: the automatic path with perm against plain, under CUDA-graph timing, for each
    way of gathering x (tops_cuda_w4a16_dev_gather: 0 automatic, 1 by element, 2 by element
    signalling the GEMM late, 3 by row, 4 by the GEMM's own grid, 5 by each of its blocks, where they
    can); small: M = 1..8 where K is large and N small; kil: the k-interleaved qweight; ms: only these batch sizes ("ws": K split through the workspace)"""
    fnc = LIB.tops_cuda_w4a16_linear
    shapes = shapes or ([(8192, 4096), (14336, 4096), (28672, 4096), (14336, 5120)] if small else
                        [(4096, 4096), (8192, 8192), (14336, 4096), (8192, 28672)])
    for K, N in shapes:
        for M in (ms or ((1, 2, 4, 8) if small else (1, 4, 16, 64, 256, 1024, 4096))):
            if K * N > 8192 * 8192 and M > 16:
                continue
            c = make_case(M, K, N, 128, ZV2, False, False, torch.float16, seed=7)
            ncopy = max(2, min(32, (200 << 20) // (K * N // 2) + 1))
            qws = [c["qweight"]] + [c["qweight"].clone() for _ in range(ncopy - 1)]
            if kil:  # the layout QuantLinear holds (act-order layers: sorted by group, then this)
                qws = [prepack_kil(q, K, N) for q in qws]
            out = torch.empty(M, N, dtype=torch.float16, device="cuda")
            perm = torch.randperm(K).to(torch.int32).cuda()
            res = []
            for mode in (None, 0, 1, 2, 3, 4, 5):
                args = [make_args(c, out, qweight=q, perm=None if mode is None else perm, kil=kil) for q in qws]
                LIB.tops_cuda_w4a16_dev_gather(mode or 0)
                def launcher(a):  # (the 64 MB workspace: room for the gathered x and the partials)
                    return lambda: fnc(ctypes.byref(a), *ws(), cur_stream())
                t = time_graph([launcher(a) for a in args])
                res.append(f"{'plain' if mode is None else 'gather' + str(mode) if mode else 'auto'} {last_cfg()} "
                           f"{'ws ' if LIB.tops_cuda_w4a16_dev_last_workspace() & 1 else ''}"
                           f"{'grid ' if LIB.tops_cuda_w4a16_dev_last_workspace() & 2 else ''}"
                           f"{'block ' if LIB.tops_cuda_w4a16_dev_last_workspace() & 4 else ''}{t:.1f}")
            LIB.tops_cuda_w4a16_dev_gather(0)
            # the automatic path without PDL, and its gather alone (into the workspace's start)
            LIB.tops_cuda_w4a16_dev_pdl(0)
            t = time_graph([launcher(a) for a in args])
            LIB.tops_cuda_w4a16_dev_pdl(1)
            res.append(f"auto no-PDL {t:.1f}")
            gx = LIB.tops_cuda_w4a16_gather_x
            t = time_graph([lambda a=a: gx(ctypes.byref(a), ws()[0], cur_stream())
                            for a in args])
            res.append(f"gather alone {t:.1f}")
            # the automatic path with the workspace the library asks for (as the package gives it)
            wsb = LIB.tops_cuda_w4a16_workspace_bytes(ctypes.byref(args[0]))
            t = time_graph([lambda a=a: fnc(ctypes.byref(a), ws()[0], wsb,
                                            cur_stream()) for a in args])
            res.append(f"auto, its own workspace ({wsb >> 10} KiB) {t:.1f}")
            log(f"{K}x{N} M={M}: " + " | ".join(res))
            del qws


def act_sweep():
    """raw g_idx (act-order, not prepacked): automatic choice and forced splits, CUDA graphs"""
    fnc = LIB.tops_cuda_w4a16_linear
    for K, N in [(4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096)]:
        for M in (1, 16, 64):
            c = make_case(M, K, N, 128, ZV1, True, False, torch.float16, seed=7)
            ncopy = max(2, min(32, (200 << 20) // (K * N // 2) + 1))
            qws = [c["qweight"]] + [c["qweight"].clone() for _ in range(ncopy - 1)]
            out = torch.empty(M, N, dtype=torch.float16, device="cuda")
            res = []
            for force in [(-1, 0)] + ([(0 if M <= 8 else 1, s) for s in (1, 2, 3, 4, 6)] if M <= 16 else []):
                args = [make_args(c, out, qweight=q) for q in qws]
                LIB.tops_cuda_w4a16_dev_force(*force)
                t = time_graph([lambda a=a: fnc(ctypes.byref(a), *ws(),
                                                cur_stream())
                                for a in args])
                res.append(f"{'auto' if force[0] < 0 else '%d/%d' % force} {last_cfg()} {t:.1f}")
            LIB.tops_cuda_w4a16_dev_force(-1, 0)
            log(f"act {K}x{N} M={M}: " + " | ".join(res))
            del qws


def graph_sweep(mid=False, auto_only=False, mid_ms=(), dtype=torch.float16, shapes=SWEEP_SHAPES, mid_cfgs=()):
    """configurations, forced, under CUDA-graph timing with rotating weights: the small-batch
    ones (cfg x split), or with mid=True those of MID_CFGS (or mid_cfgs) for M = 32..256 or mid_ms
    (cfg x split 1, 2, 3, 4, 6, 8); fp16 or bf16 activations, the given K x N shapes"""
    fnc = LIB.tops_cuda_w4a16_linear

    def launcher(a):
        return lambda: fnc(ctypes.byref(a), *ws(), cur_stream())

    for K, N in shapes:
        for M in ((mid_ms or MID_MS) if mid else (mid_ms or (1, 4, 16))):
            c = make_case(M, K, N, 128, ZV2, False, False, dtype, seed=7)
            ncopy = max(2, min(32, (200 << 20) // (K * N // 2) + 1))
            qws = [c["qweight"]] + [c["qweight"].clone() for _ in range(ncopy - 1)]
            out = torch.empty(M, N, dtype=dtype, device="cuda")
            args = [make_args(c, out, qweight=q) for q in qws]
            qkil = [prepack_kil(q, K, N) for q in qws]  # (kept alive: the args hold pointers)
            kil_args = [make_args(c, out, qweight=q, kil=True) for q in qkil]
            res = []
            for pdl in ((1,) if auto_only else (1, 0)):
                LIB.tops_cuda_w4a16_dev_pdl(pdl)
                LIB.tops_cuda_w4a16_dev_force(-1, 0)
                t = time_graph([launcher(a) for a in args])
                res.append((f"auto{'' if pdl else ' nopdl'} {last_cfg()}", t))
            LIB.tops_cuda_w4a16_dev_pdl(1)
            t = time_graph([launcher(a) for a in kil_args])
            res.append((f"auto kil {last_cfg()}", t))
            base = 0 if M <= 8 else 1
            sweep = [(cfg, split) for cfg in (mid_cfgs or MID_CFGS.get(M, ())) for split in (1, 2, 3, 4, 6, 8)] if mid else \
                [(cf, split) for cf in (mid_cfgs or (base,)) for split in (2, 3, 4, 6, 7, 8)]
            for cfg, split in ([] if auto_only else sweep):
                LIB.tops_cuda_w4a16_dev_force(cfg, split)
                res.append((f"{cfg}/{split}", time_graph([launcher(a) for a in args])))
                res.append((f"{cfg}/{split}k", time_graph([launcher(a) for a in kil_args])))
            LIB.tops_cuda_w4a16_dev_force(-1, 0)
            log(f"{K}x{N} M={M}{'' if dtype == torch.float16 else ' bf16'}: " +
                " | ".join(f"{n} {t:.1f}" for n, t in res))
            del qws, args


def policy_sweep():
    """cluster scheduling policy of the split-K launches (tops_cuda_w4a16_dev_cluster_policy: 0
    default, 1 spread, 2 load balancing), automatic choice and forced splits, CUDA graphs"""
    fnc = LIB.tops_cuda_w4a16_linear

    def launcher(a):
        return lambda: fnc(ctypes.byref(a), *ws(), cur_stream())

    for K, N in [(4096, 4096), (8192, 8192), (14336, 4096), (28672, 4096), (8192, 28672)]:
        for M in (1, 4, 16, 64):
            c = make_case(M, K, N, 128, ZV2, False, False, torch.float16, seed=7)
            ncopy = max(2, min(32, (200 << 20) // (K * N // 2) + 1))
            qws = [c["qweight"]] + [c["qweight"].clone() for _ in range(ncopy - 1)]
            out = torch.empty(M, N, dtype=torch.float16, device="cuda")
            args = [make_args(c, out, qweight=q) for q in qws]
            forced = [(0 if M <= 8 else 1, s) for s in (4, 6, 7, 8)] if M <= 16 else [(10, s) for s in (2, 3, 4)]
            for policy in (0, 1, 2):
                LIB.tops_cuda_w4a16_dev_cluster_policy(policy)
                res = []
                for force in [(-1, 0)] + forced:
                    LIB.tops_cuda_w4a16_dev_force(*force)
                    t = time_graph([launcher(a) for a in args])
                    res.append(f"{'auto ' + str(last_cfg()) if force[0] < 0 else '%d/%d' % force} {t:.1f}")
                LIB.tops_cuda_w4a16_dev_force(-1, 0)
                log(f"policy {policy} {K}x{N} M={M}: " + " | ".join(res))
            LIB.tops_cuda_w4a16_dev_cluster_policy(0)
            del qws, args


def profile_cases(spec):
    """run a few cases twice each (for ncu): spec 'M:K:N:dtype:act:cfg:split[:kil],...' (kil: the
    k-interleaved qweight, the layout QuantLinear holds)"""
    for item in spec.split(","):
        M, K, N, dt, act, cfg, split, *kil = item.split(":")
        kil = kil == ["kil"]
        dt = {"f16": torch.float16, "bf16": torch.bfloat16}[dt]
        c = make_case(int(M), int(K), int(N), 128, ZV2, act == "1", False, dt, seed=9)
        out = torch.empty(int(M), int(N), dtype=dt, device="cuda")
        qk = prepack_kil(c["qweight"], int(K), int(N)) if kil else None  # (kept alive: a holds pointers)
        a = make_args(c, out, qweight=qk, kil=kil)
        LIB.tops_cuda_w4a16_dev_force(int(cfg), int(split))
        for _ in range(2):
            st = call(a)
            assert st == 0, st
        torch.cuda.synchronize()
        LIB.tops_cuda_w4a16_dev_force(-1, 0)
        log("profiled", item)


def main():
    global LIB, LOGF
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=os.path.join(ROOT, ".devbuild", "libw4.so"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, ".devbuild")))
    ap.add_argument("--log", default="w4a16_dev.log")
    ap.add_argument("--sweep", action="store_true", help="only the CUDA-graph sweep of small-M configs")
    ap.add_argument("--sweep-mid", action="store_true", help="only the CUDA-graph sweep for M = 32..256")
    ap.add_argument("--auto-only", action="store_true", help="sweeps: only the automatic choice")
    ap.add_argument("--shapes", default="", help="sweeps, --perm-sweep: K x N list (e.g. 4096x14336,8192x8192)")
    ap.add_argument("--dtype", default="f16", choices=["f16", "bf16"], help="sweeps: activation dtype")
    ap.add_argument("--mid-ms", default="", help="--sweep-mid, --perm-sweep: only these batch sizes (e.g. 64,128)")
    ap.add_argument("--cfgs", default="", help="correctness: the configs run forced (default: every "
                    "built-in one; a dev library may have more)")
    ap.add_argument("--mid-cfgs", default="", help="--sweep-mid: only these configs (e.g. 2,10)")
    ap.add_argument("--perm-sweep", action="store_true", help="only the perm-against-plain timing")
    ap.add_argument("--perm-small", action="store_true", help="only the perm timing at M = 1..8, large K")
    ap.add_argument("--kil", action="store_true", help="--perm-sweep / --perm-small: k-interleaved qweight")
    ap.add_argument("--policy-sweep", action="store_true", help="only the cluster scheduling policy sweep")
    ap.add_argument("--act-sweep", action="store_true", help="only the raw g_idx timing")
    ap.add_argument("--global-split", type=int, default=1, choices=[0, 1],
                    help="the small-batch tiles split K through the workspace (1, the default) or clusters (0)")
    ap.add_argument("--profile", default="", help="M:K:N:dtype:act:cfg:split[:kil],... run each twice (for ncu)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    LOGF = open(os.path.join(args.out, args.log), "w")
    if not torch.cuda.is_available():
        self_test_reference()
        self_test_prepack()
        print("no CUDA device: only the reference self-test ran")
        return 0
    if not os.path.exists(args.lib):
        build(args.lib)
    LIB = ctypes.CDLL(args.lib)
    LIB.tops_cuda_w4a16_linear.restype = ctypes.c_int
    LIB.tops_cuda_w4a16_linear.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    LIB.tops_cuda_w4a16_dev_force.argtypes = [ctypes.c_int, ctypes.c_int]
    LIB.tops_cuda_w4a16_dev_last.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    LIB.tops_cuda_w4a16_dev_pdl.argtypes = [ctypes.c_int]
    if hasattr(LIB, "tops_cuda_w4a16_dev_global_split"):  # (libraries built before it: no such hook)
        LIB.tops_cuda_w4a16_dev_global_split.argtypes = [ctypes.c_int]
        LIB.tops_cuda_w4a16_dev_global_split(args.global_split)
    LIB.tops_cuda_w4a16_dev_gather.argtypes = [ctypes.c_int]
    LIB.tops_cuda_w4a16_gather_x.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    LIB.tops_cuda_w4a16_workspace_bytes.restype = ctypes.c_size_t
    LIB.tops_cuda_w4a16_workspace_bytes.argtypes = [ctypes.c_void_p]
    LIB.tops_cuda_w4a16_dev_cluster_policy.argtypes = [ctypes.c_int]
    p = torch.cuda.get_device_properties(0)
    log(f"device: {p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, cuda {torch.version.cuda}")
    if args.profile:
        profile_cases(args.profile)
        return 0
    shapes = tuple(tuple(int(v) for v in kn.split("x")) for kn in args.shapes.split(",") if kn)
    mid_ms = tuple(int(m) for m in args.mid_ms.split(",") if m)
    if args.perm_sweep or args.perm_small:
        perm_sweep(small=args.perm_small, kil=args.kil,
                   ms=mid_ms, shapes=shapes)
    if args.policy_sweep:
        policy_sweep()
    if args.act_sweep:
        act_sweep()
    if args.sweep or args.sweep_mid:
        shapes = shapes or SWEEP_SHAPES
        if args.sweep:
            graph_sweep(auto_only=args.auto_only, dtype=SWEEP_DT[args.dtype], shapes=shapes,
                        mid_ms=mid_ms,
                        mid_cfgs=tuple(int(c) for c in args.mid_cfgs.split(",") if c))
        if args.sweep_mid:
            graph_sweep(mid=True, auto_only=args.auto_only, dtype=SWEEP_DT[args.dtype], shapes=shapes,
                        mid_ms=mid_ms,
                        mid_cfgs=tuple(int(c) for c in args.mid_cfgs.split(",") if c))
    if args.sweep or args.sweep_mid or args.perm_sweep or args.perm_small or args.policy_sweep or args.act_sweep:
        return 0
    self_test_reference()
    fails = 0
    if not args.no_check:
        t = time.time()
        fails = correctness(args.quick, tuple(int(c) for c in args.cfgs.split(",")) if args.cfgs else FORCED_CFGS)
        log(f"correctness took {time.time() - t:.1f} s")
    if not args.no_bench:
        torch.cuda.empty_cache()
        rows = benchmarks(args.quick)
        log("")
        log("| K x N | M | dtype | cfg/split | ours us | cuBLAS fp16 us | speedup | floor us | floor/ours |")
        log("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            sp = r["tc"] / r["t"] if r["tc"] == r["tc"] else float("nan")
            log(f"| {r['K']}x{r['N']} | {r['M']} | {r['dt']} | {r['cfg']}{' (sweep)' if r['tag'] else ''} | {r['t']:.1f} | "
                f"{r['tc']:.1f} | {sp:.2f} | {r['fl']:.1f} | {r['fl'] / r['t']:.2f} |")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
