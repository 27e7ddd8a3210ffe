"""``QuantLinear``: a drop-in for ``nn.Linear`` holding 4-bit weights, and ``quantize_model``.

Whatever a layer is built or loaded from (AWQ tensors, GPTQ tensors with v1 or v2 zeros, a float
``nn.Linear``), it keeps one canonical form, the GPTQ layout with v1 zeros (FORMATS.md section 3):

    qweight [K/8, N] int32   qzeros [K/G, N/8] int32 (v1: z - 1 per nibble)   scales [K/G, N]
    g_idx   [K] int32, only for act-order (None otherwise)                     bias [N] or None

An act-order layer whose groups all have group_size rows (GPTQ desc_act) is prepacked at load
(``torch_ops.act_order_prepack``): qweight is kept with its rows sorted by group, and a
non-persistent buffer ``perm`` [K] int32 permutes the activations instead (inside the op), because the kernels'
per-row g_idx lookup is up to 2.7x slower on the GPU (H100, M <= 16). ``perm`` is None otherwise. The prepack is
invisible from outside: ``state_dict()``, ``to_gptq()`` and ``dequantize()`` give the checkpoint's
row order. (So ``torch.func.functional_call`` takes ``named_buffers()``, the tensors the layer
computes with, not ``state_dict()``, whose qweight would be read with the sorted rows' perm.)

A row-parallel (tensor-parallel) shard of an act-order layer (``num_groups=``, see QuantLinear)
holds its rows of qweight [K_shard/8, N] and g_idx [K_shard] beside the whole layer's qzeros and
scales [num_groups, ...]; it keeps qweight [K_shard/8, N] and always passes g_idx to the op.

Every layer with plain or prepacked groups (K a multiple of 32; the group size a power of two
from 32, or the whole K) keeps its qweight k-interleaved (``torch_ops.prepack_w4a16``, int32 [K/32, 4, N]), the layout the CUDA
kernels read fastest (H200: 2-10% at every batch size); ``kinterleave=False`` keeps [K/8, N].
That too is invisible from outside: state dicts and exports are GPTQ.

All of them are buffers, so ``.to()``, ``.cuda()``, ``state_dict()`` and ``load_state_dict()``
work as for any module (``.double()`` too, as for a whole model, but the kernels take float32,
float16 or bfloat16 scales: forward, ``load_state_dict`` and ``save_quantized`` refuse float64
ones, by name, until ``.float()`` or ``.half()`` brings them back). ``forward`` is a single
call to ``torch_ops.w4a16_linear`` (given ``perm`` when prepacked): no host sync, no Python
branching on tensor values, so it traces under ``torch.compile(fullgraph=True)`` and replays in
CUDA graphs.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import operator
import re
import sys
import warnings
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from . import _ops
from .reference import group_len

__all__ = ["QuantLinear", "UnfusedExperts", "quantize_model"]

BITS = 4
PACK = 32 // BITS  # 4-bit values per int32 word
ZERO_FORMATS = ("v1", "v2")
STORED_ZERO_FORMAT = "v1"  # the zero format of the qzeros buffer, whatever was loaded
_QUANT_KEYS = ("qweight", "qzeros", "scales")
_KEYS = _QUANT_KEYS + ("g_idx", "bias")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # of scales and bias (the op's)
_SCALES_DTYPES = "torch.float16, torch.bfloat16, torch.float32 or None"  # (quantize's scales_dtype)
_ZERO_FORMAT_METADATA = "gptq_zero_format"  # per-module state-dict metadata: the saved qzeros' format
# load_state_dict warns of v2 zeros under a v1 label (see v2_zeros_read_as_v1) unless this is
# False: load_quantized, which warns once for the whole checkpoint, naming the folder
_WARN_V2_ZEROS = contextvars.ContextVar("torch_ops_warn_v2_zeros", default=True)


def _shape(t) -> list:
    return list(t.shape)


def _check_tensor(t, what: str, dims=None, layout: str = "") -> None:
    """Raise ValueError naming ``what`` unless ``t`` is a torch.Tensor (of ``dims`` dimensions):
    None, a numpy array or a list failed later with an AttributeError or IndexError."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor{layout}, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{what} must be a {dims}-D tensor{layout}, got shape {_shape(t)}")


def _check_float_dtype(dtype, what: str) -> None:
    """ValueError naming ``what`` unless ``dtype`` is one of scales and bias the op computes in."""
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what} must be float16, bfloat16 or float32, got {dtype}")


def _check_zero_format(zero_format: str, what: str) -> str:
    if zero_format not in ZERO_FORMATS:
        raise ValueError(f"{what} must be one of {ZERO_FORMATS}, got {zero_format!r}")
    return zero_format


def check_dims(in_features: int, out_features: int, group_size: int, what: str = "QuantLinear",
               row_shard: bool = False):
    """Raise ValueError unless a [out_features, in_features] weight fits the 4-bit GEMM layouts.
    ``row_shard``: the rows of an act-order layer, grouped by their g_idx, so in_features need not
    be a multiple of group_size."""
    K, N = in_features, out_features
    problems = []
    if K <= 0 or K % PACK:
        problems.append(f"in_features must be a positive multiple of {PACK}")
    if N <= 0 or N % PACK:
        problems.append(f"out_features must be a positive multiple of {PACK}")
    if row_shard:
        if group_size <= 0:
            problems.append("group_size must be positive for a row shard (num_groups given)")
    elif group_size != -1 and (group_size <= 0 or K % group_size):
        problems.append("group_size must be -1 or a positive divisor of in_features")
    if problems:
        raise ValueError(f"{what}: in_features={K}, out_features={N}, group_size={group_size}: "
                         + "; ".join(problems))


# g_idx dtypes taken (stored as int32); torch's uint16/32/64 lack the min/max the range check needs
_G_IDX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def checked_g_idx(g_idx: torch.Tensor, groups: int, where: str,
                  groups_are: str = "K/G groups", values_needed: bool = True) -> torch.Tensor:
    """g_idx as int32 after checking its dtype and that its values lie in [0, groups). The range
    is read before narrowing: to(torch.int32) wraps an int64 2**32 + g to g, which would pass.
    ``values_needed=False``: a meta g_idx is taken unchecked (it has no values)."""
    if g_idx.dtype not in _G_IDX_DTYPES:
        raise ValueError(f"{where}g_idx must be an integer tensor of group indices (int32, or "
                         f"int8/uint8/int16/int64), got {g_idx.dtype}")
    fake = isinstance(g_idx, torch._subclasses.fake_tensor.FakeTensor)
    if (g_idx.is_meta or fake) and g_idx.numel():  # (its values decide: act-order, prepack)
        if not values_needed:
            return g_idx.to(torch.int32)
        # (int() raised, on a fake tensor torch's DataDependentOutputException naming nothing)
        raise ValueError(f"{where}g_idx is " + ("a fake tensor (FakeTensorMode)" if fake else
                                                "on the meta device")
                         + ": its values (act-order or not) are needed to load it; load a "
                         "materialised g_idx")
    if g_idx.numel():
        lo, hi = int(g_idx.min()), int(g_idx.max())
        if lo < 0 or hi >= groups:
            raise ValueError(f"{where}g_idx values must lie in [0, {groups}) ({groups_are}), got "
                             f"values in [{lo}, {hi}]")
    return g_idx.to(torch.int32)


