"""Pure-PyTorch reference implementations of every torch_ops op.

These are the oracle the tests compare the C and CUDA kernels against, and readable documentation
of the formats (see FORMATS.md): slow, simple, and written from the spec rather than from the
kernels. Signatures match the public functions in ``torch_ops``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ word holds logical column AWQ_ORDER[i]
AWQ_REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]  # logical column j sits in nibble AWQ_REVERSE[j]


def _word_bits(dtype: torch.dtype) -> int:
    if dtype == torch.int32:
        return 32
    if dtype == torch.uint8:
        return 8
    raise ValueError(f"pack: dtype must be torch.int32 or torch.uint8, got {dtype}")


def _to_word_dtype(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # words hold unsigned values in int64; int32 words are the same bit pattern, two's complement
    if dtype == torch.int32:
        words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(dtype)


def pack(values, bits, dim=-1, order="sequential", dtype=torch.int32):
    """Pack uint8 values (< 2**bits) least-significant first along ``dim`` into ``dtype`` words.

    A packed run is one little-endian bit stream cut into words, so 3-bit packs 32 values into
    3 int32 words (8 into 3 bytes). ``order="awq"`` stores logical column 8c + AWQ_ORDER[i] in
    nibble i of word c (4-bit int32 only)."""
    wbits = _word_bits(dtype)
    v = values.movedim(dim, -1).to(torch.int64)
    if order == "awq":
        v = v.unflatten(-1, (-1, 8))[..., AWQ_ORDER].flatten(-2)
    shifts = torch.arange(bits, device=v.device)
    stream = ((v.unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [..., L*bits], LSB first
    stream = stream.unflatten(-1, (-1, wbits))
    words = (stream << torch.arange(wbits, device=v.device)).sum(-1)
    return _to_word_dtype(words, dtype).movedim(-1, dim).contiguous()


def _fields(packed, bits, dim, count=None):
    """The values of each run along ``dim`` (moved last, int64), read from its LSB-first bit
    stream: all of them, or the first ``count``. A GPTQ 3-bit buffer of ceil(count * 3 / 32)
    words (FORMATS.md section 1) can end inside a 3-word group, in part of a value: only
    ``count`` says where its values end."""
    wbits = _word_bits(packed.dtype)
    w = packed.movedim(dim, -1).to(torch.int64) & (2**wbits - 1)
    stream = ((w.unsqueeze(-1) >> torch.arange(wbits, device=w.device)) & 1).flatten(-2)
    if count is not None:
        stream = stream[..., :count * bits]
    stream = stream.unflatten(-1, (-1, bits))
    return (stream << torch.arange(bits, device=w.device)).sum(-1)


def unpack(packed, bits, dim=-1, order="sequential"):
    """Exact inverse of :func:`pack`: returns uint8 values."""
    v = _fields(packed, bits, dim)
    if order == "awq":
        v = v.unflatten(-1, (-1, 8))[..., AWQ_REVERSE].flatten(-2)
    return v.to(torch.uint8).movedim(-1, dim).contiguous()


def _zeros_encode(z, zero_format, bits=4):
    # v1 stores z - 1, masked per field (z = 0 is stored as 2**bits - 1, never a borrow)
    return (z.to(torch.int64) - (1 if zero_format == "v1" else 0)) & (2**bits - 1)


def _zeros_decode(field, zero_format, bits=4):
    return (field.to(torch.int64) + (1 if zero_format == "v1" else 0)) & (2**bits - 1)


def awq_to_gptq(qweight, qzeros, zero_format="v1"):
    """AWQ qweight [K, N/8] / qzeros [K/G, N/8] -> GPTQ qweight [K/8, N] / qzeros [K/G, N/8]."""
    q = unpack(qweight, 4, dim=1, order="awq")  # [K, N]
    z = unpack(qzeros, 4, dim=1, order="awq")  # [G, N]
    return pack(q, 4, dim=0), pack(_zeros_encode(z, zero_format).to(torch.uint8), 4, dim=1)


def gptq_to_awq(qweight, qzeros, zero_format="v1", g_idx=None):
    """GPTQ -> AWQ, the exact inverse of :func:`awq_to_gptq` (refuses act-order g_idx)."""
    if g_idx is not None:
        K = qweight.shape[0] * 8
        G = qzeros.shape[0]
        g = g_idx.to(torch.int64).cpu()
        if K % G != 0 or not torch.equal(g, torch.arange(K) // (K // G)):
            if bool((g[1:] >= g[:-1]).all()):
                raise ValueError("gptq_to_awq: g_idx is sorted but does not match qzeros' "
                                 f"{G} groups (not arange(K) // group_size)")
            raise ValueError("gptq_to_awq: g_idx is act-order (not arange(K) // group_size)")
    q = unpack(qweight, 4, dim=0)
    z = _zeros_decode(unpack(qzeros, 4, dim=1), zero_format)
    return pack(q, 4, dim=1, order="awq"), pack(z.to(torch.uint8), 4, dim=1, order="awq")


def convert_gptq_zeros(qzeros, bits, src, dst):
    """GPTQ qzeros v1 <-> v2, field by field (no carry or borrow between fields).

    Each row is one bit stream of floor(row_words * 32 / bits) fields. The bits left over are
    copied unchanged: a 3-bit row sized ceil(N * 3 / 32) words, as GPTQModel sizes them, ends in
    part of a field."""
    if src == dst:
        return qzeros.clone()
    w = qzeros.to(torch.int64) & (2**32 - 1)
    stream = ((w.unsqueeze(-1) >> torch.arange(32, device=w.device)) & 1).flatten(-2)  # LSB first
    used = qzeros.shape[1] * 32 // bits * bits
    shifts = torch.arange(bits, device=w.device)
    z = (stream[:, :used].unflatten(-1, (-1, bits)) << shifts).sum(-1)
    z = (z + (1 if src == "v1" else -1)) & (2**bits - 1)
    stream = torch.cat([((z.unsqueeze(-1) >> shifts) & 1).flatten(-2), stream[:, used:]], dim=-1)
    words = (stream.unflatten(-1, (-1, 32)) << torch.arange(32, device=w.device)).sum(-1)
    return _to_word_dtype(words, torch.int32)


def pack_v2(unpacked):
    """quanto pack_v2: uint8 [N, K] -> int16 [N/4, K] (seed 001, same reshapes)."""
    N, K = unpacked.shape
    p = unpacked.reshape(N, K // 32, 4, 4, 2).permute(0, 1, 3, 2, 4)
    p = p.permute(0, 1, 2, 4, 3).reshape(N, K)
    p = p.reshape(N // 4, 4, K // 64, 64).permute(0, 2, 1, 3).reshape(N // 4, K // 64, 64, 4)
    p = p.to(torch.int32)
    p = p[..., 0] | (p[..., 1] << 4) | (p[..., 2] << 8) | (p[..., 3] << 12)
    return p.reshape(N // 4, K).to(torch.int16).contiguous()


def unpack_v2(packed):
    """Inverse of :func:`pack_v2`: int16 [N/4, K] -> uint8 [N, K]."""
    R, K = packed.shape
    w = packed.to(torch.int32) & 0xFFFF
    p = torch.stack([(w >> (4 * j)) & 15 for j in range(4)], dim=-1)  # [R, K, 4]
    p = p.reshape(R, K // 64, 4, 64).permute(0, 2, 1, 3).reshape(R * 4, K)
    # undo the per-32 reorder: position 8b + 4e + a holds original 8a + 2b + e
    p = p.reshape(R * 4, K // 32, 4, 2, 4).permute(0, 1, 4, 2, 3).reshape(R * 4, K)
    return p.to(torch.uint8).contiguous()


def group_len(K, group_size):
    """rows of K per group: group_size, or all K where it is -1 (one group)"""
    return K if group_size == -1 else group_size


def dequantize(qweight, scales, qzeros=None, format="gptq", bits=4, group_size=128, g_idx=None,
               zero_format="v1"):
    """Float weight [N, K] (nn.Linear orientation) in scales.dtype, from AWQ or GPTQ tensors."""
    if format == "awq":
        q = unpack(qweight, 4, dim=1, order="awq").to(torch.int64)  # [K, N]
        K = q.shape[0]
        G = group_len(K, group_size)
        z = (unpack(qzeros, 4, dim=1, order="awq").to(torch.int64) if qzeros is not None
             else torch.full_like(scales, 8, dtype=torch.int64))
        g = torch.arange(K, device=q.device) // G
    else:
        N = scales.shape[1]
        K = None if g_idx is None else g_idx.shape[0]  # None: every value qweight's words hold
        q = _fields(qweight, bits, 0, K).movedim(-1, 0)  # [K, N]
        K = q.shape[0]
        G = group_len(K, group_size)
        if qzeros is None:
            z = torch.full(scales.shape, 2 ** (bits - 1), dtype=torch.int64, device=q.device)
        else:
            z = _zeros_decode(_fields(qzeros, bits, 1, N), zero_format, bits)
        g = (torch.arange(K, device=q.device) // G if g_idx is None else g_idx.to(torch.int64))
    w = scales[g].float() * (q - z[g]).float()  # [K, N], fp32, rounded once below
    return w.t().contiguous().to(scales.dtype)


def _div(t, d: int):
    """t / d, correctly rounded on every device: CUDA torch multiplies by the reciprocal when the
    divisor is a Python number (1/15 is inexact), which moved scales by an ulp and flipped codes
    on ties against a CPU run."""
    return t / torch.full_like(t, d)


def rtn(weight, bits=4, group_size=128, sym=False, format="gptq", scales_dtype=None):
    """Round-to-nearest grid of an nn.Linear weight [N, K]: returns (q [K, N] uint8,
    z [K/G, N] uint8, scales [K/G, N]).

    format "gptq": GPTQ's formulas (range widened to include 0; symmetric z = 2**(bits-1));
    format "awq": AutoAWQ's (s = (max - min) / maxq, z = clamp(-round(min / s), 0, maxq)).
    Scales are kept in ``scales_dtype`` (default: the weight's dtype when fp16/bf16, else fp16)
    and q is computed with the stored scale, so dequantize() gives the nearest grid point; so is
    format "awq"'s z (a group spanning +-a has -min / s = 7.5 for the unrounded scale, off the
    tie for the stored one)."""
    N, K = weight.shape
    G = group_len(K, group_size)
    maxq = 2**bits - 1
    if scales_dtype is None:
        scales_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float16
    w = weight.detach().float().reshape(N, K // G, G)
    wmin, wmax = w.amin(-1), w.amax(-1)
    nonfinite = ~(torch.isfinite(wmin) & torch.isfinite(wmax))  # amin / amax propagate NaN and inf
    if sym:
        amax = torch.maximum(wmin.abs(), wmax)
        s = _div(2 * amax, maxq).clamp(min=1e-5)
        z = torch.full_like(s, 2 ** (bits - 1))
    elif format == "awq":
        s = _div((wmax - wmin).clamp(min=1e-5), maxq)
        z = None  # from the stored scale, below: AutoAWQ's z = -round(min / s) uses the s it stores
    else:
        wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
        s = _div(wmax - wmin, maxq).clamp(min=1e-5)
        z = torch.round(-wmin / s).clamp(0, maxq)
    stored = s.to(scales_dtype)
    # A scale past scales_dtype's range (fp16: a group spanning more than 15 * 65504 at 4 bits)
    # is stored as inf, and its whole group would dequantize to inf * 0 = NaN: refused. (A read of
    # values, so a sync on CUDA, once at quantize time; torch_ops.quantize runs this inside its
    # custom op, whose body torch.compile does not trace, so compiled calls check it too.)
    # A NaN or inf weight makes its group's scale NaN or inf (amin / amax propagate both), and
    # its codes undefined (NaN cast to uint8): refused too, in the same read. So is a finite
    # group whose range (max - min, or 2 * max |w| with sym) overflows float32, where the scale
    # is computed: its scale is inf as well, and it was reported as a NaN or inf weight.
    bad = ~torch.isfinite(s)
    overflow = torch.isinf(stored) & ~bad
    if bool((bad | overflow).any()):
        if bool(bad.any()):
            if bool(nonfinite.any()):
                n, g = (int(i) for i in nonfinite.nonzero()[0])
                group = weight.detach()[n, g * G:g * G + G]
                # (a float64 weight past float32's range is inf in w, not in the weight: it was
                # reported as a NaN or inf value, which it has not)
                if bool(torch.isfinite(group).all()):
                    raise ValueError(f"quantize: weight has a value past float32's range in row "
                                     f"{n}, columns {g * G}..{g * G + G - 1} (group {g}), "
                                     f"{float(group.abs().max()):.6g} (quantize computes in "
                                     f"float32, whose largest is "
                                     f"{torch.finfo(torch.float32).max:.6g}): scale them down")
                raise ValueError(f"quantize: weight has a NaN or inf value in row {n}, columns "
                                 f"{g * G}..{g * G + G - 1} (group {g})")
            n, g = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"quantize: the range of row {n}, columns {g * G}..{g * G + G - 1} "
                             f"(group {g}), max - min (2 * max |w| with sym=True), overflows "
                             f"float32 (over {torch.finfo(torch.float32).max:.6g}); its weights "
                             "are finite: scale them down")
        raise ValueError(f"quantize: scales overflow scales_dtype={scales_dtype} (a group needs a "
                         f"scale of {float(s[overflow].max()):.6g}, the largest "
                         f"{scales_dtype} is {torch.finfo(scales_dtype).max:.6g}); pass "
                         "scales_dtype=torch.float32")
    s = stored
    if z is None:
        z = (-torch.round(wmin / s.float())).clamp(0, maxq)
    q = (torch.round(w / s.float().unsqueeze(-1)) + z.unsqueeze(-1)).clamp(0, maxq)
    q = q.reshape(N, K).to(torch.uint8).t().contiguous()
    return q, z.to(torch.uint8).t().contiguous(), s.t().contiguous()


def quantize(weight, bits=4, group_size=128, sym=False, format="gptq", zero_format="v1",
             scales_dtype=None):
    """Quantize an nn.Linear weight [N, K] (see :func:`rtn`) into AWQ or GPTQ tensors."""
    q, z, scales = rtn(weight, bits, group_size, sym, format, scales_dtype)
    if format == "awq":
        return {"qweight": pack(q, 4, dim=1, order="awq"),
                "qzeros": pack(z, 4, dim=1, order="awq"), "scales": scales}
    K = q.shape[0]
    return {"qweight": pack(q, bits, dim=0),
            "qzeros": pack(_zeros_encode(z, zero_format, bits).to(torch.uint8), bits, dim=1),
            "scales": scales,
            "g_idx": (torch.arange(K, device=q.device) // group_len(K, group_size)).to(torch.int32)}


def w4a16_linear(x, qweight, scales, qzeros=None, group_size=128, g_idx=None, bias=None,
                 zero_format="v1"):
    """F.linear(x, dequantize(...), bias) with the product computed in fp32. qweight may be the
    k-interleaved [K/32, 4, N] of :func:`prepack_w4a16`."""
    if qweight.dim() == 3:
        qweight = unprepack_w4a16(qweight)
    w = dequantize(qweight, scales.float(), qzeros, "gptq", 4, group_size, g_idx, zero_format)
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


# k-interleaved qweight: word (b, t, n) nibble i = 4 e + 2 jj + h holds
# k = 32 b + 16 jj + 8 h + 2 t + e, i.e. q[32 b + 16 ((i >> 1) & 1) + 8 (i & 1) + 2 t + (i >> 2), n]


def prepack_w4a16(qweight):
    """GPTQ 4-bit qweight [K/8, N] -> k-interleaved int32 [K/32, 4, N] (K a multiple of 32)."""
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(f"prepack_w4a16: qweight must be 2-D int32 [K/8, N], got "
                         f"{qweight.dtype} of shape {list(qweight.shape)}")
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    if K % 32 != 0:
        raise ValueError(f"prepack_w4a16: K = 8 * qweight.shape[0] = {K} must be a multiple of 32")
    q = unpack(qweight, 4, dim=0).reshape(K // 32, 2, 2, 4, 2, N)  # [b, jj, h, t, e, n]
    q = q.permute(0, 3, 4, 1, 2, 5).reshape(K // 32, 4, 8, N)  # [b, t, i = 4 e + 2 jj + h, n]
    return pack(q, 4, dim=2).squeeze(2).contiguous()


def unprepack_w4a16(qweight):
    """Exact inverse of :func:`prepack_w4a16`: [K/32, 4, N] -> GPTQ [K/8, N]."""
    if qweight.dim() != 3 or qweight.shape[1] != 4 or qweight.dtype != torch.int32:
        raise ValueError(f"unprepack_w4a16: qweight must be int32 [K/32, 4, N], got "
                         f"{qweight.dtype} of shape {list(qweight.shape)}")
    B, _, N = qweight.shape
    q = unpack(qweight.unsqueeze(2), 4, dim=2).reshape(B, 4, 2, 2, 2, N)  # [b, t, e, jj, h, n]
    q = q.permute(0, 3, 4, 1, 2, 5).reshape(B * 32, N)  # k = 32 b + 16 jj + 8 h + 2 t + e
    return pack(q, 4, dim=0)


def fused_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn,
                  transposed=False):
    """What transformers 5's fused MoE experts compute (its eager loop): token t's expert
    e = top_k_index[t, k] (indices outside [0, E) skipped) adds top_k_weights[t, k] *
    down_e(act_fn(gate_e(x_t)) * up_e(x_t)), gate_up_proj [E, 2I, H] holding gate's rows then
    up's, down_proj [E, H, I] (both [E, in, out] where ``transposed``); the reference of
    ``torch_ops.UnfusedExperts``."""
    out = torch.zeros_like(hidden_states)
    for e in torch.unique(top_k_index).tolist():  # (the experts hit, as transformers loops)
        if not 0 <= e < gate_up_proj.shape[0]:
            continue
        token, k = torch.where(top_k_index == e)
        gate_up, down = gate_up_proj[e], down_proj[e]
        if transposed:
            gate_up, down = gate_up.t(), down.t()
        gate, up = F.linear(hidden_states[token], gate_up).chunk(2, dim=-1)
        y = F.linear(act_fn(gate) * up, down) * top_k_weights[token, k, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out
