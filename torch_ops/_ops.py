"""The public functions of torch_ops, the fake (meta) kernels that let torch.compile trace the
ops, and w4a16_linear's batching rule for torch.vmap (its autograd is registered in C++,
csrc/bindings/ops.cpp).

The ops themselves (schemas, argument checks, CPU and CUDA kernels) live in the compiled
extension as ``torch.ops.torch_ops.*``; each function here is a thin, documented call of one.
"""
from __future__ import annotations

import math
import operator
import os.path as _os_path
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.torch_ops.*)
except ImportError as _e:
    # Python's own words for a source tree never built (PYTHONPATH at a clone, or the clone as the
    # working directory) blamed "a circular import" and named no build step; a _C built against
    # another torch failed with an undefined symbol and no advice either.
    import glob as _glob
    import importlib.machinery as _machinery
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _built = [f for suffix in _machinery.EXTENSION_SUFFIXES
              for f in _glob.glob(_os.path.join(_here, "_C" + suffix))]
    raise ImportError(
        f"torch_ops: the compiled extension torch_ops._C in {_here} failed to load ({_e}): "
        f"rebuild it against the torch installed here ({torch.__version__})" if _built else
        f"torch_ops: the compiled extension torch_ops._C is missing from {_here}: it is not built. "
        "In the source tree run `pip install --no-build-isolation -e .` (or `python setup.py "
        "build_ext --inplace`); to use an installed torch_ops instead, run from outside the "
        "source tree") from _e
_C_DIR, _PKG_DIR = (_os_path.dirname(_os_path.realpath(f)) for f in (_C.__file__, __file__))
if _C_DIR != _PKG_DIR:
    # An editable install of another checkout maps torch_ops._C to that checkout's build for any
    # torch_ops imported (PYTHONPATH at an unbuilt clone loaded the clone's Python over the other
    # tree's kernels, silently; whichever ops the two trees disagree on then misbehave)
    import warnings as _warnings

    _warnings.warn(
        f"torch_ops: the compiled extension torch_ops._C was loaded from {_C_DIR}, not from this "
        f"package's folder {_PKG_DIR} (an editable install of another checkout maps it): this "
        "Python runs over another build's kernels. Build this tree (`pip install "
        "--no-build-isolation -e .` in it) or use that checkout",
        RuntimeWarning, stacklevel=2)
from . import reference as _reference

_ops = torch.ops.torch_ops


def _word_bytes(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.int32 else 1


def _out_pair(op: str, out) -> tuple:
    """The ``out=`` of the repacks: a tuple or list of two tensors (one of another length was
    indexed as it came: a 1-tuple gave an IndexError naming nothing, a 3-tuple returned its
    third entry, untouched, beside the results)."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        what = (f"a {type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list))
                else type(out).__name__)
        raise ValueError(f"{op}: out must be a tuple (qweight_out, qzeros_out) of two tensors, "
                         f"got {what}")
    # (None is the C++ op's to refuse: its message says what None would have meant)
    for arg, t in zip(("qweight_out", "qzeros_out"), out):
        _tensor(op, arg, t, optional=True)
    return tuple(out)


def _view_out_in_compiled_code(out) -> bool:
    """Whether an out of the repacks is a view inside torch.compile / export: torch 2.13's Inductor
    (dynamic shapes) hands a custom op's mutated view at an offset of a tensor made in the graph to
    the kernel at the base's start (base[1] given, base[0] written, silently), any custom op alike;
    aten's copy_ into the same view is placed right. (Any view, not only one at an offset: Dynamo
    cannot trace storage_offset() where shapes are static; it traces ._base.)"""
    return torch.compiler.is_compiling() and any(t is not None and t._base is not None
                                                 for t in out)


def _copy_into(op: str, functional, qweight, out) -> tuple:
    """The out op's checks of the outs (None first, their devices against ``qweight``'s, then the
    inputs', then dtype, shape and contiguity: the out fake's order and words), then
    ``functional()``'s results copied into them (copy_ crosses devices, so the device check is
    not optional here)"""
    _fake_outs_given(op, *out)
    _on_one_device(op, qweight, qweight_out=out[0], qzeros_out=out[1])
    results = functional()
    _fake_outs(op, results, *out)
    for t, r in zip(out, results):
        t.copy_(r)
    return out


# ---- Python-level argument types -----------------------------------------------------------------
# A value of the wrong Python type reached the ops' schema parser, which answered in its own words
# or not at all: None for a tensor gave "There were no tensor arguments to this function",
# "Unimplemented scalar type" or "tensor does not have a device", a numpy array or a list a
# RuntimeError without the op's own name for it, and quantize / act_order_prepack an
# AttributeError; a float for an int argument a RuntimeError without the value, and True, taken as
# 1, a wrong answer (quantize(w, group_size=True) quantized in groups of one); a dtype given as
# "int32" or int a RuntimeError asking for an "int", a None order or format one without the value,
# and None for a flag was taken as False (pack_v2(check_range=None) skipped the check on CUDA).
# These checks (isinstance only: dynamo traces them) come first.

def _got(v) -> str:
    """A received value for a message: its repr and type where short, else its type (and shape)."""
    t = type(v)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    if v is None:
        return "None"
    if isinstance(v, type):  # int, numpy.int32: a type where a torch.dtype belongs
        return "the type " + (v.__qualname__ if v.__module__ == "builtins"
                              else f"{v.__module__}.{v.__qualname__}")
    if isinstance(v, (bool, int, float, complex, str, bytes, torch.dtype)) or (
            t.__module__ == "numpy" and getattr(v, "ndim", None) == 0):
        r = repr(v)
        return f"{r if len(r) <= 60 else r[:57] + '...'} ({name})"
    shape = getattr(v, "shape", None)
    return f"a {name}" + (f" of shape {list(shape)}" if shape is not None else "")


def _first_few(items, n: int = 5, sep: str = ", ") -> str:
    """The first ``n`` of ``items`` (strings) for a message, and how many more there are."""
    items = list(items)
    return sep.join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _tensor(op: str, arg: str, v, optional: bool = False):
    """``v`` must be a torch.Tensor (or, ``optional``, None)."""
    if isinstance(v, torch.Tensor) or (optional and v is None):
        return v
    raise TypeError(f"{op}: {arg} must be a torch.Tensor{' or None' if optional else ''}, got "
                    f"{_got(v)}")


def _int(op: str, arg: str, v):
    """``v`` must be an integer: an int (not a bool), a SymInt, or anything with ``__index__``
    (a numpy integer, a one-element integer tensor), which is converted. It must fit in int64,
    the ops' int: past it torch's schema parser said "Expected a value of type 'int' for argument
    'bits' but instead found type 'int'", without the value."""
    if isinstance(v, torch.SymInt):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        i = v
    elif not isinstance(v, (bool, float)) and not (isinstance(v, torch.Tensor)
                                                   and v.dtype == torch.bool):
        try:
            i = operator.index(v)
        except TypeError:
            raise TypeError(f"{op}: {arg} must be an int, got {_got(v)}") from None
    else:
        raise TypeError(f"{op}: {arg} must be an int, got {_got(v)}")
    if not -2**63 <= i < 2**63:
        raise ValueError(f"{op}: {arg} = {i} does not fit in int64")
    return i


def _str(op: str, arg: str, v, choices: str):
    """``v`` must be a str (its value is the C++ op's to check; ``choices`` for the message)."""
    if isinstance(v, str):
        return v
    raise TypeError(f"{op}: {arg} must be {choices}, got {_got(v)}")


def _dtype(op: str, arg: str, v, choices: str, optional: bool = False):
    """``v`` must be a torch.dtype (or, ``optional``, None): not a string, a Python or numpy type."""
    if isinstance(v, torch.dtype) or (optional and v is None):
        return v
    raise TypeError(f"{op}: {arg} must be {choices}, got {_got(v)}")


def _flag(op: str, arg: str, v) -> bool:
    """``v`` must be True or False (or 0 / 1, or a numpy bool): None or a string is refused."""
    if isinstance(v, bool):
        return v
    if (isinstance(v, int) and v in (0, 1)) or (type(v).__module__ == "numpy"
                                                and type(v).__name__ in ("bool", "bool_")):
        return bool(v)
    raise TypeError(f"{op}: {arg} must be True or False, got {_got(v)}")


# ---- the functions --------------------------------------------------------------------------------

