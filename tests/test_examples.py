"""examples/lora.py on a small model: LoRA adapters over 4-bit layers learn, the 4-bit weights do
not move, and the per-sample gradients of torch.func equal autograd's, sample by sample."""
import importlib.util
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location(
    "lora_example", Path(__file__).resolve().parents[1] / "examples" / "lora.py")
lora = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lora)


def test_lora_example_learns_and_keeps_the_base(device):
    before, after, unchanged, model = lora.train(hidden=128, ffn=256, steps=100, batch=32,
                                                 device=device, log=lambda line: None)
    assert unchanged
    assert after < before / 3, (before, after)  # 5.3x lower on the CPU
    x, y = torch.randn(3, 128, device=device), torch.randn(3, 128, device=device)
    norms = lora.per_sample_grad_norms(model, x, y)
    params = [p for name, p in model.named_parameters() if name.endswith((".a", ".b"))]
    for i in range(3):
        loss = torch.nn.functional.mse_loss(model(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, params)
        expected = torch.sqrt(sum(g.square().sum() for g in grads))
        torch.testing.assert_close(norms[i], expected, rtol=1e-4, atol=1e-6)
