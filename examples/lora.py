"""LoRA fine-tuning over a frozen 4-bit base, on data made here (no downloads).

1. a float model (MLP blocks with residuals), quantized in place (torch_ops.quantize_model: every
   nn.Linear becomes a QuantLinear, 4-bit, group 128), and a target to learn: a float copy whose
   weights are the 4-bit ones plus a low-rank change (what a fine-tune would teach);
2. a LoRA adapter (rank r, B = 0 at the start) beside each QuantLinear;
3. the adapters trained with AdamW to match the target, under torch.autocast (bf16 on the CPU,
   fp16 on CUDA; --no-autocast for fp32): gradients cross the 4-bit layers through
   w4a16_linear's autograd, and the 4-bit weights stay as they were;
4. with --per-sample, the per-sample gradient norms of the adapters through torch.func
   (vmap of grad over functional_call), as differential privacy or data attribution need them.

    python examples/lora.py                  # about 15 s on a 2-core CPU
    python examples/lora.py --per-sample
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import torch_ops


class Block(nn.Module):
    def __init__(self, hidden, ffn):
        super().__init__()
        self.up = nn.Linear(hidden, ffn)
        self.down = nn.Linear(ffn, hidden)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class LoRA(nn.Module):
    """y = base(x) + scale * (x @ A^T) @ B^T, with the base frozen; B starts at 0, so training
    starts from the base's output exactly."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.a.t().to(x.dtype)) @ self.b.t().to(x.dtype)


def add_lora(model: nn.Module, rank: int, alpha: float) -> list:
    """A LoRA beside every QuantLinear of model (in place); returns the adapters' parameters."""
    params = []
    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, torch_ops.QuantLinear):
                lora = LoRA(child, rank, alpha).to(next(child.buffers()).device)
                setattr(m, child_name, lora)
                params += [lora.a, lora.b]
    return params


def train(hidden=256, ffn=512, layers=2, rank=8, steps=200, batch=64, lr=3e-3, autocast=True,
          device="cpu", seed=0, log=print):
    """Returns the eval loss before and after, whether the 4-bit layers' tensors are unchanged,
    and the model (with its adapters)."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[Block(hidden, ffn) for _ in range(layers)]).to(device)
    target = copy.deepcopy(model)
    torch_ops.quantize_model(model, group_size=128)
    with torch.no_grad():  # the target: the 4-bit weights plus a rank-4 change of 10% of their scale
        for name, q in model.named_modules():
            if isinstance(q, torch_ops.QuantLinear):
                w = q.dequantize().float()
                u, v = torch.randn(w.shape[0], 4, device=device), torch.randn(4, w.shape[1], device=device)
                target.get_submodule(name).weight.copy_(w + 0.1 * w.std() * (u @ v) / 2)
    for p in model.parameters():
        p.requires_grad_(False)  # the biases kept by QuantLinear, if any
    quantized = [m for m in model.modules() if isinstance(m, torch_ops.QuantLinear)]
    frozen = [{k: v.clone() for k, v in m.state_dict().items()} for m in quantized]
    params = add_lora(model, rank, alpha=2 * rank)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    x_eval = torch.randn(256, hidden, device=device)
    with torch.no_grad():
        y_eval = target(x_eval)

    def eval_loss():
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(x_eval).float(), y_eval).item()

    before = eval_loss()
    log(f"LoRA rank {rank} over {sum(isinstance(m, LoRA) for m in model.modules())} 4-bit layers "
        f"({hidden} x {ffn} x {layers} blocks), {sum(p.numel() for p in params):,} trainable "
        f"parameters, autocast {dtype if autocast else 'off'}, {device}")
    log(f"step    0: eval loss {before:.4e}")
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x = torch.randn(batch, hidden, device=device)
        with torch.no_grad():
            y = target(x)
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 4) == 0 or step == steps:
            log(f"step {step:4d}: train loss {loss.item():.4e}, eval loss {eval_loss():.4e}")
    log(f"{steps} steps in {time.perf_counter() - t0:.1f} s")
    after = eval_loss()
    unchanged = all(torch.equal(m.state_dict()[k], v)
                    for m, state in zip(quantized, frozen) for k, v in state.items())
    return before, after, unchanged, model


def per_sample_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The norm of each sample's gradient with respect to the adapters (torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters() if k.endswith((".a", ".b"))}

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return torch.nn.functional.mse_loss(out, yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-autocast", action="store_true")
    p.add_argument("--per-sample", action="store_true",
                   help="also print per-sample gradient norms (torch.func)")
    args = p.parse_args()
    before, after, unchanged, model = train(args.hidden, args.ffn, args.layers, args.rank,
                                            args.steps, autocast=not args.no_autocast,
                                            device=args.device)
    print(f"eval loss {before:.4e} -> {after:.4e} ({before / after:.1f}x lower); "
          f"4-bit weights unchanged: {unchanged}")
    if args.per_sample:
        x = torch.randn(8, args.hidden, device=args.device)
        norms = per_sample_grad_norms(model, x, torch.zeros_like(x))
        print("per-sample gradient norms:", " ".join(f"{v:.3e}" for v in norms.tolist()))


if __name__ == "__main__":
    main()