def pack(values: torch.Tensor, bits: int, dim: int = -1, order: str = "sequential",
         dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Pack uint8 ``values`` (each < 2**bits) least-significant first along ``dim`` into
    ``dtype`` words (torch.int32 or torch.uint8). bits in {1, 2, 3, 4, 8}; 3-bit is one bit
    stream (32 values per 3 int32 words, 8 per 3 bytes). ``order="awq"`` applies the AWQ
    interleave [0,2,4,6,1,3,5,7] within each int32 (4-bit only)."""
    _tensor("pack", "values", values)
    bits, dim = _int("pack", "bits", bits), _int("pack", "dim", dim)
    _str("pack", "order", order, '"sequential" or "awq"')
    _dtype("pack", "dtype", dtype, "torch.int32 or torch.uint8")
    return _ops.pack(values, bits, dim, order, dtype)


def unpack(packed: torch.Tensor, bits: int, dim: int = -1, order: str = "sequential") -> torch.Tensor:
    """Exact inverse of :func:`pack`: uint8 values; the word size is ``packed.dtype``'s."""
    _tensor("unpack", "packed", packed)
    bits, dim = _int("unpack", "bits", bits), _int("unpack", "dim", dim)
    _str("unpack", "order", order, '"sequential" or "awq"')
    return _ops.unpack(packed, bits, dim, order)


def awq_to_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, zero_format: str = "v1",
                out: Optional[tuple] = None):
    """AWQ qweight [K, N/8] / qzeros [K/G, N/8] -> GPTQ qweight [K/8, N] / qzeros [K/G, N/8].
    ``"v1"`` stores (z - 1) & 15 per nibble (z = 0 included), ``"v2"`` stores z. Lossless.
    ``out=(qweight_out, qzeros_out)``: write into those (contiguous int32 of the result's shapes,
    not overlapping the inputs) instead of new tensors, and return them. (Inside
    ``torch.compile(dynamic=True)``, torch 2.13's Inductor writes a custom op's mutated view at
    an offset of a tensor made in the graph, ``base[1]``, at the base's start; in compiled code
    an out that is a view is therefore written by the functional op and a copy, which Inductor
    places right. A direct call of ``torch.ops.torch_ops.awq_to_gptq_out`` gets no such
    detour. A compiled graph also reuses itself for outs that overlap each other or an input,
    which it hands the kernel as separate buffers: eager refuses such outs, compiled code does
    not see them and writes one over the other.)"""
    _tensor("awq_to_gptq", "qweight", qweight)
    _tensor("awq_to_gptq", "qzeros", qzeros)
    _str("awq_to_gptq", "zero_format", zero_format, '"v1" or "v2"')
    if out is not None:
        out = _out_pair("awq_to_gptq", out)
        if _view_out_in_compiled_code(out):
            return _copy_into("awq_to_gptq", lambda: _ops.awq_to_gptq(qweight, qzeros, zero_format),
                              qweight, out)
        _ops.awq_to_gptq_out(qweight, qzeros, zero_format, qweight_out=out[0], qzeros_out=out[1])
        return out
    return tuple(_ops.awq_to_gptq(qweight, qzeros, zero_format))


def gptq_to_awq(qweight: torch.Tensor, qzeros: torch.Tensor, zero_format: str = "v1",
                g_idx: Optional[torch.Tensor] = None, out: Optional[tuple] = None):
    """GPTQ -> AWQ, the exact inverse of :func:`awq_to_gptq`. Refuses an act-order ``g_idx``.
    ``out``: as for :func:`awq_to_gptq`."""
    _tensor("gptq_to_awq", "qweight", qweight)
    _tensor("gptq_to_awq", "qzeros", qzeros)
    _tensor("gptq_to_awq", "g_idx", g_idx, optional=True)
    _str("gptq_to_awq", "zero_format", zero_format, '"v1" or "v2"')
    if out is not None:
        out = _out_pair("gptq_to_awq", out)
        if _view_out_in_compiled_code(out):
            return _copy_into("gptq_to_awq",
                              lambda: _ops.gptq_to_awq(qweight, qzeros, zero_format, g_idx),
                              qweight, out)
        _ops.gptq_to_awq_out(qweight, qzeros, zero_format, g_idx, qweight_out=out[0],
                             qzeros_out=out[1])
        return out
    return tuple(_ops.gptq_to_awq(qweight, qzeros, zero_format, g_idx))


def convert_gptq_zeros(qzeros: torch.Tensor, bits: int, src: str, dst: str) -> torch.Tensor:
    """GPTQ qzeros "v1" (z - 1) <-> "v2" (z) for bits 2/3/4/8, field by field (no carries).

    Rows of any width: a 3-bit row sized ceil(N * 3 / 32) words ends in part of a field, whose
    bits are copied unchanged."""
    _tensor("convert_gptq_zeros", "qzeros", qzeros)
    bits = _int("convert_gptq_zeros", "bits", bits)
    _str("convert_gptq_zeros", "src", src, '"v1" or "v2"')
    _str("convert_gptq_zeros", "dst", dst, '"v1" or "v2"')
    return _ops.convert_gptq_zeros(qzeros, bits, src, dst)


def pack_v2(unpacked: torch.Tensor, check_range: bool = True) -> torch.Tensor:
    """quanto's pack_v2: uint8 [N, K] (values < 16) -> int16 [N/4, K]; N % 4 == 0, K % 64 == 0.

    Values >= 16 raise ValueError. On CUDA that check is done in the packing pass but reading its
    result is a device sync (about 20 us on an H100, and not allowed in CUDA graph capture);
    ``check_range=False`` skips it when the values are known to fit (the output of ``unpack`` or
    ``quantize``, say); an out-of-range value then packs its low 4 bits. The CPU always checks
    (it costs nothing there)."""
    _tensor("pack_v2", "unpacked", unpacked)
    check_range = _flag("pack_v2", "check_range", check_range)
    return _ops.pack_v2(unpacked, check_range)


