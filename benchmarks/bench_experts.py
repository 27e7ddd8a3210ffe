"""An MoE layer's experts: torch_ops.UnfusedExperts (4-bit, one QuantLinear per expert and
projection) against the fused 16-bit experts of transformers 5 run by its eager loop
(torch_ops.reference.fused_experts), side by side in one run.

    python benchmarks/bench_experts.py                   # CUDA when present, else CPU
    python benchmarks/bench_experts.py --device cpu --threads 2

Median ms per call over --reps calls (each call reads its routing on the host, so no CUDA graph:
CUDA calls are timed one by one between synchronisations). Tokens are routed to k distinct random
experts with softmax weights (seed 0), x and the 16-bit weights in fp16 on CUDA, bf16 on CPU;
group 128, asymmetric zeros. Columns: the 16-bit fused experts, UnfusedExperts, the weights'
bytes of each, and the speed-up.
"""
import argparse
import statistics
import time

import torch
from torch import nn

import torch_ops
from torch_ops import reference as ref

# (experts, hidden, intermediate, top-k): Qwen3-30B-A3B's and Mixtral-8x7B's MoE layers on CUDA;
# a quarter of Qwen3's on the CPU
CUDA_SHAPES = [(128, 2048, 768, 8), (8, 4096, 14336, 2)]
CPU_SHAPES = [(32, 1024, 384, 8)]


class FusedExperts(nn.Module):
    """transformers 5's fused experts, as quantize_model finds them (fused_experts_layout)."""

    def __init__(self, E, H, I, dtype, device):
        super().__init__()
        self.has_gate, self.has_bias, self.is_concatenated = True, False, True
        self.has_post_expert_norm, self.is_transposed = False, False
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H, dtype=dtype, device=device) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(E, H, I, dtype=dtype, device=device) * 0.02)
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return ref.fused_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj,
                                 self.down_proj, self.act_fn)


def median_ms(fn, device, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tokens", default="1,16,256")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}, torch {torch.__version__}, x and 16-bit weights {dtype}, group 128")
    print("| experts x hidden x inter, top-k | tokens | 16-bit fused (ms) | UnfusedExperts (ms) | "
          "16-bit MB | 4-bit MB | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for E, H, I, k in CUDA_SHAPES if device == "cuda" else CPU_SHAPES:
        torch.manual_seed(0)
        fused = FusedExperts(E, H, I, dtype, device)
        unfused = torch_ops.UnfusedExperts.quantize_fused(fused, group_size=128)
        dense_mb = sum(t.numel() * t.element_size() for t in fused.parameters()) / 2**20
        quant_mb = sum(t.numel() * t.element_size() for t in unfused.buffers()) / 2**20
        for T in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(T, H, dtype=dtype, device=device)
            index = torch.rand(T, E, device=device).argsort(dim=-1)[:, :k]
            weights = torch.rand(T, k, device=device).softmax(dim=-1).to(dtype)
            with torch.no_grad():
                a = median_ms(lambda: fused(x, index, weights), device, args.reps)
                b = median_ms(lambda: unfused(x, index, weights), device, args.reps)
            print(f"| {E} x {H} x {I}, {k} | {T} | {a:.3f} | {b:.3f} | {dense_mb:.0f} | "
                  f"{quant_mb:.0f} | {a / b:.2f}x |")
        del fused, unfused
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
