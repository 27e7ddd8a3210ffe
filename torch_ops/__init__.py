"""torch_ops: bit packing, AWQ <-> GPTQ repacking, quanto pack_v2 and a fused w4a16 linear as
PyTorch ops (``torch.ops.torch_ops.*``) with C (CPU) and CUDA kernels, plus the nn.Module, model
loading and checkpoint conversion built on them."""
from ._ops import (act_order_prepack, awq_to_gptq, convert_gptq_zeros, dequantize, gptq_to_awq,
                   pack, pack_v2, prepack_w4a16, quantize, unpack, unpack_v2, unprepack_w4a16,
                   w4a16_linear)
from .module import QuantLinear, UnfusedExperts, quantize_model
from .checkpoint import (CheckpointError, convert_checkpoint, inspect_checkpoint, load_quantized,
                         save_quantized)

__version__ = "0.1.0"

__all__ = [
    "pack", "unpack", "awq_to_gptq", "gptq_to_awq", "convert_gptq_zeros", "pack_v2", "unpack_v2",
    "dequantize", "quantize", "w4a16_linear", "prepack_w4a16", "unprepack_w4a16", "act_order_prepack",
    "QuantLinear", "UnfusedExperts", "quantize_model",
    "load_quantized", "save_quantized", "convert_checkpoint", "inspect_checkpoint",
    "CheckpointError",
]
