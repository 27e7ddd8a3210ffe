#!/usr/bin/env python3
"""The memory floor of a chain of weight-streaming kernels on this GPU: stream_probe.cu reads each
call's own buffer once, 48 calls per CUDA graph over rotating buffers (as benchmarks/timing.py
times the w4a16 linear), with and without programmatic dependent launch, for several grid sizes.
Prints us per call and GB/s; compare with bench_linear.py's w4a16 times for the same bytes.

    python3 benchmarks/stream_probe.py [--mb 8.7,34.8,121.6]
"""
import argparse
import ctypes
import os
import subprocess

import torch

from timing import time_graph

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", default="8.7,34.8,121.6", help="MB per call (4096^2, 8192^2, 8192x28672 int4 + scales)")
    ap.add_argument("--tiled", action="store_true",
                    help="only the column-tiled patterns of the small-batch GEMM (1 KB rows of a 256-column tile)")
    ap.add_argument("--lib", default=os.path.join(HERE, "..", ".devbuild", "libstream_probe.so"))
    args = ap.parse_args()
    if not os.path.exists(args.lib):
        os.makedirs(os.path.dirname(args.lib), exist_ok=True)
        subprocess.check_call(["nvcc", "-shared", "-Xcompiler", "-fPIC", "-O3", "-arch=sm_90", "-o", args.lib,
                               os.path.join(HERE, "stream_probe.cu")])
    lib = ctypes.CDLL(args.lib)
    lib.probe_launch.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                 ctypes.c_void_p]
    lib.probe_tiled.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int,
                                ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.zeros(8 * sms * 8, dtype=torch.int32, device="cuda")
    if args.tiled:
        return tiled(lib, out)
    print(f"device: {torch.cuda.get_device_name()}, {sms} SMs; us per call (GB/s), 48 calls per graph")
    print("| MB | blocks | PDL | no PDL |")
    print("|---|---|---|---|")
    for mb in (float(v) for v in args.mb.split(",")):
        nbytes = int(mb * 1e6) // 16 * 16
        ncopy = max(2, (400 << 20) // nbytes + 1)
        bufs = [torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(i) for i in range(ncopy)]
        for blocks in (sms, 2 * sms, 4 * sms, 8 * sms):
            res = []
            for pdl in (1, 0):
                def fn(b, pdl=pdl, blocks=blocks):
                    return lambda: lib.probe_launch(b.data_ptr(), nbytes, blocks, out.data_ptr(), pdl,
                                                    torch.cuda.current_stream().cuda_stream)
                t = time_graph([fn(b) for b in bufs])
                res.append(f"{t:.1f} ({nbytes / t / 1e3:,.0f})")
            print(f"| {mb} | {blocks} | {res[0]} | {res[1]} |", flush=True)
        del bufs


def tiled(lib, out):
    """the weight stream of the small-batch tiles (K/8 rows of N int32 words, 256-column tiles of 1 KB
    per row, split along the rows) against the same bytes laid out tile-major (each block's rows
    contiguous), with and without clusters of the splits"""
    print(f"device: {torch.cuda.get_device_name()}; us per call (GB/s), 48 calls per graph, PDL")
    print("| K x N | pattern | tiles x splits | depth | cluster | us (GB/s) |")
    print("|---|---|---|---|---|---|")
    for K, N, splits in ((8192, 8192, (6, 7, 8)), (14336, 4096, (6, 8)), (8192, 28672, (2, 1))):
        rows, row_bytes = K // 8, N * 4
        nbytes = rows * row_bytes
        bufs = [torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(i)
                for i in range(max(2, (400 << 20) // nbytes + 1))]
        tiles = N // 256
        for s in splits:
            for depth in (8, 16):
                for cluster in (0, 1):
                    # (row bytes, tile bytes): as stored ([K/8, N]), and tile-major ([N/256, K/8, 256])
                    for name, geo in (("GPTQ [K/8, N]", (row_bytes, 1024)),
                                      ("tile-major", (1024, rows * 1024))):
                        def fn(b, geo=geo, depth=depth, cluster=cluster, s=s):
                            return lambda: lib.probe_tiled(b.data_ptr(), rows, geo[0], 1024, geo[1], tiles, s, depth,
                                                           cluster, out.data_ptr(),
                                                           torch.cuda.current_stream().cuda_stream)
                        t = time_graph([fn(b) for b in bufs])
                        print(f"| {K} x {N} | {name} | {tiles} x {s} | {depth} | {cluster} | "
                              f"{t:.1f} ({nbytes / t / 1e3:,.0f}) |", flush=True)
        del bufs


if __name__ == "__main__":
    main()