def unpack_v2(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_v2`: int16 [N/4, K] -> uint8 [N, K]."""
    _tensor("unpack_v2", "packed", packed)
    return _ops.unpack_v2(packed)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: Optional[torch.Tensor] = None,
               format: str = "gptq", bits: int = 4, group_size: int = 128,
               g_idx: Optional[torch.Tensor] = None, zero_format: str = "v1") -> torch.Tensor:
    """Float weight [N, K] (nn.Linear orientation) in ``scales.dtype``: s * (q - z).
    ``format="awq"`` reads AWQ tensors (4-bit); ``"gptq"`` reads bits 2/3/4/8 and ``g_idx``.
    ``qzeros=None`` is symmetric (z = 2**(bits-1)); ``group_size=-1`` is one group.
    ``zero_format`` (GPTQ): ``"v1"``, qzeros hold z - 1 (AutoGPTQ), or ``"v2"``, z (GPTQModel).
    Differentiable with respect to ``scales`` (d w / d s = q - z), for learning scales over
    frozen codes, under autograd, forward-mode AD and torch.func's transforms (README)."""
    for arg, t, optional in (("qweight", qweight, False), ("scales", scales, False),
                             ("qzeros", qzeros, True), ("g_idx", g_idx, True)):
        _tensor("dequantize", arg, t, optional)
    bits, group_size = _int("dequantize", "bits", bits), _int("dequantize", "group_size", group_size)
    _str("dequantize", "format", format, '"gptq" or "awq"')
    _str("dequantize", "zero_format", zero_format, '"v1" or "v2"')
    return _ops.dequantize(qweight, scales, qzeros, format, bits, group_size, g_idx, zero_format)


def quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False,
             format: str = "gptq", zero_format: str = "v1",
             scales_dtype: Optional[torch.dtype] = None) -> dict:
    """Round-to-nearest quantization of an nn.Linear weight [N, K] with the GPTQ (``"gptq"``) or
    AutoAWQ (``"awq"``) formulas. Returns ``qweight``, ``qzeros``, ``scales`` and, for GPTQ,
    ``g_idx`` (= arange(K) // group_size; zeros for ``group_size=-1``, one group). The results
    are not differentiable (rounding has no useful gradient): a weight that requires grad is read
    detached, as the reference does.

    Asymmetric: GPTQ's s = (max - min) / (2**bits - 1) over the group's range widened to include
    0, z = round(-min / s); AutoAWQ's s = (max - min) / 15 over the range as it is, z =
    clamp(-round(min / s), 0, 15) (so the codes of a group far from 0, a constant nonzero one
    included, are clipped, as in AutoAWQ). ``sym=True``, either format: s = 2 max|w| /
    (2**bits - 1), z = 2**(bits-1) (stored in qzeros too). Scales are at least 1e-5 (AutoAWQ's
    1e-5 / 15: it clamps the range). ``zero_format`` (GPTQ): the qzeros written, ``"v1"`` z - 1
    (AutoGPTQ; symmetric 4-bit: 0x77777777) or ``"v2"`` z (GPTQModel; 0x88888888).
    ``scales_dtype``: the dtype the scales are stored in, None for the weight's dtype when it is
    fp16 or bf16, else fp16; codes are rounded with the stored scales (and so are ``"awq"``'s
    zero points, as AutoAWQ's). A NaN or inf weight, or scales
    past ``scales_dtype``'s range, raise ValueError."""
    # (the op has no autograd formula: a weight that requires grad would give scales a grad_fn
    # whose backward raises, far from here, when a loss is backpropagated through dequantize)
    _tensor("quantize", "weight", weight)
    bits, group_size = _int("quantize", "bits", bits), _int("quantize", "group_size", group_size)
    sym = _flag("quantize", "sym", sym)
    _str("quantize", "format", format, '"gptq" or "awq"')
    _str("quantize", "zero_format", zero_format, '"v1" or "v2"')
    _dtype("quantize", "scales_dtype", scales_dtype,
           "torch.float16, torch.bfloat16, torch.float32 or None", optional=True)
    qweight, qzeros, scales, g_idx = _ops.quantize(weight.detach(), bits, group_size, sym, format,
                                                   zero_format, scales_dtype)
    out = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
    if format == "gptq":
        out["g_idx"] = g_idx
    return out


def prepack_w4a16(qweight: torch.Tensor) -> torch.Tensor:
    """The k-interleaved form of a GPTQ 4-bit qweight [K/8, N] (K a multiple of 32): int32
    [K/32, 4, N], the same words with each 32-k block's nibbles reordered so that one word is a
    tensor-core fragment row's values for two k16 steps (README's formats table: word (b, t, n)
    nibble 2 jj + h + 4 e holds k = 32 b + 16 jj + 8 h + 2 t + e). :func:`w4a16_linear` takes it in place
    of qweight (not with g_idx: act-order rows sorted by :func:`act_order_prepack` first, then
    perm) and is faster with it on CUDA (H200: 2-10%, every batch size); on the CPU it costs a
    gather of x. Lossless: :func:`unprepack_w4a16` undoes it."""
    _tensor("prepack_w4a16", "qweight", qweight)
    return _ops.prepack_w4a16(qweight)


def unprepack_w4a16(qweight: torch.Tensor) -> torch.Tensor:
    """The GPTQ qweight [K/8, N] of a k-interleaved one [K/32, 4, N] (:func:`prepack_w4a16`)."""
    _tensor("unprepack_w4a16", "qweight", qweight)
    return _ops.unprepack_w4a16(qweight)


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 qzeros: Optional[torch.Tensor] = None, group_size: int = 128,
                 g_idx: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                 zero_format: str = "v1", perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, dequantize(...), bias)`` fused: x [..., K] (fp16/bf16/fp32) times 4-bit
    GPTQ weights (qweight [K/8, N], scales [K/G, N], qzeros [K/G, N/8] or None for symmetric,
    optional act-order g_idx [K]; ``zero_format`` "v1": qzeros hold z - 1, as AutoGPTQ writes
    them, "v2": z); returns [..., N] in x.dtype, accumulated in fp32. With g_idx
    the scales and qzeros may hold any number of groups (those g_idx names) and K need not be a
    multiple of group_size: a row-parallel shard of an act-order layer (its rows of qweight and
    g_idx, the whole scales and qzeros), whose shards' products sum to the layer's.
    qweight may also be the k-interleaved [K/32, 4, N] of :func:`prepack_w4a16` (group_size a
    multiple of 32 or -1; perm, not g_idx), the faster form on CUDA.
    ``perm`` [K] (instead of g_idx): the product uses ``x[..., perm]``, for act-order weights
    whose rows :func:`act_order_prepack` sorted by group (the fast path for act-order).
    Differentiable with respect to x (and bias), through autograd, ``torch.func`` (grad, vjp,
    jvp, vmap) and forward-mode AD; the weights get no gradient (scales that require grad get
    none, and a tangent of scales adds nothing).

    On CUDA, large batches (M >= 2048, or >= 1024 where N >= K) and fp32 x take the dense route:
    the weights are dequantised a column chunk at a time into at most 64 MiB of scratch (from the
    caching allocator) and multiplied with cuBLAS, whose GEMM is ahead of any fused kernel
    there; the result is the same up to rounding."""
    if type(group_size) is not int or type(zero_format) is not str:
        # (a bool was taken as 1, a float got no value in the message, bytes were read as a str)
        group_size = _int("w4a16_linear", "group_size", group_size)
        _str("w4a16_linear", "zero_format", zero_format, '"v1" or "v2"')
    try:
        return _ops.w4a16_linear.default(x, qweight, scales, qzeros, group_size, g_idx, bias,
                                         zero_format, perm)
    except (TypeError, RuntimeError):
        # the argument types are checked only once the call has failed: checked up front, the
        # isinstance tests cost 0.3 us of a 5.5 us call (CPU, M = 1, K = 128), on every forward
        for arg, t, optional in (("x", x, False), ("qweight", qweight, False),
                                 ("scales", scales, False), ("qzeros", qzeros, True),
                                 ("g_idx", g_idx, True), ("bias", bias, True), ("perm", perm, True)):
            _tensor("w4a16_linear", arg, t, optional)
        _int("w4a16_linear", "group_size", group_size)  # (an int past int64: the parser's error)
        raise


def act_order_prepack(qweight: torch.Tensor, g_idx: torch.Tensor, group_size: int):
    """Sort the rows of an act-order (GPTQ ``desc_act``) 4-bit qweight [K/8, N] by group, once at
    load time, so that :func:`w4a16_linear` can run without ``g_idx`` (its per-row group lookup is
    the slow path):

        w4a16_linear(x, qweight_sorted, scales, qzeros, group_size, perm=perm)
          ~= w4a16_linear(x, qweight, scales, qzeros, group_size, g_idx=g_idx)

    (the same products, summed in another order: equal up to fp32 rounding). A Python helper,
    not an op (``torch.ops.torch_ops`` has none of that name): not for torch.compile graphs.

    Returns ``(qweight_sorted, perm)``: ``perm`` [K] int32 is the stable argsort of ``g_idx``, and
    row k' of the unpacked ``qweight_sorted`` is row ``perm[k']`` of the unpacked ``qweight``.
    Returns None when sorting does not give ``arange(K) // group_size`` (groups of unequal size,
    values outside [0, K/G), or K not a multiple of group_size: a row shard of an act-order layer,
    see :func:`w4a16_linear`): such a g_idx needs the g_idx path. ``group_size=-1`` is one group.
    Syncs with the device (it inspects g_idx's values)."""
    _tensor("act_order_prepack", "qweight", qweight)
    _tensor("act_order_prepack", "g_idx", g_idx)
    group_size = _int("act_order_prepack", "group_size", group_size)
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(f"act_order_prepack: qweight must be a 2-D torch.int32 tensor [K/8, N], "
                         f"got {qweight.dtype} of shape {list(qweight.shape)}")
    K = qweight.shape[0] * 8
    if g_idx.dtype not in (torch.int32, torch.int64) or list(g_idx.shape) != [K]:
        raise ValueError(f"act_order_prepack: g_idx must be an int32 or int64 tensor of shape "
                         f"[K] = [{K}] (K = 8 * qweight.shape[0]), got {g_idx.dtype} of shape "
                         f"{list(g_idx.shape)}")
    if g_idx.device != qweight.device:
        raise ValueError(f"act_order_prepack: g_idx is on {g_idx.device}, qweight on "
                         f"{qweight.device}; they must be on the same device")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"act_order_prepack: group_size must be -1 or positive, got "
                         f"{_sz(group_size)}")
    if group_size == -1 and K == 0:  # (K % G below raised ZeroDivisionError, naming nothing)
        raise ValueError("act_order_prepack: group_size = -1 (one group of all K rows) needs K > 0, "
                         "got K = 0")
    if g_idx.is_meta:  # (torch.equal below raised NotImplementedError, naming no argument)
        raise ValueError("act_order_prepack: g_idx is on the meta device: its values decide the "
                         "sort; pass a materialised g_idx")
    G = _reference.group_len(K, group_size)
    if K % G:  # (whole groups only: a row shard keeps the g_idx path)
        return None
    sorted_g_idx, perm = torch.sort(g_idx, stable=True)
    if not torch.equal(sorted_g_idx.to(torch.int64),
                       torch.arange(K, device=g_idx.device) // G):
        return None
    qweight_sorted = pack(unpack(qweight, 4, dim=0).index_select(0, perm), 4, dim=0)
    return qweight_sorted, perm.to(torch.int32)


# ---- quantize: a composite op (torch math + the pack kernels), so it traces and runs anywhere ----

@torch.library.custom_op("torch_ops::quantize", mutates_args=())
def _quantize_op(weight: torch.Tensor, bits: int, group_size: int, sym: bool, format: str,
                 zero_format: str, scales_dtype: Optional[torch.dtype]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_quantize_args(weight, bits, group_size, format, zero_format, scales_dtype)
    q, z, scales = _reference.rtn(weight, bits, group_size, sym, format, scales_dtype)
    K = q.shape[0]
    g_idx = (torch.arange(K, device=weight.device) // _reference.group_len(K, group_size)
             ).to(torch.int32)
    if format == "awq":
        return pack(q, 4, 1, "awq"), pack(z, 4, 1, "awq"), scales, g_idx
    z = ((z.to(torch.int32) - (1 if zero_format == "v1" else 0)) & (2**bits - 1)).to(torch.uint8)
    return pack(q, bits, 0), pack(z, bits, 1), scales, g_idx


def _check_quantize_args(weight, bits, group_size, format, zero_format, scales_dtype):
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize: weight must be a 2-D float tensor [N, K], got "
                         f"{weight.dtype} of shape {_sz(list(weight.shape))}")
    if scales_dtype not in (None, torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"quantize: scales_dtype must be torch.float16, torch.bfloat16, "
                        f"torch.float32 or None, got {scales_dtype}")
    if format not in ("gptq", "awq"):
        raise ValueError(f'quantize: format must be "gptq" or "awq", got "{format}"')
    if zero_format not in ("v1", "v2"):
        raise ValueError(f'quantize: zero_format must be "v1" or "v2", got "{zero_format}"')
    if bits not in ((4,) if format == "awq" else (2, 3, 4, 8)):
        raise ValueError(f"quantize: bits={_sz(bits)} is not supported for format={format}")
    N, K = weight.shape
    # (the size tests below are guard_or_false: this is also the fake's check, and inside
    # torch.compile a size may depend on the data (rows picked by a mask), where bool() of one
    # failed the trace, valid sizes or not, in torch's words; the kernel then checks it)
    # group_size <= 0 (but -1) and -1 with K = 0 get the C ops' messages: "K = 0 must be a
    # multiple of group_size = -1" named neither cause
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"quantize: group_size must be positive or -1 (one group), got "
                         f"{_sz(group_size)}")
    if group_size == -1 and guard_or_false(K == 0):
        raise ValueError("quantize: group_size = -1 (one group of all K rows) needs K > 0, got "
                         "K = weight.shape[1] = 0")
    G = _reference.group_len(K, group_size)
    if guard_or_false(K % G != 0):
        raise ValueError(f"quantize: K = weight.shape[1] = {_sz(K)} must be a multiple of "
                         f"group_size = {_sz(group_size)}")
    if format == "awq":  # qweight [K, N/8]: packed along N only, any K
        if guard_or_false(N % 8 != 0):
            raise ValueError(f"quantize: weight shape {_sz(list(weight.shape))} does not pack "
                             f"into 4-bit awq words (N must be a multiple of 8)")
        return
    k_multiple = 32 if bits == 3 else 32 // bits  # whole int32 words along K (GPTQ qweight)
    n_multiple = 32 // math.gcd(32, bits)  # whole words of qzeros
    if guard_or_false(K % k_multiple != 0) or guard_or_false(N % n_multiple != 0):
        raise ValueError(f"quantize: weight shape {_sz(list(weight.shape))} does not pack into "
                         f"{_sz(bits)}-bit {format} words (K must be a multiple of "
                         f"{_sz(k_multiple)} and N of {_sz(n_multiple)})")


@_quantize_op.register_fake
def _(weight, bits, group_size, sym, format, zero_format, scales_dtype):
    _check_quantize_args(weight, bits, group_size, format, zero_format, scales_dtype)
    N, K = weight.shape
    G = 1 if group_size == -1 else K // group_size
    if scales_dtype is None:
        scales_dtype = (weight.dtype if weight.dtype in (torch.float16, torch.bfloat16)
                        else torch.float16)
    i32 = dict(dtype=torch.int32, device=weight.device)
    scales = weight.new_empty((G, N), dtype=scales_dtype)
    g_idx = weight.new_empty((K,), **i32)
    if format == "awq":
        return (weight.new_empty((K, N // 8), **i32), weight.new_empty((G, N // 8), **i32),
                scales, g_idx)
    return (weight.new_empty((K * bits // 32, N), **i32),
            weight.new_empty((G, N * bits // 32), **i32), scales, g_idx)


# ---- fake kernels of the compiled ops --------------------------------------------------------------

def _dims(op: str, arg: str, t: torch.Tensor, ndim: Optional[int] = None) -> None:
    """The kernels' check of a tensor's rank (check_ndim), in the fakes too (under torch.compile
    they run first, and a wrong rank would fail inside their own shape arithmetic instead)."""
    if ndim is None and t.dim() < 1:
        raise ValueError(f"{op}: {arg} must have at least 1 dimension")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {arg} must be {ndim}-D, got shape {_sz(list(t.shape))}")


def _wrap_dim(op: str, arg: str, t: torch.Tensor, dim: int) -> int:
    """The kernels' check of ``dim`` (Python's % would wrap any dim into range)."""
    if not -t.dim() <= dim < t.dim():
        raise IndexError(f"{op}: dim = {dim} is out of range for {arg} of {t.dim()} dimensions "
                         f"(expected in [{-t.dim()}, {t.dim() - 1}])")
    return dim % t.dim()


def _resized(t: torch.Tensor, dim: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    return t.new_empty(shape, dtype=dtype)


def _on_one_device(op, first, **tensors):
    """The fakes also serve eager calls where one tensor is on the meta device (the dispatcher
    picks Meta over CPU): with CPU inputs beside a meta one, an op returned an uninitialised CPU
    tensor as its result (a module whose buffers were never loaded from meta gave garbage), and
    an out op with a meta out returned and wrote nothing. The device check the kernels make
    (against ``first``: x, else qweight), made here too."""
    for arg, t in tensors.items():
        if t is not None and t.device != first.device:
            raise ValueError(f"{op}: {arg} is on {t.device} but the other inputs are on "
                             f"{first.device}")


# The fakes make the kernels' checks of dtypes, bits and shapes too, in the kernels' words: they
# also serve eager calls on the meta device, which returned a result of a wrong shape for input
# the kernels refuse (pack of 5 4-bit values: [.., 0]), and under torch.compile they run first.

def _fake_dtype(op, arg, t, want):
    if t.dtype != want:
        raise TypeError(f"{op}: {arg} must be {want}, got {t.dtype}")


def _fake_bits(op, bits, allowed):
    if bits not in allowed:
        raise ValueError(f"{op}: bits must be one of {{{', '.join(map(str, allowed))}}}, "
                         f"got {_sz(bits)}")


def _fake_order_and_dim(op, arg, t, bits, dim, order, word_bytes, awq_needs):
    """pack's and unpack's checks of order and dim; returns dim wrapped, and the values that fill
    a whole number of words (tops_pack_group)"""
    if order not in ("sequential", "awq"):
        raise ValueError(f'{op}: order must be "sequential" or "awq", got "{order}"')
    if order == "awq" and not (bits == 4 and word_bytes == 4):
        raise ValueError(f'{op}: order="awq" needs bits=4 and {awq_needs}')
    return _wrap_dim(op, arg, t, dim), 8 * word_bytes // math.gcd(bits, 8 * word_bytes)


def _sz(v):
    """A size (or list of sizes) for a fake's message, as this call has it: under torch.compile's
    dynamic shapes the fakes see symbols, and the messages read "values.shape[0] = s33" or
    "[((8*s85 + 127)//128), 8]" where the kernel's said 48 or [3, 8]. (A size known only when the
    graph runs has no value yet and stays a symbol; the checks leave those to the kernels.)"""
    if isinstance(v, (list, tuple)):
        return [_sz(a) for a in v]
    node = getattr(v, "node", None)
    if isinstance(v, torch.SymInt) and node is not None and node.has_hint():
        return int(node.hint)
    return v


def _fake_check(cond, message) -> None:
    """The fakes' size checks: ValueError(message()) where ``cond`` is false. A condition on a
    size known only when the graph runs (an unbacked symbol: rows picked by a mask inside
    torch.compile) is left to the kernel, which makes the check then, in its words:
    torch._check_value deferred it to a runtime assertion of torch's, which fired before the
    kernel and named neither the op nor the argument ("Runtime assertion failed for expression
    Eq(Mod(u0, 8), 0) on node 'eq'"). Other sizes are decided as before (a guard where symbolic)."""
    if not guard_or_true(cond):
        raise ValueError(message())


def _fake_multiple(op, what, size, m, tail=""):
    _fake_check(size % m == 0, lambda: f"{op}: {what} = {_sz(size)} must be a multiple of {m}{tail}")


def _fake_float(op, arg, t):
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: {arg} must be float32, float16 or bfloat16, got {t.dtype}")


def _fake_index(op, arg, t):
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {arg} must be int32 or int64, got {t.dtype}")


def _fake_zero_format(op, zero_format, arg="zero_format"):
    if zero_format not in ("v1", "v2"):
        raise ValueError(f'{op}: {arg} must be "v1" or "v2", got "{zero_format}"')


def _fake_group_size(op, group_size, K):
    """resolve_group_size: -1 is one group of all K rows"""
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"{op}: group_size must be positive or -1 (one group), got "
                         f"{_sz(group_size)}")
    if group_size == -1:
        _fake_check(K > 0, lambda: f"{op}: group_size = -1 (one group of all K rows) needs "
                                   f"K > 0, got K = 0")
        return K
    return group_size


def _fake_index_arg(op, arg, t, first, K):
    """check_index_arg: int32 or int64 [K] on first's device (the values are the kernel's to
    read)"""
    _fake_index(op, arg, t)
    _on_one_device(op, first, **{arg: t})
    _fake_shape(op, arg, t, [K], "[K]")


def _size_mul(op, what, a, b):
    """size_mul: a * b for a size, or the kernels' error where that passes int64 (Python's ints
    do not overflow: the fakes returned a shape the kernels refuse, or new_empty raised a
    TypeError naming no op). Symbolic sizes are left to the kernels."""
    r = a * b
    if isinstance(r, int) and r >= 2**63:
        raise ValueError(f"{op}: {what} = {a} * {b} overflows int64")
    return r


def _fake_shape(op, arg, t, want, formula):
    """The kernels' check_shape, for the fakes (sizes may be symbolic)."""
    # (size by size: a list's == asks bool() of each, which raised on a data-dependent size)
    same = t.dim() == len(want) and all(guard_or_true(a == b) for a, b in zip(t.shape, want))
    _fake_check(same, lambda: f"{op}: {arg} must have shape {formula} = {_sz(want)}, got "
                              f"{_sz(list(t.shape))}")


@torch.library.register_fake("torch_ops::pack")
def _(values, bits, dim=-1, order="sequential", dtype=None):
    dtype = torch.int32 if dtype is None else dtype  # (the schema's default: see the kernel)
    _fake_dtype("pack", "values", values, torch.uint8)
    _fake_bits("pack", bits, (1, 2, 3, 4, 8))
    _dims("pack", "values", values)
    if dtype not in (torch.int32, torch.uint8):
        raise TypeError(f"pack: dtype must be torch.int32 or torch.uint8, got {dtype}")
    wb = _word_bytes(dtype)
    dim, group = _fake_order_and_dim("pack", "values", values, bits, dim, order, wb,
                                     f"dtype=torch.int32, got bits={_sz(bits)} and dtype={dtype}")
    _fake_multiple("pack", f"values.shape[{dim}]", values.shape[dim], group,
                   f" (bits={_sz(bits)} into {dtype})")
    return _resized(values, dim, values.shape[dim] // group * (group * bits // (8 * wb)), dtype)


@torch.library.register_fake("torch_ops::unpack")
def _(packed, bits, dim=-1, order="sequential"):
    if packed.dtype not in (torch.int32, torch.uint8):
        raise TypeError(f"unpack: packed.dtype must be torch.int32 or torch.uint8, got "
                        f"{packed.dtype}")
    _fake_bits("unpack", bits, (1, 2, 3, 4, 8))
    _dims("unpack", "packed", packed)
    wb = _word_bytes(packed.dtype)
    dim, group = _fake_order_and_dim("unpack", "packed", packed, bits, dim, order, wb,
                                     f"int32 words, got bits={_sz(bits)} and "
                                     f"packed.dtype={packed.dtype}")
    words = group * bits // (8 * wb)
    nwords = packed.shape[dim]
    _fake_check(nwords % words == 0, lambda: (
        f"unpack: packed.shape[{dim}] = {_sz(nwords)} is not a whole number of groups: "
        f"bits={_sz(bits)} spans {_sz(words)} words per group, so it must be a multiple of "
        f"{_sz(words)}"))
    return _resized(packed, dim, _size_mul("unpack", "the unpacked length", nwords // words, group),
                    torch.uint8)


def _fake_repack_inputs(op, qweight, qzeros, zero_format):
    """check_repack_inputs: both int32 and 2-D, the zero format known"""
    _fake_dtype(op, "qweight", qweight, torch.int32)
    _fake_dtype(op, "qzeros", qzeros, torch.int32)
    _dims(op, "qweight", qweight, 2)
    _dims(op, "qzeros", qzeros, 2)
    _fake_zero_format(op, zero_format)


def _fake_repack_groups(op, qzeros, K, N, k_formula):
    G = qzeros.shape[0]
    # (guard_or_true: "and" asks bool() of G >= 1, which raised on a data-dependent size)
    _fake_check(guard_or_true(G >= 1) and K % G == 0, lambda: (
        f"{op}: qzeros.shape[0] = {_sz(G)} groups must divide K = {k_formula} = {_sz(K)}"))
    _fake_shape(op, "qzeros", qzeros, [G, N // 8], "[K/G, N/8]")


@torch.library.register_fake("torch_ops::awq_to_gptq")
def _fake_awq_to_gptq(qweight, qzeros, zero_format="v1"):
    _on_one_device("awq_to_gptq", qweight, qzeros=qzeros)
    _fake_repack_inputs("awq_to_gptq", qweight, qzeros, zero_format)
    K, N = qweight.shape[0], _size_mul("awq_to_gptq", "N = qweight.shape[1] * 8", qweight.shape[1], 8)
    _fake_multiple("awq_to_gptq", "K = qweight.shape[0]", K, 8, " (GPTQ packs 8 rows per int32)")
    _fake_repack_groups("awq_to_gptq", qzeros, K, N, "qweight.shape[0]")
    return qweight.new_empty((K // 8, N)), qzeros.new_empty(qzeros.shape)


@torch.library.register_fake("torch_ops::gptq_to_awq")
def _fake_gptq_to_awq(qweight, qzeros, zero_format="v1", g_idx=None):
    _on_one_device("gptq_to_awq", qweight, qzeros=qzeros, g_idx=g_idx)
    _fake_repack_inputs("gptq_to_awq", qweight, qzeros, zero_format)
    K, N = _size_mul("gptq_to_awq", "K = qweight.shape[0] * 8", qweight.shape[0], 8), qweight.shape[1]
    _fake_multiple("gptq_to_awq", "N = qweight.shape[1]", N, 8, " (AWQ packs 8 columns per int32)")
    _fake_repack_groups("gptq_to_awq", qzeros, K, N, "8 * qweight.shape[0]")
    if g_idx is not None:
        _fake_index_arg("gptq_to_awq", "g_idx", g_idx, qweight, K)
    return qweight.new_empty((K, N // 8)), qzeros.new_empty(qzeros.shape)


def _fake_outs(op, results, qweight_out, qzeros_out):
    """check_out of the .out overloads (after the inputs' checks, which gave ``results``): int32,
    the result's shape, contiguous. The out fakes checked the devices only, so a meta call took
    outs of any dtype or shape (and a bad zero_format or input) without a word, and a compiled
    call met the kernel's refusal only when the graph ran. (Overlap is the kernel's to see.)"""
    for arg, out, want in (("qweight_out", qweight_out, results[0]),
                           ("qzeros_out", qzeros_out, results[1])):
        _fake_dtype(op, arg, out, torch.int32)
        # (an if, not torch._check_value: Dynamo traces this too, from _copy_into, and refuses a
        # message closure over tensors)
        if list(out.shape) != list(want.shape):
            raise ValueError(f"{op}: {arg} must have the result's shape {_sz(list(want.shape))}, "
                             f"got {_sz(list(out.shape))}")
        if not out.is_contiguous():
            raise ValueError(f"{op}: {arg} must be contiguous")


def _fake_outs_given(op, qweight_out, qzeros_out):
    """check_outs_given: None for an out is refused, in the kernel's words"""
    for arg, out in (("qweight_out", qweight_out), ("qzeros_out", qzeros_out)):
        if out is None:
            raise ValueError(f"{op}: {arg} must be a tensor, got None")


@torch.library.register_fake("torch_ops::awq_to_gptq_out")
def _(qweight, qzeros, zero_format="v1", *, qweight_out, qzeros_out):
    _fake_outs_given("awq_to_gptq", qweight_out, qzeros_out)
    _on_one_device("awq_to_gptq", qweight, qzeros=qzeros, qweight_out=qweight_out,
                   qzeros_out=qzeros_out)
    _fake_outs("awq_to_gptq", _fake_awq_to_gptq(qweight, qzeros, zero_format), qweight_out,
               qzeros_out)
    return None


@torch.library.register_fake("torch_ops::gptq_to_awq_out")
def _(qweight, qzeros, zero_format="v1", g_idx=None, *, qweight_out, qzeros_out):
    _fake_outs_given("gptq_to_awq", qweight_out, qzeros_out)
    _on_one_device("gptq_to_awq", qweight, qzeros=qzeros, g_idx=g_idx,
                   qweight_out=qweight_out, qzeros_out=qzeros_out)
    _fake_outs("gptq_to_awq", _fake_gptq_to_awq(qweight, qzeros, zero_format, g_idx),
               qweight_out, qzeros_out)
    return None


@torch.library.register_fake("torch_ops::convert_gptq_zeros")
def _(qzeros, bits, src, dst):
    _fake_dtype("convert_gptq_zeros", "qzeros", qzeros, torch.int32)
    _dims("convert_gptq_zeros", "qzeros", qzeros, 2)
    _fake_bits("convert_gptq_zeros", bits, (2, 3, 4, 8))
    # (the fake took any src and dst: a meta call returned a result for "v3", and a compiled
    # call met the kernel's refusal only when the graph ran)
    _fake_zero_format("convert_gptq_zeros", src, "src")
    _fake_zero_format("convert_gptq_zeros", dst, "dst")
    return qzeros.new_empty(qzeros.shape)  # contiguous, as the kernel's, whatever qzeros' strides


@torch.library.register_fake("torch_ops::pack_v2")
def _(unpacked, check_range=True):
    _fake_dtype("pack_v2", "unpacked", unpacked, torch.uint8)
    _dims("pack_v2", "unpacked", unpacked, 2)
    N, K = unpacked.shape
    _fake_multiple("pack_v2", "N = unpacked.shape[0]", N, 4)
    _fake_multiple("pack_v2", "K = unpacked.shape[1]", K, 64)
    return unpacked.new_empty((N // 4, K), dtype=torch.int16)


@torch.library.register_fake("torch_ops::unpack_v2")
def _(packed):
    _fake_dtype("unpack_v2", "packed", packed, torch.int16)
    _dims("unpack_v2", "packed", packed, 2)
    N = _size_mul("unpack_v2", "N = packed.shape[0] * 4", packed.shape[0], 4)
    K = packed.shape[1]
    _fake_multiple("unpack_v2", "K = packed.shape[1]", K, 64)
    return packed.new_empty((N, K), dtype=torch.uint8)


@torch.library.register_fake("torch_ops::dequantize")
def _(qweight, scales, qzeros=None, format="gptq", bits=4, group_size=128, g_idx=None,
      zero_format="v1"):
    # the kernel's checks, in its order and words (sizes may be symbolic). Under torch.compile the
    # product composed for torch.func (_dequantize_composite) met a wrong scales first, in
    # torch's words ("The size of tensor a (8*s89) must match the size of tensor b (64)")
    op = "dequantize"
    if format not in ("gptq", "awq"):
        raise ValueError(f'{op}: format must be "gptq" or "awq", got "{format}"')
    _fake_dtype(op, "qweight", qweight, torch.int32)
    _fake_float(op, "scales", scales)
    _on_one_device(op, qweight, scales=scales)
    _dims(op, "qweight", qweight, 2)
    _dims(op, "scales", scales, 2)
    _fake_zero_format(op, zero_format)
    G, N = scales.shape
    if format == "awq":
        if bits != 4:
            raise ValueError(f'{op}: format="awq" is 4-bit only, got bits={_sz(bits)}')
        if g_idx is not None:
            raise ValueError(f'{op}: format="awq" takes no g_idx')
        K = qweight.shape[0]
        _fake_check(N % 8 == 0, lambda: f"{op}: N = scales.shape[1] = {_sz(N)} must be a "
                                        f"multiple of 8 for AWQ")
        _fake_shape(op, "qweight", qweight, [K, N // 8], "[K, N/8]")
    else:
        _fake_bits(op, bits, (2, 3, 4, 8))
        _fake_check(qweight.shape[1] == N, lambda: f"{op}: qweight.shape[1] = "
                                                   f"{_sz(qweight.shape[1])} must equal N = "
                                                   f"scales.shape[1] = {_sz(N)}")
        rows = qweight.shape[0]
        if g_idx is not None:
            _on_one_device(op, qweight, g_idx=g_idx)
            _dims(op, "g_idx", g_idx, 1)
            K = g_idx.shape[0]
        else:
            if bits == 3:
                _fake_check(rows % 3 == 0, lambda: (
                    f"{op}: qweight.shape[0] = {_sz(rows)} is not a whole number of 3-bit groups "
                    f"(bits=3 needs a multiple of 3 rows)"))
            K = rows * 32 // bits
            if isinstance(K, int) and K >= 2**63:  # (the kernel's size check, in its words)
                raise ValueError(f"{op}: K = qweight.shape[0] * 32 / bits = {rows} * 32 / "
                                 f"{_sz(bits)} overflows int64")
        words = (K * bits + 31) // 32
        _fake_check(rows == words, lambda: (
            f"{op}: qweight must have shape [ceil(K*bits/32), N] = {_sz([words, N])} for K = "
            f"{_sz(K)}, got {_sz(list(qweight.shape))}"))
    gs = _fake_group_size(op, group_size, K)
    if g_idx is None:
        groups = (K + gs - 1) // gs
        _fake_check(G == groups, lambda: f"{op}: scales must have shape [K/G, N] = "
                                         f"{_sz([groups, N])} for K = {_sz(K)} and "
                                         f"group_size = {_sz(group_size)}, got "
                                         f"{_sz(list(scales.shape))}")
    if qzeros is not None:
        _fake_dtype(op, "qzeros", qzeros, torch.int32)
        _on_one_device(op, qweight, qzeros=qzeros)
        _fake_shape(op, "qzeros", qzeros, [G, (N * (4 if format == "awq" else bits) + 31) // 32],
                    "[K/G, ceil(N*bits/32)]")
    if g_idx is not None:
        _fake_index(op, "g_idx", g_idx)
    return scales.new_empty((N, K))


@torch.library.register_fake("torch_ops::prepack_w4a16")
def _(qweight):
    _fake_dtype("prepack_w4a16", "qweight", qweight, torch.int32)
    _dims("prepack_w4a16", "qweight", qweight, 2)
    K = _size_mul("prepack_w4a16", "K = qweight.shape[0] * 8", qweight.shape[0], 8)
    _fake_multiple("prepack_w4a16", "K = 8 * qweight.shape[0]", K, 32,
                   " (the layout interleaves whole 32-k blocks)")
    return qweight.new_empty((qweight.shape[0] // 4, 4, qweight.shape[1]))


@torch.library.register_fake("torch_ops::unprepack_w4a16")
def _(qweight):
    _fake_dtype("unprepack_w4a16", "qweight", qweight, torch.int32)
    _dims("unprepack_w4a16", "qweight", qweight, 3)
    _fake_check(qweight.shape[1] == 4, lambda: f"unprepack_w4a16: qweight must have shape "
                                               f"[K/32, 4, N], got {_sz(list(qweight.shape))}")
    _size_mul("unprepack_w4a16", "K = qweight.shape[0] * 32", qweight.shape[0], 32)
    return qweight.new_empty((qweight.shape[0] * 4, qweight.shape[2]))


@torch.library.register_fake("torch_ops::w4a16_linear")
def _(x, qweight, scales, qzeros=None, group_size=128, g_idx=None, bias=None, zero_format="v1",
      perm=None):
    # check_w4a16_linear's checks, in its order and words (sizes may be symbolic): the fake
    # checked x against K only, so a meta-device call returned a result for input the kernel
    # refuses, and a compiled call met the kernel's error only when the graph ran
    op = "w4a16_linear"
    _fake_float(op, "x", x)
    _fake_dtype(op, "qweight", qweight, torch.int32)
    _fake_float(op, "scales", scales)
    _on_one_device(op, x, qweight=qweight, scales=scales)
    kil = qweight.dim() == 3  # k-interleaved [K/32, 4, N] or GPTQ [K/8, N]
    if not (qweight.dim() == 2 or (kil and qweight.shape[1] == 4)):
        raise ValueError(f"{op}: qweight must be [K/8, N] (GPTQ) or [K/32, 4, N] (prepack_w4a16), "
                         f"got shape {_sz(list(qweight.shape))}")
    _dims(op, "scales", scales, 2)
    _dims(op, "x", x)
    _fake_zero_format(op, zero_format)
    per_row = 32 if kil else 8
    K = _size_mul(op, f"K = qweight.shape[0] * {per_row}", qweight.shape[0], per_row)
    N = qweight.shape[-1]
    _fake_check(x.shape[-1] == K, lambda: f"{op}: x.shape[-1] = {_sz(x.shape[-1])} must equal "
                                          f"K = {per_row} * qweight.shape[0] = {_sz(K)}")
    if kil and g_idx is not None:
        raise ValueError(f"{op}: a k-interleaved qweight (prepack_w4a16) takes no g_idx (act-order "
                         f"weights: act_order_prepack first, then perm)")
    _fake_check(N % 8 == 0, lambda: f"{op}: N = qweight.shape[-1] = {_sz(N)} must be a multiple "
                                    f"of 8")
    gs = _fake_group_size(op, group_size, K)
    act = g_idx is not None  # (any number of groups, any K: a row shard of an act-order layer)
    _fake_check(act or K % gs == 0, lambda: f"{op}: K = {_sz(K)} must be a multiple of "
                                            f"group_size = {_sz(gs)}")
    G = scales.shape[0] if act else K // gs
    if kil:
        _fake_check(gs % 32 == 0 or gs == K, lambda: (
            f"{op}: group_size = {_sz(gs)} must be a multiple of 32 with a k-interleaved qweight "
            f"(prepack_w4a16)"))
    _fake_shape(op, "scales", scales, [G, N], "[groups, N]" if act else "[K/group_size, N]")
    if qzeros is not None:
        _fake_dtype(op, "qzeros", qzeros, torch.int32)
        _on_one_device(op, x, qzeros=qzeros)
        _fake_shape(op, "qzeros", qzeros, [G, N // 8],
                    "[scales.shape[0], N/8]" if act else "[K/group_size, N/8]")
    if g_idx is not None and perm is not None:  # (before g_idx's checks, as the kernels)
        raise ValueError(f"{op}: pass g_idx (act-order as stored) or perm (rows sorted by "
                         f"act_order_prepack), not both")
    if g_idx is not None:
        _fake_index_arg(op, "g_idx", g_idx, x, K)
    if perm is not None:
        _fake_index_arg(op, "perm", perm, x, K)
    if bias is not None:
        _fake_float(op, "bias", bias)
        _on_one_device(op, x, bias=bias)
        _fake_shape(op, "bias", bias, [N], "[N]")
    return x.new_empty((*x.shape[:-1], N))


# ---- dequantize's gradient with respect to scales ----------------------------------------------------
# w[n, k] = s[g(k), n] (q[k, n] - z[g(k), n]) is linear in the scales. The op's Autograd kernel is
# Python (dequantize is not on an inference hot path): a torch.autograd.Function with a backward
# and a jvp, and under torch.func's transforms, which cannot run a Function from inside an op's
# kernel, the same product composed of differentiable ops. torch.library.register_autograd's own
# Function was refused by torch 2.13's torch.func ("must override the setup_context
# staticmethod", pytorch/pytorch#170834) and gave the scales a zero tangent under jvp, silently.

def _dequantize_below_autograd(*args):
    with torch._C._AutoDispatchBelowAutograd():
        return _ops.dequantize.default(*args)


def _q_minus_z(qweight, qzeros, format, bits, group_size, g_idx, zero_format, scales_shape):
    """(q - z)[n, k] in fp32: the op itself with unit scales (exact)"""
    ones = torch.ones(scales_shape, dtype=torch.float32, device=qweight.device)
    return _dequantize_below_autograd(qweight, ones, qzeros, format, bits, group_size, g_idx,
                                      zero_format)


def _dequantize_composite(qweight, scales, qzeros, format, bits, group_size, g_idx, zero_format,
                          batched=False):
    """s[g(k), n] * (q - z)[n, k] from differentiable ops, then one rounding of the product to the
    scales' dtype, as the kernels round (``batched``: scales [B, G, N], the batching rule's)"""
    # the op reads unit fp32 scales here, so it checks the real scales' dtype, device and rank
    # only here: a float64 or complex scales went through jvp / grad and gave a result in its
    # dtype, where the op refuses it, and a 3-D one was broadcast into a 3-D weight
    _fake_float("dequantize", "scales", scales)
    _on_one_device("dequantize", qweight, scales=scales)
    _dims("dequantize", "scales", scales, 3 if batched else 2)
    q_minus_z = _q_minus_z(qweight, qzeros, format, bits, group_size, g_idx, zero_format,
                           scales.shape[-2:])  # [N, K]
    K = q_minus_z.shape[1]
    # (so that the gradient sums each group in fp32, as the backward does). Transposed before
    # the expansion, not after: torch 2.13's forward AD under torch.compile(dynamic=True) fails
    # on the tangent of a transposed view multiplied ("Cannot call storage_offset() on tensor
    # with symbolic sizes/strides", in _new_zeros_with_same_feature_meta): compiled jvp / jacfwd
    # (scales may have a leading batch dimension, the batching rule's: [B, G, N] gives [B, N, K])
    s = scales.float().transpose(-1, -2)  # [N, G]
    if g_idx is not None:
        # (an index, not index_select: torch 2.13's Inductor computes vmap over index_select's
        # backward wrongly, so compiled jacrev / vmap(grad) gave wrong scales derivatives with
        # act-order, silently; plain torch ops alike)
        per_k = s[..., g_idx.long()]  # [N, K]
    else:  # (repeat, not an index of arange(K) // G: see the backward's note on Inductor)
        # (at most K: a group_size past K is one group, and repeating by it allocated N *
        # group_size elements, out of memory for 2**40)
        per_k = s.repeat_interleave(torch.sym_min(_reference.group_len(K, group_size), K),
                                    dim=-1)[..., :K]
    return (q_minus_z * per_k).to(scales.dtype)


class _DequantizeScales(torch.autograd.Function):
    @staticmethod
    def forward(qweight, scales, qzeros, format, bits, group_size, g_idx, zero_format):
        return _dequantize_below_autograd(qweight, scales, qzeros, format, bits, group_size, g_idx,
                                          zero_format)

    @staticmethod
    def setup_context(ctx, inputs, output):
        qweight, scales, qzeros, format, bits, group_size, g_idx, zero_format = inputs
        ctx.args = (format, bits, group_size, zero_format, scales.shape, scales.dtype)
        ctx.save_for_backward(qweight, qzeros, g_idx)
        ctx.save_for_forward(qweight, qzeros, g_idx)  # (the jvp's ctx.saved_tensors)

    @staticmethod
    def backward(ctx, grad):
        """d/ds[g, n] sums grad[n, k] (q - z) over the k of group g"""
        qweight, qzeros, g_idx = ctx.saved_tensors
        format, bits, group_size, zero_format, shape, dtype = ctx.args
        grad_scales = None
        if ctx.needs_input_grad[1]:
            q_minus_z = _q_minus_z(qweight, qzeros, format, bits, group_size, g_idx, zero_format,
                                   shape)  # [N, K]
            K = q_minus_z.shape[1]
            terms = grad.float() * q_minus_z  # [N, K]
            if g_idx is None and K > 0:
                # plain groups: a sum over each run of rows (Inductor, torch 2.13, crashes
                # compiling the index_add_ below over an in-graph arange(K) // G with dynamic
                # shapes). K need not be a multiple of G (the last of the ceil(K / G) groups is
                # short): zero terms fill it, so that every run is G rows. At most K rows: a
                # group_size past K is one group, and padding to it allocated N * group_size
                # elements, out of memory for 2**40
                G = torch.sym_min(_reference.group_len(K, group_size), K)
                terms = torch.nn.functional.pad(terms, (0, shape[0] * G - K))
                grad_scales = terms.view(terms.shape[0], shape[0], G).sum(-1).t().to(dtype)
            else:
                group = (g_idx.long() if g_idx is not None else torch.arange(
                    K, device=grad.device) // _reference.group_len(K, group_size))
                grad_scales = torch.zeros(shape, dtype=torch.float32,
                                          device=grad.device).index_add_(0, group, terms.t()).to(dtype)
        return None, grad_scales, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, qweight_t, scales_t, qzeros_t, format_t, bits_t, group_size_t, g_idx_t,
            zero_format_t):
        """linear in the scales: the tangent is the op of the scales' tangent (the weights get
        none)"""
        qweight, qzeros, g_idx = ctx.saved_tensors
        format, bits, group_size, zero_format = ctx.args[:4]
        return _dequantize_below_autograd(qweight, scales_t, qzeros, format, bits, group_size,
                                          g_idx, zero_format)


_autograd_lib = torch.library.Library("torch_ops", "IMPL")


def _dequantize_autograd(qweight, scales, qzeros=None, format="gptq", bits=4, group_size=128,
                         g_idx=None, zero_format="v1"):
    args = (qweight, scales, qzeros, format, bits, group_size, g_idx, zero_format)
    if scales is None:  # (the dispatcher passes an undefined tensor on: the kernel's TypeError)
        return _dequantize_below_autograd(*args)
    if torch._C._functorch.peek_interpreter_stack() is not None:  # inside a torch.func transform
        return _dequantize_composite(*args)
    if not (torch.is_grad_enabled() and scales.requires_grad) and _forward_ad._current_level < 0:
        # nothing to differentiate (no forward-AD level is open either): the kernel itself.
        # Function.apply binds its arguments with inspect.signature on every call (a Function
        # with setup_context does): 67 us a call against the kernel's 5 us (CPU, N = 8, K = 64),
        # for every eager dequantize outside inference_mode
        return _dequantize_below_autograd(*args)
    return _DequantizeScales.apply(*args)


_autograd_lib.impl("dequantize", _dequantize_autograd, "Autograd")


# ---- the batching rule (torch.vmap) ----------------------------------------------------------------

def _stack_per_entry(op, args, dims, B):
    """op once per batch entry (args[i] selected at dims[i] where that is not None), stacked on
    dim 0: the batching rules' route for what has no batched kernel"""
    return torch.stack([op(*(a if d is None else a.select(d, b) for a, d in zip(args, dims)))
                        for b in range(B)])


@torch.library.register_vmap("torch_ops::dequantize")
def _(info, in_dims, qweight, scales, qzeros=None, format="gptq", bits=4, group_size=128,
      g_idx=None, zero_format="v1"):
    # One call per batch entry, stacked, as torch's fallback does (a batch of scales alone: one
    # product, below); the fallback refused a batch of size 0 ("does not support vmap over dims
    # of size 0"). There the op runs once on zero stand-ins of one entry (valid codes, group 0),
    # so that the arguments are still checked and the result has the op's shape and dtype:
    # [0, N, K].
    # (in_dims covers the arguments passed: the dispatcher leaves out trailing defaults)
    dims = tuple(in_dims) + (None,) * (8 - len(in_dims))
    args = (qweight, scales, qzeros, format, bits, group_size, g_idx, zero_format)
    B = info.batch_size
    if B == 0:
        one = _ops.dequantize.default(*(
            a if d is None else a.new_zeros(a.shape[:d] + a.shape[d + 1:])
            for a, d in zip(args, dims)))
        return one.new_empty((0, *one.shape)), 0
    if scales.dim() == 3 and all(d is None for i, d in enumerate(dims) if i != 1):
        # a batch of scales over one set of codes (learning scales): the product is linear in
        # them, so one product of (q - z) with the batch, the per-entry results bit for bit; the
        # loop over the entries was unrolled under torch.compile, one graph per batch size
        return _dequantize_composite(qweight, scales.movedim(dims[1], 0), *args[2:],
                                     batched=True), 0
    return _stack_per_entry(_ops.dequantize.default, args, dims, B), 0


@torch.library.register_vmap("torch_ops::w4a16_linear")
def _(info, in_dims, x, qweight, scales, qzeros=None, group_size=128, g_idx=None, bias=None,
      zero_format="v1", perm=None):
    # x is [..., K]: a vmapped x is one call with the batch as its leading dimension, and a
    # vmapped bias is added after an unbiased call (one rounding more than the fused bias).
    # Vmapped weights (rare) take one call per batch entry, as torch's fallback would, without
    # its warning.
    # (in_dims covers the arguments passed: the dispatcher leaves out trailing defaults)
    x_dim, qweight_dim, scales_dim, qzeros_dim, _, g_idx_dim, bias_dim, _, perm_dim = (
        tuple(in_dims) + (None,) * (9 - len(in_dims)))
    B = info.batch_size
    if any(d is not None for d in (qweight_dim, scales_dim, qzeros_dim, g_idx_dim, perm_dim)):
        args = (x, qweight, scales, qzeros, group_size, g_idx, bias, zero_format, perm)
        dims = (x_dim, qweight_dim, scales_dim, qzeros_dim, None, g_idx_dim, bias_dim, None,
                perm_dim)
        if B == 0:
            # nothing to stack: the op once on zero stand-ins of one entry, as dequantize's rule
            # does, so that the arguments are still checked (an empty result was returned for an
            # x of the wrong K or dtype) and the result has the op's shape and dtype
            one = _ops.w4a16_linear.default(*(
                a if d is None else a.new_zeros(a.shape[:d] + a.shape[d + 1:])
                for a, d in zip(args, dims)))
            return one.new_empty((0, *one.shape)), 0
        return _stack_per_entry(_ops.w4a16_linear.default, args, dims, B), 0
    if x_dim is not None and x.dim() == 1:
        # one entry of x is 0-D, which the op refuses; moved to dim 0, the batch was read as K:
        # with B == K, a [N] result of the whole batch as one row
        raise ValueError("w4a16_linear: x must have at least 1 dimension")
    if bias_dim is None:  # then x is the vmapped one
        return _ops.w4a16_linear.default(x.movedim(x_dim, 0), qweight, scales, qzeros, group_size,
                                         g_idx, bias, zero_format, perm), 0
    if x_dim is not None:
        x = x.movedim(x_dim, 0)
    out = _ops.w4a16_linear.default(x, qweight, scales, qzeros, group_size, g_idx, None,
                                    zero_format, perm)  # [B, ..., N], or [..., N] for one x
    # the op's checks of bias, on one entry (that call had none: a bias of shape [1] was
    # broadcast over N, a float64 or integer one added, silently), after the others, in the
    # kernel's order
    one = bias.new_zeros(bias.shape[:bias_dim] + bias.shape[bias_dim + 1:])
    _fake_float("w4a16_linear", "bias", one)
    _on_one_device("w4a16_linear", x, bias=one)
    _fake_shape("w4a16_linear", "bias", one, [qweight.shape[-1]], "[N]")
    # (N given, not -1: with B = 0, reshape could not infer it and raised)
    bias = bias.movedim(bias_dim, 0).reshape(B, *([1] * (out.dim() - (x_dim is not None) - 1)),
                                             qweight.shape[-1])
    return (out.float() + bias.float()).to(out.dtype), 0
