"""torch_ops end to end, on a small transformer-style model built here (no downloads).

1. build a float model (embedding, MLP blocks with RMSNorm and residuals, lm_head) and quantize it
   (4-bit, group 128, round to nearest) with torch_ops.quantize_model;
2. save it as an AWQ checkpoint folder (config.json + sharded safetensors) in a temporary folder;
3. convert it to GPTQ with the command line: ``python -m torch_ops convert ... --to gptq --verify``;
4. load the GPTQ checkpoint into a fresh float model with torch_ops.load_quantized;
5. run it eagerly and under torch.compile(fullgraph=True), report the error against the float model
   and the speed of float vs 4-bit, on the CPU (and on CUDA when there is one).

    python examples/demo.py                # about a minute on a 2-core CPU
    python examples/demo.py --no-compile   # skip torch.compile
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import torch_ops
from torch_ops.checkpoint import save_quantized


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


class MLPBlock(nn.Module):
    """A transformer block without attention: RMSNorm, SwiGLU MLP, residual."""

    def __init__(self, hidden, ffn):
        super().__init__()
        self.norm = RMSNorm(hidden)
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLM(nn.Module):
    def __init__(self, vocab=4096, hidden=768, ffn=2048, layers=4):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(MLPBlock(hidden, ffn) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def timed(fn, *args, device="cpu", min_runs=5, budget_s=1.0):
    """Median seconds of fn(*args) after two warm-up calls."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn(*args)
    sync()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn(*args)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_error(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def weight_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def speed_table(float_model, quant_model, device, dtype, batches):
    print(f"\nspeed on {device} ({dtype}), median per forward:")
    print(f"  {'tokens':>7} {'float':>11} {'4-bit':>11} {'speedup':>8}")
    fm = copy.deepcopy(float_model).to(device, dtype)
    qm = copy.deepcopy(quant_model).to(device)
    for tokens in batches:
        ids = torch.randint(0, fm.embed_tokens.num_embeddings, (1, tokens), device=device)
        tf = timed(fm, ids, device=device)
        tq = timed(qm, ids, device=device)
        print(f"  {tokens:>7} {tf * 1e3:>9.2f}ms {tq * 1e3:>9.2f}ms {tf / tq:>7.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    p.add_argument("--keep", metavar="DIR", help="write the checkpoints to DIR and keep them")
    args = p.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()

    float_model = TinyLM(hidden=args.hidden, ffn=args.ffn, layers=args.layers).eval()
    quantized = torch_ops.quantize_model(copy.deepcopy(float_model), group_size=args.group_size)
    n_quant = sum(isinstance(m, torch_ops.QuantLinear) for m in quantized.modules())
    print(f"model: {args.layers} MLP blocks, hidden {args.hidden}, ffn {args.ffn}; "
          f"{n_quant} Linear layers quantized to 4 bits (group {args.group_size}), "
          "lm_head kept float")
    print(f"weights: {weight_bytes(float_model) / 2**20:.1f} MiB float32 -> "
          f"{weight_bytes(quantized) / 2**20:.1f} MiB with 4-bit linears")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep).resolve() if args.keep else Path(tmp)  # (the command runs in it)
        awq_dir, gptq_dir = root / "tiny-awq", root / "tiny-gptq"
        config = {"model_type": "tiny-mlp-lm", "hidden_size": args.hidden,
                  "intermediate_size": args.ffn, "num_hidden_layers": args.layers}
        save_quantized(quantized, awq_dir, "awq", max_shard_bytes=8 * 2**20, config=config)
        print(f"\nsaved AWQ checkpoint: {awq_dir} "
              f"({len(list(awq_dir.glob('*.safetensors')))} shards)")

        cmd = [sys.executable, "-m", "torch_ops", "convert", str(awq_dir), str(gptq_dir),
               "--to", "gptq", "--verify"]
        print("$ python -m torch_ops convert", awq_dir.name, gptq_dir.name, "--to gptq --verify")
        # run in the checkpoints' folder: `python -m` puts the working directory first on sys.path,
        # and from a source tree (`python examples/demo.py` after a non-editable `pip install .`)
        # the command imported the tree's unbuilt torch_ops, not the installed one this process runs
        subprocess.run(cmd, check=True, cwd=root)
        subprocess.run([sys.executable, "-m", "torch_ops", "inspect", str(gptq_dir)], check=True,
                       cwd=root)
        qc = json.loads((gptq_dir / "config.json").read_text())["quantization_config"]

        model = TinyLM(hidden=args.hidden, ffn=args.ffn, layers=args.layers).eval()
        torch_ops.load_quantized(model, gptq_dir)
        n_loaded = sum(isinstance(m, torch_ops.QuantLinear) for m in model.modules())
        print(f"\nloaded {qc['quant_method']} checkpoint into a fresh model: "
              f"{n_loaded} QuantLinear layers")
        print(" ", model.layers[0].down_proj)

    ids = torch.randint(0, 4096, (4, 64))
    with torch.inference_mode():
        ref = float_model(ids)
        eager = model(ids)
        same = torch.equal(eager, quantized(ids))
        print(f"\nlogits error vs the float model (relative L2): {rel_error(eager, ref):.4f}; "
              f"top-1 agreement {float((eager.argmax(-1) == ref.argmax(-1)).float().mean()):.1%}")
        print(f"loaded GPTQ model == in-memory quantized model (bit for bit): {same}")
        if not args.no_compile:
            torch._dynamo.reset()
            t0 = time.perf_counter()
            compiled = torch.compile(model, fullgraph=True)
            out = compiled(ids)
            print(f"torch.compile(fullgraph=True): compiled in {time.perf_counter() - t0:.1f}s, "
                  f"max |compiled - eager| = {float((out - eager).abs().max()):.2e}; on this "
                  f"{tuple(ids.shape)} batch: eager {timed(model, ids) * 1e3:.1f}ms, "
                  f"compiled {timed(compiled, ids) * 1e3:.1f}ms")

        threads = torch.get_num_threads()
        speed_table(float_model, model, "cpu", torch.float32, [1, 16, 128])
        print(f"  (float32 activations, {threads} threads; 4-bit weights, fp16 scales)")
        if torch.cuda.is_available():
            speed_table(float_model, model.half(), "cuda", torch.float16, [1, 16, 128, 1024])
    print(f"\ndone in {time.perf_counter() - t_start:.1f}s")


if __name__ == "__main__":
    main()