def trivial_g_idx(K: int, group_size: int, device=None) -> torch.Tensor:
    """The g_idx of a layer without act-order: ``arange(K) // group_size`` as int32."""
    return (torch.arange(K, device=device) // group_len(K, group_size)).to(torch.int32)


class QuantLinear(nn.Module):
    """4-bit weight-only linear layer: ``y = x @ dequantize().T + bias``, by ``w4a16_linear``.

    ``dtype`` (fp16, bf16 or fp32) and ``device``: of the scales and bias it holds (the integer
    tensors are int32 on ``device``). ``kinterleave``: hold qweight k-interleaved
    (``prepack_w4a16``, [K/32, 4, N]) where the layer allows it (K a multiple of 32, the group
    size a power of two from 32 or the whole K, no act-order g_idx left after
    ``act_order_prepack``; see the module's docstring), the faster form on CUDA; its state dict
    holds the checkpoint's layout whichever it holds.

    ``checkpoint_zero_format`` ("v1" or "v2") is the zero format of the GPTQ state dicts this module
    reads and writes (``load_state_dict`` / ``state_dict``); GPTQ checkpoints are v1 unless their
    config says ``gptq_v2``. ``state_dict`` also records the format in the state dict's metadata, and
    ``load_state_dict`` follows that record where there is one (``torch.save`` keeps it; safetensors
    and plain dicts do not). AWQ state dicts are recognised by the shape of ``qweight``. GPTQ qzeros
    loaded as v1 whose every word is 0x88888888 (zero points of 9: v2 zeros under a v1 label,
    ``v2_zeros_read_as_v1``) load as v1 all the same, with a warning.

    ``num_groups`` makes the layer a row-parallel (tensor-parallel) shard of an act-order layer, as
    a rank of a row-parallel Linear holds it (vLLM#7374): ``in_features`` of its rows (any multiple
    of 8, not necessarily of ``group_size``), qweight [in_features/8, N] and g_idx [in_features]
    its rows', qzeros [num_groups, N/8] and scales [num_groups, N] the whole layer's (groups
    scattered over K cannot be split by rank). ``num_groups`` is any count >= 1 (a shard's rows may
    name any of the layer's groups; the g_idx loaded must lie in [0, num_groups)), with a positive
    ``group_size`` (a shard of a group_size=-1 layer is a plain layer: no num_groups). Such a
    layer must load a g_idx (GPTQ tensors only: AWQ has none), which it keeps even where it looks
    plain (its rows cannot be grouped by k // group_size), and it holds qweight in the GPTQ
    layout, neither prepacked nor k-interleaved: forward passes g_idx to ``w4a16_linear``. The
    shards' outputs (the bias on one of them) sum to the layer's. ``from_gptq`` infers
    ``num_groups`` from the scales of such tensors. ``num_groups = in_features / group_size``
    (all the layer's rows, tensor parallelism of 1) builds a whole layer (``row_shard`` false).
    """

    bits = BITS
    # (a class default too: a QuantLinear pickled whole before num_groups existed has none)
    _num_groups = None
    # (likewise, one pickled before kinterleave existed, which holds qweight [K/8, N]: its next
    # load raised AttributeError "'QuantLinear' object has no attribute 'kinterleave'" outside
    # load_state_dict's report; it now loads as a layer built today does, k-interleaved)
    kinterleave = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = 128, *, dtype: torch.dtype = torch.float16, device=None,
                 checkpoint_zero_format: str = "v1", kinterleave: bool = True,
                 num_groups: int | None = None):
        super().__init__()
        # (integers, numpy's included, as int: a float group_size raised TypeError "unsupported
        # operand type(s) for &" from _kinterleave_ok, None "'<=' not supported", True built a
        # layer whose forward then refused it; with num_groups, 128.0 built a row shard of a whole
        # layer, the check for num_groups = in_features / group_size passing over it)
        in_features, out_features, group_size = (
            _ops._int("QuantLinear", arg, v) for arg, v in (
                ("in_features", in_features), ("out_features", out_features),
                ("group_size", group_size)))
        # (None, as for nn.Linear: torch's default dtype; int32 or float64 built a layer whose
        # forward the op refused)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        _check_float_dtype(dtype, "QuantLinear: dtype")
        self.kinterleave = bool(kinterleave)  # keep qweight k-interleaved where the layer allows
        if num_groups is not None:
            # (bool is an int: True would be one group; a numpy integer is taken as
            # in_features and group_size are)
            if (not isinstance(num_groups, (bool, torch.Tensor))
                    and hasattr(type(num_groups), "__index__")):
                num_groups = operator.index(num_groups)
            if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
                raise ValueError(f"QuantLinear: num_groups (the groups of the whole layer's scales "
                                 f"and qzeros, for a row shard) must be an int >= 1, got "
                                 f"{num_groups!r}")
            if group_size == -1:
                raise ValueError(
                    "QuantLinear: num_groups is for a row shard of a grouped act-order layer; with "
                    "group_size=-1 (one group) a shard of its rows is a plain layer: leave "
                    f"num_groups out (got num_groups={num_groups})")
            if group_size > 0 and num_groups * group_size < in_features:
                # (a shard's rows are some of its layer's, of at most num_groups * group_size)
                raise ValueError(
                    f"QuantLinear: num_groups={num_groups} groups of group_size={group_size} "
                    f"cover {num_groups * group_size} rows, fewer than in_features={in_features}: "
                    "a row shard holds some of the rows of a layer of num_groups groups")
            if (group_size > 0 and in_features % group_size == 0
                    and num_groups == in_features // group_size):
                # all the layer's rows (tensor parallelism of 1: a loader that always passes
                # num_groups): a whole layer, whose act-order rows are prepacked (several times
                # faster on CUDA than forward through g_idx)
                num_groups = None
        self._num_groups = num_groups  # None: in_features // group_size (not a row shard)
        check_dims(in_features, out_features, group_size, row_shard=num_groups is not None)
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.checkpoint_zero_format = checkpoint_zero_format  # (checked by its setter)
        self.loaded_from = None  # "awq", "gptq" or "linear" once weights were put in
        K, N, ng = in_features, out_features, self.num_groups
        # (already in the layout loads will give it: they then copy into this storage)
        qshape = (K // 32, 4, N) if self._kinterleave_ok() else (K // PACK, N)
        self.register_buffer("qweight", torch.zeros(qshape, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(ng, N // PACK, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(ng, N, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)
        # (after bias: torch.export (2.13) fails on two None buffers followed by a tensor one)
        # a row shard's rows are always read through g_idx (loads must give one): held from the
        # start (zeros: every row in group 0) as qweight is, so that a shard not loaded yet runs
        # (bias only) and gives a state dict that loads, as a whole layer does; without it its
        # forward and dequantize read scales as [K/group_size, N] and raised ("K = 136 must be a
        # multiple of group_size"), and its state dict lacked the g_idx that loading one needs
        self.register_buffer("g_idx", torch.zeros(K, dtype=torch.int32, device=device)
                             if self.row_shard else None)
        self.register_buffer("perm", None, persistent=False)  # derived from g_idx at load

    # ------------------------------------------------------------------ properties
    @property
    def checkpoint_zero_format(self) -> str:
        """The zero format ("v1" or "v2") of the GPTQ state dicts this layer reads and writes."""
        # kept in __dict__ under its own name, where layers pickled before it was a property
        # hold it: the property, a data descriptor, is looked up first all the same
        return self.__dict__["checkpoint_zero_format"]

    @checkpoint_zero_format.setter
    def checkpoint_zero_format(self, value: str) -> None:
        # (checked here, not first by state_dict(), which failed inside convert_gptq_zeros
        # without naming the attribute)
        self.__dict__["checkpoint_zero_format"] = _check_zero_format(
            value, "QuantLinear: checkpoint_zero_format")

    @property
    def num_groups(self) -> int:
        """The rows of scales and qzeros: the whole layer's groups for a row shard."""
        if self._num_groups is not None:
            return self._num_groups
        return 1 if self.group_size == -1 else self.in_features // self.group_size

    @property
    def row_shard(self) -> bool:
        """A row-parallel shard of an act-order layer (built with ``num_groups``)."""
        return self._num_groups is not None

    @property
    def act_order(self) -> bool:
        return self.g_idx is not None

    @property
    def symmetric(self) -> bool:
        """Every zero point is 8 (GPTQ's ``sym``: the weights are q * s - 8 s)."""
        return zero_points_all_eight(self.qzeros, STORED_ZERO_FORMAT)

    @property
    def kinterleaved(self) -> bool:
        """qweight is held k-interleaved ([K/32, 4, N], ``torch_ops.prepack_w4a16``)."""
        return self.qweight.dim() == 3

    def _kinterleave_ok(self) -> bool:
        """k-interleaved where the fast CUDA tiles read it: whole 32-k blocks and plain groups (one
        group, or a power of two: a group of 96 or 160 is a valid prepack, but only the generic
        CUDA kernel reads it, while [K/8, N] takes the act-order tiles, several times faster)"""
        gs = self.group_size
        # (a row shard reads g_idx, for which the op takes the GPTQ layout only)
        return (self.kinterleave and not self.row_shard and self.in_features % 32 == 0
                and (gs == -1 or gs == self.in_features or (gs >= 32 and gs & (gs - 1) == 0)))

    def _expected(self) -> dict:
        K, N, ng = self.in_features, self.out_features, self.num_groups
        return {"gptq": [K // PACK, N], "awq": [K, N // PACK], "qzeros": [ng, N // PACK],
                "scales": [ng, N], "g_idx": [K], "bias": [N]}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_awq(cls, qweight, qzeros, scales, bias=None, group_size=128):
        """From AutoAWQ "gemm" tensors: qweight [K, N/8], qzeros [K/G, N/8], scales [K/G, N]."""
        _check_tensor(qweight, "from_awq: qweight", 2, " [K, N/8]")
        _check_tensor(scales, "from_awq: scales")
        # (its dtype is the layer's: checked here, where the constructor's error would name dtype)
        _check_float_dtype(scales.dtype, "from_awq: scales")
        K, N = qweight.shape[0], qweight.shape[1] * PACK
        layer = cls(K, N, bias=bias is not None, group_size=group_size, dtype=scales.dtype,
                    device=qweight.device)
        layer._put_quantized("awq", qweight, qzeros, scales, None, None, "from_awq: ", assign=False)
        if bias is not None:
            layer._put("bias", layer._checked("bias", bias, "from_awq: "), assign=False)
        return layer

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, g_idx=None, bias=None, group_size=128,
                  zero_format="v1"):
        """From GPTQ tensors: qweight [K/8, N], qzeros [K/G, N/8] (v1 or v2 zeros), scales [K/G, N].

        A g_idx equal to ``arange(K) // group_size`` is dropped; another one (act-order) is kept.
        With a g_idx, tensors whose scales hold other than K / group_size groups (or K not a
        multiple of group_size), enough to cover K rows, are a row shard of an act-order layer:
        the layer is built with ``num_groups = scales.shape[0]`` (see QuantLinear)."""
        _check_zero_format(zero_format, "from_gptq: zero_format")
        _check_tensor(qweight, "from_gptq: qweight", 2, " [K/8, N]")
        _check_tensor(scales, "from_gptq: scales")
        # (its dtype is the layer's: checked here, where the constructor's error would name dtype)
        _check_float_dtype(scales.dtype, "from_gptq: scales")
        # (a numpy integer as an int: the row-shard test below took np.int64(64) for no group
        # size and refused a shard, blaming its shape)
        group_size = _ops._int("from_gptq", "group_size", group_size)
        K, N = qweight.shape[0] * PACK, qweight.shape[1]
        num_groups = None
        if (g_idx is not None and isinstance(group_size, int) and group_size > 0
                and scales.dim() == 2 and (K % group_size or scales.shape[0] != K // group_size)
                # (a shard's rows are at most its layer's: scales of fewer groups than its rows
                # fill are a whole layer's of the wrong shape, or of another group_size)
                and scales.shape[0] * group_size >= K):
            num_groups = scales.shape[0]  # a row shard: the whole layer's groups
            if (isinstance(qzeros, torch.Tensor) and qzeros.dim() == 2
                    and qzeros.shape[0] != num_groups):
                # (which of the two is wrong is not known: the message names both)
                whole = (f"in_features / group_size = {K // group_size} for a whole layer "
                         f"(in_features={K}, group_size={group_size}), or " if K % group_size == 0
                         else "")
                raise ValueError(
                    f"from_gptq: scales has {num_groups} rows (groups) and qzeros "
                    f"{qzeros.shape[0]}; both must have {whole}the whole layer's number of groups "
                    "for a row shard of an act-order layer")
        layer = cls(K, N, bias=bias is not None, group_size=group_size, dtype=scales.dtype,
                    device=qweight.device, checkpoint_zero_format=zero_format,
                    num_groups=num_groups)
        layer._put_quantized("gptq", qweight, qzeros, scales, g_idx, zero_format, "from_gptq: ",
                             assign=False)
        if bias is not None:
            layer._put("bias", layer._checked("bias", bias, "from_gptq: "), assign=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, sym: bool = False,
                    scales_dtype: torch.dtype | None = None):
        """Round-to-nearest quantization of a float ``nn.Linear`` (via ``torch_ops.quantize``;
        ``scales_dtype`` as there: torch.float32 for weights whose groups overflow fp16 scales)."""
        # (a Conv1d raised "too many values to unpack", None AttributeError, a str group_size
        # "'<=' not supported" from check_dims: none named from_linear or the argument)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        group_size = _ops._int("from_linear", "group_size", group_size)
        N, K = linear.weight.shape
        check_dims(K, N, group_size, what=f"from_linear({linear})")
        if linear.weight.is_meta:
            raise ValueError(f"from_linear({linear}): the weight is on the meta device (not "
                             "materialised); load or materialise it first")
        q = _ops.quantize(linear.weight.detach(), bits=BITS, group_size=group_size, sym=sym,
                          format="gptq", zero_format=STORED_ZERO_FORMAT, scales_dtype=scales_dtype)
        bias = linear.bias
        if bias is not None:  # (a float64 Linear: its bias in the scales' dtype, which the op takes)
            bias = bias.detach().to(bias.dtype if bias.dtype in _FLOAT_DTYPES else q["scales"].dtype)
        # (no g_idx: quantize's is arange(K) // group_size, which the layer drops; reading it to
        # find that out failed under FakeTensorMode, where the layer's shapes are all there is)
        layer = cls.from_gptq(q["qweight"], q["qzeros"], q["scales"],
                              bias=bias, group_size=group_size, zero_format=STORED_ZERO_FORMAT)
        layer.loaded_from = "linear"
        return layer

    # ------------------------------------------------------------------ export
    def to_awq(self) -> dict:
        """AWQ "gemm" tensors: dict(qweight [K, N/8], qzeros [K/G, N/8], scales[, bias])."""
        if self.row_shard:
            raise ValueError(
                f"to_awq: this layer ({self.in_features}->{self.out_features}) is a row shard of "
                f"an act-order layer (num_groups={self.num_groups}): its rows are grouped by its "
                "g_idx, which AWQ has not. Export it with to_gptq() instead.")
        if self.act_order:
            raise ValueError(
                f"to_awq: this layer ({self.in_features}->{self.out_features}) uses act-order "
                "(its g_idx is not arange(K) // group_size); AWQ has no g_idx and cannot express "
                "it. Export it with to_gptq() instead.")
        qweight, qzeros = _ops.gptq_to_awq(self._gptq_qweight(), self.qzeros,
                                           zero_format=STORED_ZERO_FORMAT)
        out = {"qweight": qweight, "qzeros": qzeros, "scales": self.scales.clone()}
        if self.bias is not None:
            out["bias"] = self.bias.clone()
        return out

    def to_gptq(self, zero_format: str = "v1") -> dict:
        """GPTQ tensors: dict(qweight [K/8, N], qzeros [K/G, N/8] in ``zero_format``, scales,
        g_idx [K] int32[, bias]); g_idx is ``arange(K) // group_size`` unless act-order."""
        _check_zero_format(zero_format, "to_gptq: zero_format")
        g_idx = self.g_idx if self.act_order else trivial_g_idx(
            self.in_features, self.group_size, self.qweight.device)
        out = {"qweight": self._gptq_qweight(), "qzeros": self._qzeros_as(zero_format),
               "scales": self.scales.clone(), "g_idx": g_idx.clone()}
        if self.bias is not None:
            out["bias"] = self.bias.clone()
        return out

    def dequantize(self) -> torch.Tensor:
        """The float weight [N, K] (nn.Linear orientation) in the dtype of ``scales``."""
        return _ops.dequantize(self._gptq_qweight(), self.scales, self.qzeros, format="gptq",
                               bits=BITS, group_size=self.group_size, g_idx=self.g_idx,
                               zero_format=STORED_ZERO_FORMAT)

    def _gptq_qweight(self) -> torch.Tensor:
        """A copy of qweight in the checkpoint's layout and row order (the k-interleave or the
        act-order prepack undone)."""
        qweight = _ops.unprepack_w4a16(self.qweight) if self.kinterleaved else self.qweight
        if self.perm is None:
            return qweight if self.kinterleaved else qweight.clone()
        q = _ops.unpack(qweight, BITS, dim=0)
        return _ops.pack(q.index_select(0, torch.argsort(self.perm)), BITS, dim=0)

    def _qzeros_as(self, zero_format: str) -> torch.Tensor:
        if zero_format == STORED_ZERO_FORMAT:
            return self.qzeros.clone()
        return _ops.convert_gptq_zeros(self.qzeros, BITS, STORED_ZERO_FORMAT, zero_format)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The tensors straight from the buffer dict: each `self.qweight` goes through
        # nn.Module.__getattr__, ~0.6 us a name, and the seven of them were 5 us of a 12 us call
        # (this VM, M = 1, K = N = 64): host time every eager decode step pays per layer. A
        # tensor assigned as an nn.Parameter leaves the buffer dict: then the attributes.
        b = self._buffers
        try:
            qweight, scales, qzeros = b["qweight"], b["scales"], b["qzeros"]
            g_idx, bias, perm = b["g_idx"], b["bias"], b["perm"]
        except KeyError:
            qweight, scales, qzeros = self.qweight, self.scales, self.qzeros
            g_idx, bias, perm = self.g_idx, self.bias, self.perm
        # act-order prepacked (perm set): qweight's rows are sorted by group and the op reads
        # x[..., perm]; otherwise g_idx (None, or an act-order one that could not be prepacked)
        return _ops.w4a16_linear(x, qweight, scales, qzeros, self.group_size,
                                 g_idx if perm is None else None, bias, STORED_ZERO_FORMAT, perm)

    def extra_repr(self) -> str:
        prepacked = (", prepacked=True" if self.perm is not None
                     else ", kinterleaved=True" if self.kinterleaved else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
                f"format={self.loaded_from}, act_order={self.act_order}{prepacked}"
                + (f", num_groups={self.num_groups}" if self.row_shard else ""))

    # ------------------------------------------------------------------ putting tensors in
    def _checked(self, name: str, t: torch.Tensor, where: str, expected=None) -> torch.Tensor:
        expected = self._expected()[name] if expected is None else expected
        _check_tensor(t, f"{where}{name}")
        if _shape(t) != expected:
            shard = f", num_groups={self.num_groups}" if self.row_shard else ""
            raise ValueError(f"{where}{name} must have shape {expected} for in_features="
                             f"{self.in_features}, out_features={self.out_features}, group_size="
                             f"{self.group_size}{shard}; got {_shape(t)}")
        if name == "g_idx":
            # (a row shard keeps any g_idx as it is, neither dropped nor prepacked: its values
            # decide nothing at load, so a meta skeleton's, which has none, loads with assign=True
            # as its qweight does; the values are checked where there are any)
            t = checked_g_idx(t, self.num_groups, where,
                              "num_groups" if self.row_shard else "K/G groups",
                              values_needed=not self.row_shard)
        if name in ("qweight", "qzeros", "g_idx") and t.dtype != torch.int32:
            raise ValueError(f"{where}{name} must be torch.int32, got {t.dtype}")
        if name in ("scales", "bias"):
            _check_float_dtype(t.dtype, f"{where}{name}")
        return t

    def _detect_format(self, qweight: torch.Tensor, key: str) -> str:
        exp = self._expected()
        _check_tensor(qweight, key)
        if _shape(qweight) == exp["gptq"]:
            return "gptq"
        if _shape(qweight) == exp["awq"]:
            return "awq"
        raise ValueError(
            f"{key}: shape {_shape(qweight)} fits neither the GPTQ layout [K/8, N] = {exp['gptq']} "
            f"nor the AWQ layout [K, N/8] = {exp['awq']} of QuantLinear(in_features="
            f"{self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
            + (f", num_groups={self.num_groups})" if self.row_shard else ")"))

    def _put_quantized(self, fmt, qweight, qzeros, scales, g_idx, zero_format, where, assign):
        """Check AWQ or GPTQ tensors against this layer, convert to the canonical form, store."""
        exp = self._expected()
        if self.row_shard:
            shard = (f"this QuantLinear ({self.in_features}->{self.out_features}) is a row shard "
                     f"of an act-order layer (num_groups={self.num_groups}), whose rows")
            if fmt == "awq":
                raise ValueError(f"{where}qweight has the AWQ layout [K, N/8] = {exp['awq']}, but "
                                 f"{shard} are grouped by a g_idx, which AWQ has not: load GPTQ "
                                 f"tensors (qweight [K/8, N] = {exp['gptq']} with g_idx)")
            if g_idx is None:
                raise ValueError(f"{where}g_idx is missing: {shard} cannot be grouped by "
                                 "k // group_size; load the shard's g_idx with its qweight")
        self._checked("qweight", qweight, where, exp[fmt])
        self._checked("qzeros", qzeros, where)
        self._checked("scales", scales, where)
        if g_idx is not None:
            g_idx = self._checked("g_idx", g_idx, where)
        if fmt == "awq":
            if g_idx is not None and not self._is_trivial(g_idx):
                raise ValueError(f"{where}g_idx is not arange(K) // group_size (act-order, or "
                                 "groups of another size) but qweight has the AWQ layout, which "
                                 "has no g_idx")
            qweight, qzeros = _ops.awq_to_gptq(qweight, qzeros, zero_format=STORED_ZERO_FORMAT)
            g_idx = None
        else:
            if zero_format != STORED_ZERO_FORMAT:
                qzeros = _ops.convert_gptq_zeros(qzeros, BITS, zero_format, STORED_ZERO_FORMAT)
            # (a row shard keeps even a plain-looking g_idx: the op needs it to read scales of
            # num_groups rows)
            if g_idx is not None and not self.row_shard and self._is_trivial(g_idx):
                g_idx = None
        perm = None
        # (not for a row shard: act_order_prepack may sort one whose K is a multiple of
        # group_size, but the op then reads scales as [K/group_size, N], not the whole layer's)
        if g_idx is not None and not self.row_shard:
            prepacked = _ops.act_order_prepack(qweight, g_idx.to(qweight.device), self.group_size)
            if prepacked is not None:  # else: groups of unequal size, forward uses g_idx
                qweight, perm = prepacked
        if (g_idx is None or perm is not None) and self._kinterleave_ok():
            qweight = _ops.prepack_w4a16(qweight)
        self._put("qweight", qweight, assign)
        self._put("qzeros", qzeros, assign)
        self._put("scales", scales, assign)
        self._put("g_idx", g_idx, assign)
        self._put("perm", perm, assign)
        self.loaded_from = fmt

    def _is_trivial(self, g_idx: torch.Tensor) -> bool:
        """Of a g_idx that passed _checked (int32, in range)."""
        return torch.equal(g_idx, trivial_g_idx(self.in_features, self.group_size, g_idx.device))

    def _put(self, name: str, value, assign: bool):
        """Store a buffer. Unless ``assign``, the value goes to the module's device (where that is
        not meta), copied in place when shape and dtype allow (keeping the storage CUDA graphs
        captured on it rely on), else copied: the layer never holds the caller's tensor, which a
        later load would write into. Scales and bias keep the dtype they come in, except into an
        nn.Parameter (below)."""
        if parametrize.is_parametrized(self, name):
            return  # (its parametrization holds it and loads its original: _load_from_state_dict)
        current = getattr(self, name)
        device = self.qweight.device
        # a bias or scales made an nn.Parameter (trained: BitFit, or learned scales through
        # dequantize) stays a Parameter, as under nn.Module's loader: setattr of a plain tensor
        # raised TypeError "cannot assign 'torch.HalfTensor' as parameter 'bias'" (with
        # assign=True always, else for a value of another dtype), naming no key, outside
        # load_state_dict's report, and for scales after qweight and qzeros were loaded
        param = isinstance(current, nn.Parameter) and value is not None
        if (param and not assign and not current.is_meta and current.shape == value.shape):
            # copied into in place, in its dtype, as nn.Module's loader copies: an optimizer
            # holds this Parameter, and a new one would leave it training a tensor the layer
            # no longer reads
            with torch.no_grad():
                current.copy_(value)
            return
        if value is not None and not assign:
            if (device.type != "meta" and current is not None and current.numel() == value.numel()
                    and current.dtype == value.dtype and current.device == device):
                # (another shape of as many elements: qweight between the k-interleaved and the
                # GPTQ layout; the buffer becomes a view of the same storage)
                if current.shape != value.shape:
                    current = current.view(value.shape)
                    setattr(self, name, current)
                with torch.no_grad():
                    current.copy_(value)
                return
            # (without autograd: a value that requires grad, a Linear's bias Parameter, left the
            # buffer a non-leaf of the caller's graph, so every forward built a graph and deepcopy
            # raised; nn.Module's loader copies under no_grad too), and outside inference mode: a
            # load inside it made perm and g_idx (new here) inference tensors, which a later load
            # (in place) or a backward through x refused, where nn.Linear's loads keep normal ones
            # (inference_mode(False) turns grad mode on: no_grad goes inside it)
            with torch.inference_mode(False), torch.no_grad():
                value = value.to(value.device if device.type == "meta" else device, copy=True)
        if param and not isinstance(value, nn.Parameter):  # (nn.Module's assign does the same)
            value = nn.Parameter(value, requires_grad=current.requires_grad)
        setattr(self, name, value)

    # ------------------------------------------------------------------ state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.perm is not None or self.kinterleaved:
            destination[prefix + "qweight"] = self._gptq_qweight()
        if self.checkpoint_zero_format != STORED_ZERO_FORMAT:
            destination[prefix + "qzeros"] = self._qzeros_as(self.checkpoint_zero_format)
        # The tensors cannot say whether qzeros are v1 or v2; the state dict's per-module metadata
        # (kept by torch.save, not by safetensors) can, so a module set to the other format loads
        # them right. GPTQ loaders elsewhere ignore the extra metadata key.
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None and prefix[:-1] in metadata:
            metadata[prefix[:-1]][_ZERO_FORMAT_METADATA] = self.checkpoint_zero_format

    def _zero_format_of(self, local_metadata, prefix: str) -> str:
        """The zero format of the qzeros being loaded: as recorded by the module that saved them,
        else this module's checkpoint_zero_format."""
        recorded = local_metadata.get(_ZERO_FORMAT_METADATA)
        if recorded is None:
            return self.checkpoint_zero_format
        return _check_zero_format(recorded, f"{prefix}qzeros: the state dict's recorded zero format")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the load pre-hooks first (they may rename or convert keys), as nn.Module's loader does
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        got = {n: state_dict[prefix + n] for n in _KEYS if prefix + n in state_dict}
        # scales or bias under torch.nn.utils.parametrize (learned scales): the tensor is held by
        # the parametrization, whose child module loads "parametrizations.<name>.original", as
        # under nn.Module's loader; the layer's own state dict has no "<name>", and loading it
        # back raised "qweight, qzeros and scales load together ...; got qweight, qzeros". The
        # current value stands in for the checks and is not written (_put); a "<name>" given is
        # unexpected, as nn.Module reports it for a parametrized Linear's "weight"
        held = {n for n in ("scales", "bias") if parametrize.is_parametrized(self, n)}
        for n in held:
            if n in got:
                unexpected_keys.append(prefix + n)
            got[n] = getattr(self, n)
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        if strict and self.bias is None and "bias" in got:
            unexpected_keys.append(prefix + "bias")
        if self.bias is not None and "bias" not in got:
            missing_keys.append(prefix + "bias")
        absent = [n for n in _QUANT_KEYS if n not in got]
        missing_keys.extend(prefix + n for n in absent)
        if self.row_shard and "g_idx" not in got:  # (a shard's rows need their groups)
            missing_keys.append(prefix + "g_idx")
        try:
            if absent and any(n in got and n not in held for n in _QUANT_KEYS + ("g_idx",)):
                raise ValueError(
                    f"{prefix}qweight, qzeros and scales load together (one layout, one zero "
                    f"format), with g_idx if any; got "
                    f"{', '.join(n for n in got if n != 'bias' and n not in held)}")
            if not assign and not self.qweight.is_meta:
                # a meta tensor (a skeleton's state dict) has no values to copy in: copy_ raised
                # NotImplementedError("Cannot copy out of meta tensor; no data!"), naming no key,
                # outside load_state_dict's report (g_idx first: its message is the same)
                for n in ("g_idx",) + _QUANT_KEYS + ("bias",):
                    t = got.get(n)
                    if isinstance(t, torch.Tensor) and t.is_meta:
                        raise ValueError(
                            f"{prefix}{n} is on the meta device (it has no values) and this layer "
                            f"on {self.qweight.device}: load materialised tensors, or pass "
                            "assign=True to take the meta ones as they are")
            # (the bias checked first: a bad one left the quantized tensors loaded)
            bias = (self._checked("bias", got["bias"], prefix)
                    if self.bias is not None and "bias" in got else None)
            if not absent:
                fmt = self._detect_format(got["qweight"], prefix + "qweight")
                zero_format = self._zero_format_of(local_metadata, prefix)
                self._put_quantized(fmt, got["qweight"], got["qzeros"], got["scales"],
                                    got.get("g_idx"), zero_format, prefix, assign)
                if (fmt == "gptq" and zero_format == "v1" and _WARN_V2_ZEROS.get()
                        and v2_zeros_read_as_v1(got["qzeros"])):
                    # (one message for every layer: Python's default filter shows it once, not
                    # once per layer of a model; stacklevel 4: a QuantLinear's own caller)
                    warnings.warn(
                        "QuantLinear.load_state_dict: GPTQ qzeros read as v1 (checkpoint_zero_"
                        "format) whose every word is 0x88888888, zero point 9 everywhere. v1 stores "
                        "z - 1, so symmetric v1 zeros are 0x77777777: these look like v2 zeros "
                        "(z = 8) under a v1 label (transformers/optimum and GPTQModel hold v2 zeros "
                        "in memory), and read as v1 every weight is off by one scale. If so, load "
                        "them into a QuantLinear with checkpoint_zero_format=\"v2\"",
                        UserWarning, stacklevel=4)
            if bias is not None:
                self._put("bias", bias, assign)
        except ValueError as e:
            error_msgs.append(str(e))
        # whatever else the module holds (a subclass's parameters and buffers; children load
        # themselves): nn.Module's loader, without the hooks (run above) or the keys loaded here
        rest = {k: v for k, v in state_dict.items()
                if not (k.startswith(prefix) and k[len(prefix):] in _KEYS)}
        hooks, self._load_state_dict_pre_hooks = self._load_state_dict_pre_hooks, OrderedDict()
        first = len(missing_keys)
        try:
            super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            self._load_state_dict_pre_hooks = hooks
        missing_keys[first:] = [k for k in missing_keys[first:] if k[len(prefix):] not in _KEYS]


# ---------------------------------------------------------------------- model level
def zero_points_all_eight(qzeros: torch.Tensor, zero_format: str) -> bool:
    """Every 4-bit zero point of packed int32 ``qzeros`` is 8 (symmetric quantization, GPTQ's
    ``sym``): every word 0x77777777 in GPTQ "v1" (stores z - 1), 0x88888888 in "v2" and AWQ's
    "as-is" (store z; AWQ's interleave only moves nibbles, all equal here)."""
    if zero_format not in (*ZERO_FORMATS, "as-is"):
        raise ValueError(f"zero_points_all_eight: zero_format must be one of "
                         f"{(*ZERO_FORMATS, 'as-is')}, got {zero_format!r}")
    word = 0x77777777 if zero_format == "v1" else 0x88888888 - (1 << 32)  # (as a signed int32)
    return bool((qzeros == word).all())


def v2_zeros_read_as_v1(qzeros: torch.Tensor) -> bool:
    """Every word of GPTQ ``qzeros`` is 0x88888888: read as v1 (z - 1 stored), zero point 9 in
    every nibble, which no real quantizer writes (an asymmetric layer's zero points vary); v2's
    symmetric zeros (z = 8) under a v1 label do. False for tensors without values to compare (meta,
    fake) and while compiling: no host sync or data-dependent branch there."""
    if (not isinstance(qzeros, torch.Tensor) or qzeros.is_meta or qzeros.numel() == 0
            or torch.compiler.is_compiling()
            or isinstance(qzeros, torch._subclasses.fake_tensor.FakeTensor)):
        return False
    return zero_points_all_eight(qzeros, "v2")


@contextlib.contextmanager
def _v2_zeros_warning(enabled: bool):
    """QuantLinear.load_state_dict's warning of v2 zeros under a v1 label on or off, inside."""
    token = _WARN_V2_ZEROS.set(enabled)
    try:
        yield
    finally:
        _WARN_V2_ZEROS.reset(token)


# ---------------------------------------------------------------------- MoE experts
# the names of an expert's (gate, up, down) projections in checkpoints that hold the experts one
# by one (AutoGPTQ, GPTQModel, AutoAWQ, vLLM): Qwen-MoE's, DeepSeek's, OLMoE's...; Mixtral's
EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_EXPERTS_FORWARD = ["hidden_states", "top_k_index", "top_k_weights"]


def checkpoint_expert_names(model: nn.Module) -> tuple:
    """The names checkpoints of ``model``'s kind give an expert's (gate, up, down) projections:
    for a transformers model, those its checkpoint conversion (``transformers.conversion_mapping``,
    for ``config.model_type``) fuses into ``experts.gate_up_proj``, w1 / w3 / w2 for Mixtral and
    its kin, which vLLM reads under those names; else gate_proj / up_proj / down_proj."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model_type, str) and "transformers" in sys.modules:
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping

            found = {}
            for convert in get_checkpoint_conversion_mapping(model_type) or ():
                sources = [str(p) for p in getattr(convert, "source_patterns", None) or ()]
                targets = [str(p) for p in getattr(convert, "target_patterns", None) or ()]
                names = [m.group(1) for p in sources
                         if (m := re.search(r"experts\.\*\.(\w+)\.weight$", p))]
                if len(names) != len(sources) or len(targets) != 1:
                    continue
                if targets[0].endswith("experts.gate_up_proj") and len(names) == 2:
                    found["gate"], found["up"] = names
                elif targets[0].endswith("experts.down_proj") and len(names) == 1:
                    found["down"] = names[0]
            names = tuple(found.get(k) for k in ("gate", "up", "down"))
            if names in EXPERT_NAMES:
                return names
        except Exception:  # (another transformers: its names unknown, the common ones taken)
            pass
    return EXPERT_NAMES[0]


def fused_experts_layout(m: nn.Module):
    """What ``m`` is as transformers 5's fused MoE experts module (Mixtral, Qwen2/3-MoE,
    DeepSeek, OLMoE and most of its MoE models: ``gate_up_proj`` [E, 2I, H] (gate rows, then up
    rows), ``down_proj`` [E, H, I], both [E, in, out] where ``is_transposed``; ``act_fn``;
    ``forward(hidden_states, top_k_index, top_k_weights)``): None where ``m`` holds no such
    3-D parameters; ``(E, H, I, transposed)`` where :class:`UnfusedExperts` computes what it
    does; otherwise a str saying why not (biases, interleaved gate/up rows, a gate or norm of
    its own: gpt-oss and a few others)."""
    params = dict(m.named_parameters(recurse=False))
    gu, down = params.get("gate_up_proj"), params.get("down_proj")
    if gu is None or down is None or gu.dim() != 3 or down.dim() != 3:
        return None
    others = sorted(set(params) - {"gate_up_proj", "down_proj"})
    if others:
        return f"parameters besides gate_up_proj and down_proj: {', '.join(others)}"
    for flag, want in (("has_bias", False), ("has_gate", True), ("is_concatenated", True),
                       ("has_post_expert_norm", False)):
        if bool(getattr(m, flag, want)) != want:
            return f"{flag}={not want}"
    gate = getattr(type(m), "_apply_gate", None)
    if gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate":
        return "a gating function of its own (_apply_gate)"
    if not callable(getattr(m, "act_fn", None)):
        return "no act_fn"
    try:
        args = list(inspect.signature(type(m).forward).parameters)[1:]
    except (TypeError, ValueError):
        args = None
    if args != _EXPERTS_FORWARD:
        return f"a forward other than forward({', '.join(_EXPERTS_FORWARD)})"
    own = _own_behaviour(m)  # (the rule of must_stay_float's Linears)
    if own:
        return f"a module {own}, which UnfusedExperts would drop"
    transposed = bool(getattr(m, "is_transposed", False))
    if transposed:
        (E, H, I2), (E2, I, H2) = gu.shape, down.shape
    else:
        (E, I2, H), (E2, H2, I) = gu.shape, down.shape
    if E2 != E or H2 != H or I2 != 2 * I:
        return (f"gate_up_proj {list(gu.shape)} and down_proj {list(down.shape)} of no "
                "[E, 2I, H] / [E, H, I] pair")
    return E, H, I, transposed


class _Expert(nn.Module):
    """One expert of :class:`UnfusedExperts`: its gate, up and down projections, under the names
    its checkpoint gives them."""

    def __init__(self, names, gate: nn.Module, up: nn.Module, down: nn.Module):
        super().__init__()
        self.names = tuple(names)
        for name, layer in zip(self.names, (gate, up, down)):
            self.add_module(name, layer)

    def forward(self, x: torch.Tensor, act_fn) -> torch.Tensor:
        m = self._modules  # (not getattr: nn.Module.__getattr__ per name, as QuantLinear.forward)
        gate, up, down = (m[n] for n in self.names)
        return down(act_fn(gate(x)) * up(x))


# UnfusedExperts.forward: up to how many routed elements (routed rows x hidden size) it gathers
# and weights in one piece (4 Mi: with the outputs' copy and their fp32 product, ~32 MB of
# temporaries at most)
_EXPERTS_BATCHED_ELEMENTS = 1 << 22
# the devices whose index_add_ adds in index order (one call for all experts' outputs)
_ONE_INDEX_ADD = ("cpu",)


class UnfusedExperts(nn.Module):
    """An MoE block's experts as layers of their own, one gate, up and down projection per
    expert (QuantLinear, or nn.Linear), in the place of transformers 5's fused experts module
    (:func:`torch_ops.module.fused_experts_layout`), which holds every expert in two 3-D
    parameters no 4-bit layout holds. Its state dict has the keys GPTQ and AWQ tools write and
    vLLM reads, expert by expert: ``<i>.gate_proj.qweight`` ... (``names``; Mixtral's
    checkpoints say w1, w3, w2).

    ``forward(hidden_states, top_k_index, top_k_weights)`` is the fused module's: each token's
    top-k experts (indices outside [0, E) skipped, as transformers' padding index E is), their
    outputs weighted and summed in fp32, returned in the dtype of ``hidden_states``. It runs the
    experts the batch routes to, one after another (the index of those is read on the host);
    under torch.compile, which reads the counts inside the graph (fullgraph too), every expert,
    on its run of rows however short."""

    def __init__(self, experts, act_fn, names=EXPERT_NAMES[0]):
        """``experts``: a (gate, up, down) triple of layers per expert, [H -> I, H -> I, I -> H];
        ``act_fn``: the gate's activation (the fused module's ``act_fn``); ``names``: the
        three layers' names in the state dict."""
        super().__init__()
        self.num_experts = 0
        for i, (gate, up, down) in enumerate(experts):
            self.add_module(str(i), _Expert(names, gate, up, down))
            self.num_experts += 1
        self.act_fn = act_fn

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, i: int) -> _Expert:
        # (IndexError past the end, as a sequence's: iteration and `in` stop there; KeyError
        # made list(experts) and a for loop raise)
        i = operator.index(i)
        if not -self.num_experts <= i < self.num_experts:
            raise IndexError(f"UnfusedExperts: expert index {i} is out of range for "
                             f"{self.num_experts} experts")
        return self._modules[str(i % self.num_experts)]

    def __iter__(self):
        return (self._modules[str(i)] for i in range(self.num_experts))

    def __repr__(self) -> str:
        # experts of the same repr in a row as one entry, as nn.ModuleList prints them (a model's
        # 128 experts printed 640 lines per block)
        lines, i = [], 0
        while i < len(self):
            text, j = repr(self[i]), i + 1
            while j < len(self) and repr(self[j]) == text:
                j += 1
            lines.append(f"  ({i}): {text}" if j == i + 1 else f"  ({i}-{j - 1}): {j - i} x {text}")
            i = j
        lines.append(f"  (act_fn): {self.act_fn!r}")
        return f"{type(self).__name__}(\n" + "\n".join(l.replace("\n", "\n  ") for l in lines) + "\n)"

    @staticmethod
    def _layout_to_quantize(fused: nn.Module, group_size: int, what: str) -> tuple:
        """fused_experts_layout(fused); ValueError naming ``what`` where it is no fused experts
        module, its shapes do not quantize with ``group_size`` or its weights are on meta."""
        layout = fused_experts_layout(fused)
        if not isinstance(layout, tuple):
            raise ValueError(f"{what}: not a fused experts module UnfusedExperts can take the "
                             f"place of ({layout or 'no 3-D gate_up_proj and down_proj'})")
        E, H, I, _ = layout
        check_dims(H, I, group_size, what=f"{what} (gate and up projections)")
        check_dims(I, H, group_size, what=f"{what} (down projections)")
        if fused.gate_up_proj.is_meta or fused.down_proj.is_meta:
            raise ValueError(f"{what}: the weights are on the meta device (not materialised)")
        return layout

    @classmethod
    def quantize_fused(cls, fused: nn.Module, group_size: int = 128, sym: bool = False,
                       names=EXPERT_NAMES[0],
                       scales_dtype: torch.dtype | None = None) -> "UnfusedExperts":
        """Round-to-nearest quantization (``QuantLinear.from_linear``) of every expert of a fused
        experts module (:func:`torch_ops.module.fused_experts_layout`); ValueError where it is
        none or its shapes do not quantize with ``group_size``. ``sym``: symmetric zero points,
        as ``QuantLinear.from_linear``'s; ``names``: the projections' names (gate, up, down)
        in the state dict, ``("w1", "w3", "w2")`` for Mixtral's checkpoints; ``scales_dtype``
        as ``QuantLinear.from_linear``'s."""
        E, H, I, transposed = cls._layout_to_quantize(fused, group_size, type(fused).__name__)

        def layer(weight):  # weight [out, in]
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
            return QuantLinear.from_linear(linear, group_size=group_size, sym=sym,
                                           scales_dtype=scales_dtype)

        experts = []
        for e in range(E):
            gu, down = fused.gate_up_proj[e], fused.down_proj[e]
            if transposed:
                gu, down = gu.t(), down.t()
            experts.append((layer(gu[:I]), layer(gu[I:]), layer(down)))
        return cls(experts, fused.act_fn, names)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if (top_k_weights.dim() == 0 or top_k_index.dim() == 0 or
                top_k_weights.shape[-1] != top_k_index.shape[-1] or
                top_k_weights.numel() != top_k_index.numel()):
            # (reshaped by their own widths, the weights of a wider top_k_weights were read at
            # the index's flat positions: other tokens' and slots' weights, without a word)
            raise ValueError(f"UnfusedExperts: top_k_weights must hold a weight per entry of "
                             f"top_k_index (k = its last dimension), got shapes "
                             f"{list(top_k_weights.shape)} and {list(top_k_index.shape)}")
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        # (k from the index's last dimension: an empty batch has no -1 to infer)
        index = top_k_index.reshape(x.shape[0], top_k_index.shape[-1])
        weights = top_k_weights.reshape(x.shape[0], top_k_weights.shape[-1])
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        # the (token, k) slots sorted by expert (stable: by token within one, as torch.where
        # lists them), indices outside [0, E) last; one read of the counts on the host, where a
        # torch.where per expert synchronised with the GPU once per expert
        E = len(self)
        flat = index.reshape(-1).long()
        flat = torch.where((flat >= 0) & (flat < E), flat, E)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E + 1)[:E].tolist()
        # torch.compile: the counts are sizes known only when the graph runs (unbacked symbols);
        # no Python branch may depend on them (fullgraph failed: "Could not guard on
        # data-dependent expression"), so every expert runs, on its run of rows however short,
        # and the batched choice below is made from the batch's shape
        compiling = torch.compiler.is_compiling()
        if compiling:
            for n in counts:
                torch._check(n >= 0)
                torch._check(n <= flat.numel())
            torch._check(sum(counts) <= flat.numel())
        hit = sum(counts)
        order = order[:hit]
        token = torch.div(order, index.shape[-1], rounding_mode="floor")
        routed = weights.reshape(-1)[order].float()
        # Few routed rows (decode): x's rows gathered once, each expert given its run of them,
        # and where index_add_ adds in index order (the CPU) all outputs weighted and added in
        # one product and one call (per-expert gathers, casts and products were ~40 of the ~75
        # us an expert cost on the host: CPU, one token). Many (prefill): the rows of one expert
        # at a time, so that the temporaries are one expert's, not every routed row's. Always
        # added in expert order, the same bits; on CUDA one index_add_ per expert, in which a
        # token comes once (unless routed to that expert twice), where one call over all slots
        # would add a token's outputs in whatever order its atomics land.
        batched = (flat.numel() if compiling else hit) * x.shape[-1] <= _EXPERTS_BATCHED_ELEMENTS
        deferred = batched and out.device.type in _ONE_INDEX_ADD
        xs = x[token] if batched else None
        ys, start = [], 0
        for e, n in enumerate(counts):
            if compiling or n:
                run = slice(start, start + n)
                y = self[e](xs[run] if batched else x[token[run]], self.act_fn)
                if deferred:
                    ys.append(y)
                else:  # (y times fp32 weights: promoted to fp32 first, as y.float() * w)
                    out.index_add_(0, token[run], y * routed[run, None])
                start += n
        if ys:
            out.index_add_(0, token, (ys[0] if len(ys) == 1 else torch.cat(ys)) * routed[:, None])
        return out.to(hidden_states.dtype).reshape(hidden_states.shape)


def name_matches(name: str, patterns) -> bool:
    """True if a dotted module name contains one of ``patterns`` as a run of whole components:
    "lm_head" matches "lm_head" and "model.lm_head" (not "lm_head2"); "layers.0" matches everything
    under "model.layers.0"; "mlp.gate" matches "x.mlp.gate" but not "x.mlp.gate_proj"."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        patterns = (patterns,)
    parts = name.split(".")
    for pattern in patterns:
        p = pattern.split(".")
        if any(parts[i:i + len(p)] == p for i in range(len(parts) - len(p) + 1)):
            return True
    return False


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _own_behaviour(m: nn.Module) -> str | None:
    """What a module's replacement would drop of ``m``'s own: a ``forward`` set on the instance
    (accelerate's dispatch sets one), or hooks registered on it (a hook that rescales the output,
    torch.nn.utils.weight_norm's pre-hook that recomputes the weight); None where none."""
    if "forward" in vars(m):
        return "whose forward is replaced on the instance"
    hooks = [what for what, d in (("forward pre-hooks", m._forward_pre_hooks),
                                  ("forward hooks", m._forward_hooks),
                                  ("backward pre-hooks", m._backward_pre_hooks),
                                  ("backward hooks", m._backward_hooks)) if d]
    return f"with {' and '.join(hooks)}" if hooks else None


def weights_read_by_parents(model: nn.Module) -> dict:
    """id -> why, for the Linears of ``model`` whose weight the module holding them reads
    itself: nn.TransformerEncoderLayer's linear1 / linear2 (its inference fast path reads
    ``.weight`` of both, and a QuantLinear in their place failed every eval forward with
    AttributeError). nn.MultiheadAttention's out_proj is :func:`must_stay_float`'s own case."""
    why = {}
    for parent in model.modules():
        if isinstance(parent, nn.TransformerEncoderLayer):
            for n in ("linear1", "linear2"):
                child = parent._modules.get(n)
                if isinstance(child, nn.Linear):
                    why[id(child)] = (f"the {n} of an nn.TransformerEncoderLayer, whose weight "
                                      "the layer's fast path reads itself")
    return why


def must_stay_float(m: nn.Linear, read_by_parents: dict | None = None) -> str | None:
    """Why a QuantLinear cannot take the place of ``m`` (None where it can): the attention's
    ``out_proj`` (``nn.MultiheadAttention`` reads its ``.weight`` itself, through
    ``F.multi_head_attention_forward``, never calling it), a Linear whose weight its parent
    reads (``read_by_parents``, :func:`weights_read_by_parents` of the model), a subclass with a
    ``forward`` of its own, or a Linear with a ``forward`` set on the instance or hooks of its
    own (forward, forward pre-, backward), whose extra behaviour a QuantLinear would drop."""
    if isinstance(m, NonDynamicallyQuantizableLinear):
        return ("nn.MultiheadAttention's out_proj, whose weight the attention reads itself "
                "(F.multi_head_attention_forward)")
    if read_by_parents and id(m) in read_by_parents:
        return read_by_parents[id(m)]
    if type(m).forward is not nn.Linear.forward:
        return (f"a {type(m).__name__}, an nn.Linear subclass with a forward of its own, which a "
                "QuantLinear would drop")
    own = _own_behaviour(m)
    return f"an nn.Linear {own}, which a QuantLinear would drop" if own else None


def _check_model(model, where: str) -> None:
    """TypeError unless ``model`` is an nn.Module: None or a state dict raised AttributeError
    "'NoneType' object has no attribute 'named_modules'", naming neither function nor argument."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")


def quantize_model(model: nn.Module, group_size: int = 128, sym: bool = False,
                   skip=("lm_head",), routers: bool = False,
                   scales_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (except those whose name matches ``skip``, see
    :func:`torch_ops.module.name_matches`, MoE routers unless ``routers`` (see
    :func:`torch_ops.module.looks_like_router`: GPTQ and AWQ tools keep them float and vLLM
    loads them float; a 4-bit router can pick other experts; with ``routers`` the router Linears
    whose shape can be quantized are, and the others stay float with a warning naming them:
    Linear(H, 1) gates, and transformers 5's own routers, modules that are not nn.Linear),
    ``nn.MultiheadAttention``'s ``out_proj`` and ``nn.TransformerEncoderLayer``'s ``linear1`` /
    ``linear2``, whose weights the attention / the layer read themselves, subclasses of
    ``nn.Linear`` with a ``forward`` of their own, and Linears with hooks of their own or a
    ``forward`` set on the instance, whose extra behaviour a QuantLinear would drop) with
    ``QuantLinear.from_linear``, in place (``sym`` and ``scales_dtype`` as there: torch.float32
    for weights whose groups overflow fp16 scales); returns ``model``. A Linear shared by several
    names is quantized once and stays shared (skipped if any of its names matches).
    transformers 5's fused MoE experts (3-D ``gate_up_proj`` and ``down_proj``: see
    :func:`torch_ops.module.fused_experts_layout`) become an :class:`UnfusedExperts`, a
    QuantLinear per expert and projection, whose state dict has the per-expert keys GPTQ and
    AWQ checkpoints hold (``experts.<i>.gate_proj.qweight``); ``skip`` names them as the rest
    (``"experts"``).

    Where the model has a config object with ``to_dict()`` (a transformers model's
    ``model.config``), its ``quantization_config`` is set to a plain dict describing what
    ``model.state_dict()`` now holds (GPTQ, v1 zeros: ``torch_ops.checkpoint.model_quant_config``),
    as transformers sets it on a quantized model, so that its ``save_pretrained`` writes a folder
    that ``load_quantized`` and GPTQ loaders read as quantized (without it: as float); its
    ``tie_word_embeddings`` becomes false where lm_head is quantized (the embedding stays float).

    Raises ValueError, before changing anything, if a layer's shape cannot be quantized with
    ``group_size`` (in/out features multiples of 8, in_features a multiple of group_size) or its
    weight is not materialised (meta device); every layer is quantized before the first is put
    in, so a failure leaves the model as it was."""
    _check_model(model, "quantize_model")
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_model: model is itself an nn.Linear; "
                         "use QuantLinear.from_linear")
    # (the argument's fault, not the layers': a str or None raised TypeError "'<=' not
    # supported" from check_dims, naming nothing, and 0 listed every layer to add to skip=)
    group_size = _ops._int("quantize_model", "group_size", group_size)
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"quantize_model: group_size must be -1 or a positive int, "
                         f"got {group_size}")
    if _ops._dtype("quantize_model", "scales_dtype", scales_dtype, _SCALES_DTYPES,
                   optional=True) not in (*_FLOAT_DTYPES, None):
        raise TypeError(f"quantize_model: scales_dtype must be {_SCALES_DTYPES}, "
                        f"got {scales_dtype}")
    # (5 raised "'int' object is not iterable", [5] "'int' object has no attribute 'split'")
    what = "quantize_model: skip must be a module name or a list of them, got"
    if skip is None or isinstance(skip, str):
        skip = () if skip is None else (skip,)
    else:
        try:
            skip = tuple(skip)  # (a generator is read once; every Linear's name is matched)
        except TypeError:
            raise TypeError(f"{what} {_ops._got(skip)}") from None
    wrong = [n for n in skip if not isinstance(n, str)]
    if wrong:
        raise TypeError(f"{what} an entry {_ops._got(wrong[0])}")
    routers = _ops._flag("quantize_model", "routers", routers)
    linears = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, nn.Linear)]
    read_by_parents = weights_read_by_parents(model)
    skipped = {id(m) for name, m in linears if name_matches(name, skip)
               or must_stay_float(m, read_by_parents) or (not routers and looks_like_router(name))}
    targets = [(name, m) for name, m in linears if id(m) not in skipped]
    # transformers 5's fused MoE experts: one QuantLinear per expert and projection
    fused = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
             if isinstance(fused_experts_layout(m), tuple) and not name_matches(name, skip)]
    bad, routers_left = [], []
    for name, m in targets:
        try:
            check_dims(m.in_features, m.out_features, group_size, what=name)
            if m.weight.is_meta:
                raise ValueError(f"{name}: the weight is on the meta device (not materialised)")
        except ValueError as e:
            if routers and looks_like_router(name) and not m.weight.is_meta:
                # (routers=True asks for the routers that can be: Qwen2-MoE's
                # shared_expert_gate, Linear(H, 1), refused the whole model)
                routers_left.append(str(e))  # ("<name>: in_features=...")
                skipped.add(id(m))
            else:
                bad.append(str(e))
    targets = [(name, m) for name, m in targets if id(m) not in skipped]
    if routers:  # transformers 5's routers are modules of their own (Qwen3MoeTopKRouter...)
        routers_left += [f"{name}: a {type(m).__name__}, not an nn.Linear"
                         for name, m in model.named_modules()
                         if looks_like_router(name) and not isinstance(m, (nn.Linear, QuantLinear))
                         and isinstance(getattr(m, "weight", None), torch.Tensor)
                         and m.weight.dim() == 2 and not name_matches(name, skip)]
    for name, m in fused:
        try:
            UnfusedExperts._layout_to_quantize(m, group_size, name)
        except ValueError as e:
            bad.append(str(e))
    if bad:
        raise ValueError("quantize_model: cannot quantize these layers (add them to skip=...): "
                         + " | ".join(bad))
    done = {}
    for name, m in targets:
        if id(m) not in done:
            # (in the Linear's train/eval mode: a new module is in training mode, so a model put
            # in eval() before quantizing held QuantLinears in training mode)
            layer = QuantLinear.from_linear(m, group_size=group_size, sym=sym,
                                            scales_dtype=scales_dtype)
            done[id(m)] = layer.train(m.training)
    names = checkpoint_expert_names(model) if fused else None
    for name, m in fused:
        if id(m) not in done:
            done[id(m)] = UnfusedExperts.quantize_fused(m, group_size, sym, names,
                                                        scales_dtype).train(m.training)
    for name, m in targets + fused:
        replace_module(model, name, done[id(m)])
    if done:
        from .checkpoint import _record_quant_config  # (checkpoint imports this module)

        _record_quant_config(model)
    _warn_weights_left_float(model, skip, quantized=bool(done))
    if routers_left:
        warnings.warn(f"quantize_model: routers=True, but {len(routers_left)} router(s) stay "
                      f"float: {_ops._first_few(routers_left, 4, '; ')}", UserWarning, stacklevel=2)
    return model


