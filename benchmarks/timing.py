"""CUDA-graph timing shared by the benchmarks: the way an inference engine runs a decode step
(calls back to back in one graph, no launch gaps) over rotating inputs, so that the weights of
one call are not left in the 50 MB L2 by the previous one."""
import statistics

import torch

GRAPH_CALLS = 48


def time_graph(fns, calls=GRAPH_CALLS):
    """median us per call of fns[i % len(fns)](), replayed from one CUDA graph of up to `calls`
    calls (fewer, and fewer replays, for slow ones: a few ms per replay is plenty)"""
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for f in fns:
        f()
    e0.record()
    fns[0]()
    e1.record()
    e1.synchronize()
    est = e0.elapsed_time(e1) * 1e3
    calls = max(len(fns), min(calls, int(4000 / max(est, 1.0)) + 1))
    reps = 15 if est < 1000 else 5
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    # warm up for about 100 ms: after an idle stretch (a correctness check on the CPU) the GPU
    # clocks take a while to come back, which showed as the first row of each shape running slow
    e0.record()
    g.replay()
    e1.record()
    e1.synchronize()
    for _ in range(max(2, int(100e3 / max(e0.elapsed_time(e1) * 1e3, 1.0)))):
        g.replay()
    ts = []
    for _ in range(reps):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3 / calls)
    del g
    return statistics.median(ts)
