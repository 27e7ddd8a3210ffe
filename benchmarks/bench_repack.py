"""Repacking speed: torch_ops.awq_to_gptq / gptq_to_awq / pack_v2 / unpack_v2 against the seeds'
pure-torch algorithms (seed 003's AWQ -> GPTQ, seed 001's pack_v2) and the copy bandwidth of the
same device, in one run.

    python benchmarks/bench_repack.py [--device cpu|cuda] [--threads N] [--size 8192]

GB/s counts bytes read + bytes written once (the floor of a permutation); peak memory is the extra
device memory an op allocates beyond its inputs, relative to the output. On the CPU a fresh output
costs a page fault per 4 KB on first touch, which the "clone" row shows (slow in VMs).
"""
import argparse
import statistics
import time

import torch

import torch_ops
from torch_ops import reference as ref

REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]


def seed003_awq_to_gptq(qw):
    """The seeds' broadcasting algorithm: [K, N/8, 8] int32 intermediate, reorder, shifted sum."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qw.device)
    K, n8 = qw.shape
    v = (qw.unsqueeze(-1) >> shifts) & 15
    v = v[:, :, torch.tensor(REVERSE, device=qw.device)].reshape(K, n8 * 8)
    v = v.reshape(K // 8, 8, n8 * 8)
    return (v << shifts[None, :, None]).sum(dim=1, dtype=torch.int32)


def timeit(fn, device, reps):
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra(fn, device, out_bytes):
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / out_bytes


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-seeds", action="store_true", help="skip the slow seed algorithms")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev, K = a.device, a.size
    N = K
    G = 128
    qw = torch.randint(-2**31, 2**31, (K, N // 8), dtype=torch.int32, device=dev)
    qz = torch.randint(-2**31, 2**31, (K // G, N // 8), dtype=torch.int32, device=dev)
    gq, gz = torch_ops.awq_to_gptq(qw, qz)
    assert torch.equal(gq, seed003_awq_to_gptq(qw)), "awq_to_gptq disagrees with seed 003"
    u = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev)
    pv = torch_ops.pack_v2(u)
    if K <= 2048 or dev == "cuda":
        assert torch.equal(pv, ref.pack_v2(u)), "pack_v2 disagrees with seed 001"
    src = torch.empty(qw.numel() * 4, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)

    rows = [("copy (same bytes)", lambda: dst.copy_(src), 2 * src.numel(), src.numel()),
            # every op allocates its output: this is the floor of "copy into a new tensor"
            ("copy into a new tensor (clone)", lambda: src.clone(), 2 * src.numel(), src.numel())]
    wbytes = qw.numel() * 4
    gout = (torch.empty_like(gq), torch.empty_like(gz))
    aout = (torch.empty_like(qw), torch.empty_like(qz))
    rows += [
        ("awq_to_gptq", lambda: torch_ops.awq_to_gptq(qw, qz), 2 * (wbytes + qz.numel() * 4), wbytes),
        ("gptq_to_awq", lambda: torch_ops.gptq_to_awq(gq, gz), 2 * (wbytes + qz.numel() * 4), wbytes),
        # into reused outputs (out=): what a loader converting layer after layer of one shape
        # does; on a VM, first-touch page faults of fresh outputs otherwise dominate the CPU ops
        ("awq_to_gptq (out=, reused)", lambda: torch_ops.awq_to_gptq(qw, qz, out=gout),
         2 * (wbytes + qz.numel() * 4), wbytes),
        ("gptq_to_awq (out=, reused)", lambda: torch_ops.gptq_to_awq(gq, gz, out=aout),
         2 * (wbytes + qz.numel() * 4), wbytes),
        ("pack_v2", lambda: torch_ops.pack_v2(u), u.numel() * 3 // 2, u.numel() // 2),
        # the same kernel without reading back its range flag (no device sync)
        ("pack_v2 (check_range=False)", lambda: torch_ops.pack_v2(u, check_range=False),
         u.numel() * 3 // 2, u.numel() // 2),
        ("unpack_v2", lambda: torch_ops.unpack_v2(pv), u.numel() * 3 // 2, u.numel()),
    ]
    if not a.skip_seeds:
        rows += [("seed 003 awq->gptq (torch)", lambda: seed003_awq_to_gptq(qw), 2 * wbytes, wbytes),
                 ("seed 001 pack_v2 (torch)", lambda: ref.pack_v2(u), u.numel() * 3 // 2,
                  u.numel() // 2)]
    threads = torch.get_num_threads() if dev == "cpu" else "-"
    print(f"device={dev} ({torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads={threads}, {K} x {N}, group {G}")
    print(f"| op | time (us) | GB/s | of copy | extra memory / output |")
    print(f"|---|---|---|---|---|")
    copy_bw = None
    for name, fn, nbytes, out_bytes in rows:
        reps = a.reps if "seed" not in name else 1
        t = timeit(fn, dev, reps)
        bw = nbytes / t / 1e9
        copy_bw = copy_bw or bw
        mem = peak_extra(fn, dev, out_bytes)
        print(f"| {name} | {t * 1e6:,.1f} | {bw:,.1f} | {bw / copy_bw:.0%} | {mem:.2f} |")


if __name__ == "__main__":
    main()