# the last name component of a router Linear: Mixtral's (before transformers 5), Qwen-MoE's and
# OLMoE's gate, Hunyuan's wg, Qwen-MoE's shared_expert_gate (Linear(H, 1), which no 4-bit layout
# holds: quantize_model refused the model until it was in skip=)
_ROUTER_NAMES = ("gate", "router", "wg", "shared_expert_gate")


def looks_like_router(name: str) -> bool:
    """Whether a Linear's dotted name is an MoE router's: its last component is ``gate``,
    ``router``, ``wg`` or ``shared_expert_gate``, or it lies inside a module whose name holds
    ``router`` (JetMoE's and DBRX's ``router.layer``, Switch's ``router.classifier``). AutoGPTQ,
    GPTQModel and AutoAWQ keep these float and vLLM loads them float, expecting a weight where
    a quantized router's checkpoint holds a qweight. ``gate_proj`` is no router."""
    parts = name.split(".")
    return parts[-1] in _ROUTER_NAMES or any("router" in p for p in parts[:-1])


def _warn_weights_left_float(model: nn.Module, skip, quantized: bool) -> None:
    """Warn of weight matrices quantize_model leaves float for not being nn.Linear layers:
    transformers' ``Conv1D`` (GPT-2 and its kin: every projection, so nothing was quantized and
    the model came back unchanged, silently) and modules holding parameters of 3 or more dims
    that are not convolutions (fused MoE experts UnfusedExperts cannot take the place of: gpt-oss's,
    with biases; most of an MoE's weights stayed float, silently). Embeddings and convolutions are not
    named; neither is what ``skip`` names."""
    left, numel = [], 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, QuantLinear, nn.Embedding, nn.EmbeddingBag,
                          nn.modules.conv._ConvNd)) or name_matches(name, skip):
            continue
        params = [(n, p) for n, p in m.named_parameters(recurse=False)
                  if p is not None and p.is_floating_point() and p.dim() >= 2]
        if type(m).__name__ == "Conv1D":  # (transformers.pytorch_utils.Conv1D: a Linear [K, N])
            params = [(n, p) for n, p in params if p.dim() == 2]
        else:
            params = [(n, p) for n, p in params if p.dim() >= 3]
        if params:
            why = fused_experts_layout(m)  # (a str: fused experts UnfusedExperts cannot take)
            left.append(f"{name} ({type(m).__name__}: {', '.join(n for n, _ in params)}"
                        + (f"; {why}" if isinstance(why, str) else "") + ")")
            numel += sum(p.numel() for _, p in params)
    if not left:
        if not quantized:
            warnings.warn("quantize_model: the model has no nn.Linear left to quantize (outside "
                          "skip=, not a router, not quantized already); nothing was changed", UserWarning,
                          stacklevel=3)
        return
    total = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for m in model.modules() if isinstance(m, QuantLinear)
        for b in (m.qweight,)) * 8
    shown = _ops._first_few(left, 4, "; ")
    warnings.warn(
        f"quantize_model: {len(left)} module(s) holding weight matrices are not nn.Linear "
        f"layers and stay float ({numel / max(total, 1):.0%} of the model's weights): {shown}. "
        "quantize_model replaces nn.Linear layers and transformers 5's fused MoE experts "
        "(transformers' Conv1D, as in GPT-2, and other modules of 3-D weights are not quantized)"
        + ("; nothing was quantized" if not quantized else ""), UserWarning, stacklevel=3)
