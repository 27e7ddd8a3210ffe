"""The k-interleaved qweight (prepack_w4a16 / unprepack_w4a16): the reference against a scalar
loop and literal words, the ops against the reference on every device (round trip, inputs left
alone, bad input), and w4a16_linear on a prepacked qweight against the GPTQ one and the float64
reference; opcheck, torch.compile, autograd."""
import pytest
import torch

import torch_ops
from torch_ops import _C
from torch_ops import reference as ref
from test_linear import TOL, make_weights, reference, rel_err

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
BAD_INPUT = (ValueError, TypeError, RuntimeError)  # TORCH_CHECK_VALUE / TORCH_CHECK_TYPE


def u32(t):
    """int32 words as unsigned Python ints, for comparing bit patterns"""
    return [int(v) & 0xFFFFFFFF for v in t.flatten().tolist()]


def rand_qweight(K, N, device="cpu"):
    """Random GPTQ words over the full 32-bit range (nibble 7 >= 8: negative int32)"""
    return torch.randint(-2**31, 2**31, (K // 8, N), dtype=torch.int64).to(torch.int32).to(device)


def scalar_prepack(qweight):
    """The layout's formula, one nibble at a time, in plain Python: [K/8, N] -> [K/32][4][N] of
    unsigned 32-bit ints"""
    words = u32(qweight)
    K, N = qweight.shape[0] * 8, qweight.shape[1]

    def q(k, n):
        return (words[(k // 8) * N + n] >> (4 * (k % 8))) & 15

    out = [[[0] * N for _ in range(4)] for _ in range(K // 32)]
    for b in range(K // 32):
        for t in range(4):
            for n in range(N):
                for i in range(8):
                    k = 32 * b + 16 * ((i >> 1) & 1) + 8 * (i & 1) + 2 * t + (i >> 2)
                    out[b][t][n] |= q(k, n) << (4 * i)
    return out


# ---- the reference --------------------------------------------------------------------------------

def test_reference_prepack_against_scalar_loop():
    qweight = rand_qweight(96, 24)
    before = qweight.clone()
    out = ref.prepack_w4a16(qweight)
    assert out.shape == (3, 4, 24) and out.dtype == torch.int32 and out.is_contiguous()
    assert torch.equal(qweight, before)
    expected = scalar_prepack(qweight)
    assert u32(out) == [w for block in expected for row in block for w in row]
    assert (out < 0).any()  # nibble 7 >= 8 gives negative words, stored as the same bits
    assert torch.equal(ref.unprepack_w4a16(out), qweight)


# K = 32, two columns: q[k, 0] = k % 16 (tells e, h and t apart, not jj) and q[k, 1] = k // 2
# (tells jj, h and t apart, not e). Words (b = 0, t = 0..3) computed once from the formula by hand
# with a scalar loop and pasted here.
LITERAL_GPTQ = [[0x76543210, 0x33221100], [0xFEDCBA98, 0x77665544],
                [0x76543210, 0xBBAA9988], [0xFEDCBA98, 0xFFEEDDCC]]
LITERAL_PREPACKED = [[0x91918080, 0xC840C840], [0xB3B3A2A2, 0xD951D951],
                     [0xD5D5C4C4, 0xEA62EA62], [0xF7F7E6E6, 0xFB73FB73]]


def literal_qweight(device="cpu"):
    k = torch.arange(32)
    q = torch.stack([k % 16, k // 2], dim=1).to(torch.uint8)  # [K = 32, N = 2]
    qweight = ref.pack(q, 4, dim=0)
    assert u32(qweight) == [w for row in LITERAL_GPTQ for w in row]
    return qweight.to(device)


def test_reference_literal_vector():
    qweight = literal_qweight()
    out = ref.prepack_w4a16(qweight)
    assert out.shape == (1, 4, 2)
    assert u32(out) == [w for row in LITERAL_PREPACKED for w in row]
    assert u32(out[..., :1]) == [0x91918080, 0xB3B3A2A2, 0xD5D5C4C4, 0xF7F7E6E6]  # N = 1 alone
    assert u32(ref.prepack_w4a16(qweight[:, :1].contiguous())) == u32(out[..., :1])
    assert out[0, 0, 0].item() < 0  # 0x91918080 as int32
    assert torch.equal(ref.unprepack_w4a16(out), qweight)
    # the same from the formula, in the test: nibble i of word t holds q[k(i, t)]
    for t in range(4):
        for col, f in enumerate((lambda k: k % 16, lambda k: k // 2)):
            word = sum(f(16 * ((i >> 1) & 1) + 8 * (i & 1) + 2 * t + (i >> 2)) << (4 * i)
                       for i in range(8))
            assert word == LITERAL_PREPACKED[t][col]


@pytest.mark.parametrize("K,N", [(32, 1), (64, 8), (4096, 24)])
def test_reference_round_trip_and_linear(K, N):
    qweight = rand_qweight(K, N)
    packed = ref.prepack_w4a16(qweight)
    assert packed.shape == (K // 32, 4, N)
    assert torch.equal(ref.unprepack_w4a16(packed), qweight)
    if N % 8 == 0:
        t = make_weights(K, N, 32)
        x = torch.randn(3, K, dtype=torch.float16)
        bias = torch.randn(N, dtype=torch.float16)
        args = (t["scales"], t["qzeros"], 32, None, bias, "v1")
        assert torch.equal(ref.w4a16_linear(x, ref.prepack_w4a16(t["qweight"]), *args),
                           ref.w4a16_linear(x, t["qweight"], *args))


def test_reference_bad_input():
    cases = [
        (torch.zeros(3, 8, dtype=torch.int32), r"prepack_w4a16: .*qweight"),  # K = 24
        (torch.zeros(4, 8, dtype=torch.int64), r"prepack_w4a16: .*qweight"),
        (torch.zeros(4, 8, dtype=torch.uint8), r"prepack_w4a16: .*qweight"),
        (torch.zeros(1, 4, 8, dtype=torch.int32), r"prepack_w4a16: .*qweight"),
        (torch.zeros(32, dtype=torch.int32), r"prepack_w4a16: .*qweight"),
    ]
    for qweight, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            ref.prepack_w4a16(qweight)
    for qweight in (torch.zeros(4, 8, dtype=torch.int32), torch.zeros(1, 4, 8, dtype=torch.int64),
                    torch.zeros(1, 3, 8, dtype=torch.int32)):
        with pytest.raises(ValueError, match=r"unprepack_w4a16: .*qweight"):
            ref.unprepack_w4a16(qweight)


# ---- the ops --------------------------------------------------------------------------------------

def test_op_literal_vector(device):
    qweight = literal_qweight(device)
    for prepack in (torch_ops.prepack_w4a16, torch.ops.torch_ops.prepack_w4a16):
        out = prepack(qweight)
        assert out.shape == (1, 4, 2) and out.dtype == torch.int32 and out.device == qweight.device
        assert u32(out) == [w for row in LITERAL_PREPACKED for w in row]
    for unprepack in (torch_ops.unprepack_w4a16, torch.ops.torch_ops.unprepack_w4a16):
        assert torch.equal(unprepack(out), qweight)


@pytest.mark.parametrize("K", [32, 96, 4096])
@pytest.mark.parametrize("N", [8, 24, 1000])
def test_op_matches_reference_and_round_trips(device, K, N):
    qweight = rand_qweight(K, N, device)
    before = qweight.clone()
    out = torch_ops.prepack_w4a16(qweight)
    assert torch.equal(qweight, before)  # the input is left alone
    assert out.shape == (K // 32, 4, N) and out.dtype == torch.int32 and out.device == qweight.device
    assert out.is_contiguous()
    assert torch.equal(out.cpu(), ref.prepack_w4a16(qweight.cpu()))
    packed = out.clone()
    back = torch_ops.unprepack_w4a16(out)
    assert torch.equal(out, packed)  # the input is left alone
    assert back.shape == (K // 8, N) and back.dtype == torch.int32 and back.is_contiguous()
    assert torch.equal(back, qweight)  # bit-exact round trip
    assert torch.equal(torch.ops.torch_ops.prepack_w4a16(qweight), out)
    assert torch.equal(torch.ops.torch_ops.unprepack_w4a16(out), qweight)


def test_op_scalar_loop(device):
    qweight = rand_qweight(96, 24, device)
    expected = scalar_prepack(qweight.cpu())
    assert u32(torch_ops.prepack_w4a16(qweight)) == [w for b in expected for r in b for w in r]


def test_op_non_contiguous_and_empty(device):
    wide = rand_qweight(64, 48, device)
    qweight = wide[:, ::2]  # strided columns
    assert not qweight.is_contiguous()
    out = torch_ops.prepack_w4a16(qweight)
    assert torch.equal(out.cpu(), ref.prepack_w4a16(qweight.cpu().contiguous()))
    packed = torch_ops.prepack_w4a16(wide).transpose(0, 2).contiguous().transpose(0, 2)
    assert not packed.is_contiguous()
    assert torch.equal(torch_ops.unprepack_w4a16(packed), wide)
    for shape in ((0, 8), (4, 0)):
        q = torch.zeros(shape, dtype=torch.int32, device=device)
        out = torch_ops.prepack_w4a16(q)
        assert out.shape == (shape[0] // 4, 4, shape[1])
        assert torch_ops.unprepack_w4a16(out).shape == shape


def test_op_bad_input(device):
    cases = [
        (torch_ops.prepack_w4a16, torch.zeros(3, 8, dtype=torch.int32), r"(?<!un)prepack_w4a16: .*qweight"),  # K = 24
        (torch_ops.prepack_w4a16, torch.zeros(5, 8, dtype=torch.int32), r"(?<!un)prepack_w4a16: .*qweight"),  # K = 40
        (torch_ops.prepack_w4a16, torch.zeros(4, 8, dtype=torch.int64), r"(?<!un)prepack_w4a16: .*qweight"),
        (torch_ops.prepack_w4a16, torch.zeros(4, 8, dtype=torch.float32), r"(?<!un)prepack_w4a16: .*qweight"),
        (torch_ops.prepack_w4a16, torch.zeros(1, 4, 8, dtype=torch.int32), r"(?<!un)prepack_w4a16: .*qweight"),
        (torch_ops.prepack_w4a16, torch.zeros(32, dtype=torch.int32), r"(?<!un)prepack_w4a16: .*qweight"),
        (torch_ops.unprepack_w4a16, torch.zeros(4, 8, dtype=torch.int32), r"unprepack_w4a16: .*qweight"),
        (torch_ops.unprepack_w4a16, torch.zeros(1, 3, 8, dtype=torch.int32), r"unprepack_w4a16: .*qweight"),
        (torch_ops.unprepack_w4a16, torch.zeros(1, 4, 8, dtype=torch.int64), r"unprepack_w4a16: .*qweight"),
    ]
    for op, qweight, pattern in cases:
        with pytest.raises(BAD_INPUT, match=pattern):
            op(qweight.to(device))


# ---- w4a16_linear on a prepacked qweight ----------------------------------------------------------

def prepacked(t):
    return dict(t, qweight=torch_ops.prepack_w4a16(t["qweight"]))


def check_linear(x, t, bias=None):
    """w4a16_linear on the prepacked qweight against the float64 reference and against the same
    call on the GPTQ qweight"""
    dtype = x.dtype
    tp = prepacked(t)
    out = torch_ops.w4a16_linear(x, bias=bias, **tp)
    assert out.shape == (*x.shape[:-1], t["qweight"].shape[1]) and out.dtype == dtype
    expected = reference(x, t, bias)
    assert rel_err(out, expected) < TOL[dtype]
    gptq = torch_ops.w4a16_linear(x, bias=bias, **t)
    assert rel_err(out, gptq.double().cpu()) < TOL[dtype]
    return out


MS = [1, 5, 16, 33, 64, 130, 300]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
GROUPS = [32, 128, -1]
ZEROS = ["v1", "v2", "sym"]  # sym: qzeros None
NS = [8, 24, 264]


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_prepacked(device, M, dtype):
    """Each (M, dtype) runs every group size, with zero format, bias, N and K rotating: across the
    sweep every pair of (M, dtype, group size, zero format, bias, N, K) values appears (but
    groups of 128 only with K = 4096)"""
    i = MS.index(M) * len(DTYPES) + DTYPES.index(dtype)
    sdt = torch.float16 if dtype == torch.float32 else dtype
    for j, gs in enumerate(GROUPS):
        zeros, with_bias, N = ZEROS[(i + j) % 3], (i // 3 + j) % 2 == 0, NS[(i + 2 * j) % 3]
        K = 4096 if gs == 128 else (64, 4096)[(i // 2 + j) % 2]
        t = make_weights(K, N, gs, zeros=zeros, device=device, scales_dtype=sdt)
        x = torch.randn(M, K, device=device, dtype=dtype)
        bias = torch.randn(N, device=device, dtype=dtype) if with_bias else None
        check_linear(x, t, bias)


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("zeros", ZEROS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_prepacked_every_group_zero_bias(device, group_size, zeros, with_bias):
    """The full cross product of group size, zero format and bias on a small shape, 2-D and 3-D x"""
    K, N = 256, 24
    t = make_weights(K, N, group_size, zeros=zeros, device=device)
    bias = torch.randn(N, device=device, dtype=torch.float16) if with_bias else None
    check_linear(torch.randn(5, K, device=device, dtype=torch.float16), t, bias)
    check_linear(torch.randn(2, 3, K, device=device, dtype=torch.float16), t, bias)
    check_linear(torch.randn(K, device=device, dtype=torch.float16), t, bias)


def isa_levels():
    return list(range(_C.cpu_isa_detected() + 1))


@pytest.mark.parametrize("level", isa_levels(), ids=lambda level: ["scalar", "avx2", "avx512"][level])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_prepacked_every_cpu_isa_path(level, dtype):
    K, N = 384, 264
    t = make_weights(K, N, 128, zeros="v2")
    bias = torch.randn(N).to(dtype)
    _C.cpu_isa_set(level)
    try:
        for M in (1, 17, 64):
            check_linear(torch.randn(M, K).to(dtype), t, bias)
    finally:
        _C.cpu_isa_set(-1)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_linear_prepacked_large_batch(dtype):
    """M = 2100: the large-batch (dense) route, on a prepacked qweight"""
    K, N = 4096, 264
    sdt = torch.float16 if dtype == torch.float32 else dtype
    t = make_weights(K, N, 128, zeros="v1", device="cuda", scales_dtype=sdt)
    x = torch.randn(2100, K, device="cuda", dtype=dtype)
    check_linear(x, t, torch.randn(N, device="cuda", dtype=dtype))


@needs_cuda
@pytest.mark.parametrize("dense", [1, 0], ids=["dense", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 7, 64, 300])
def test_cuda_linear_prepacked_forced_routes(dense, dtype, M):
    """Both CUDA routes forced at every batch size on a prepacked qweight"""
    K, N = 4096, 264
    sdt = torch.float16 if dtype == torch.float32 else dtype
    _C.cuda_w4a16_dense(dense)
    try:
        for gs, zeros in ((32, "v2"), (-1, "sym")):
            t = make_weights(K, N, gs, zeros=zeros, device="cuda", scales_dtype=sdt)
            check_linear(torch.randn(M, K, device="cuda", dtype=dtype), t,
                         torch.randn(N, device="cuda", dtype=dtype))
    finally:
        _C.cuda_w4a16_dense(-1)


def test_linear_prepacked_bad_input(device):
    K, N = 128, 16
    t = make_weights(K, N, 64, device=device)
    tp = prepacked(t)
    x = torch.randn(2, K, device=device)
    g_idx = (torch.arange(K, device=device) // 64).to(torch.int32)
    cases = [
        (dict(g_idx=g_idx), r"w4a16_linear: .*g_idx"),
        (dict(qweight=tp["qweight"][:, :3].contiguous()), r"w4a16_linear: .*qweight"),  # [K/32, 3, N]
        (dict(qweight=tp["qweight"].unsqueeze(0)), r"w4a16_linear: .*qweight"),  # 4-D
        (dict(qweight=tp["qweight"].to(torch.int64)), r"w4a16_linear: .*qweight"),
        (dict(x=torch.randn(2, K - 32, device=device)), r"w4a16_linear: x.shape\[-1\]"),
    ]
    for change, pattern in cases:
        args = dict(tp, x=x)
        args.update(change)
        with pytest.raises(BAD_INPUT, match=pattern):
            torch_ops.w4a16_linear(**args)
    # the same g_idx is fine with the GPTQ qweight
    torch_ops.w4a16_linear(x, **dict(t, g_idx=g_idx))


@pytest.mark.parametrize("group_size", [96, 160])
@pytest.mark.parametrize("M", [1, 16, 64, 300, 2100])
def test_linear_prepacked_groups_not_a_power_of_two(device, group_size, M):
    """A group of 96 or 160 is a multiple of 32, so the prepack is valid; the CUDA tensor-core
    tiles find a k's group by shifting (a power of two), which read k = 192..255 of group 96 as
    group 1: such a qweight takes a kernel that divides. Also behind a perm."""
    K, N = 4 * group_size, 264
    t = make_weights(K, N, group_size, zeros="v1", device=device, scales_dtype=torch.float16)
    x = torch.randn(M, K, device=device, dtype=torch.float16)
    check_linear(x, t)
    t = make_weights(K, N, group_size, zeros="v2", act_order=True, device=device)
    qw_sorted, perm = torch_ops.act_order_prepack(t["qweight"], t["g_idx"], group_size)
    out = torch_ops.w4a16_linear(x, torch_ops.prepack_w4a16(qw_sorted), t["scales"], t["qzeros"],
                                 group_size, zero_format="v2", perm=perm)
    assert rel_err(out, reference(x, t)) < TOL[torch.float16]


@pytest.mark.parametrize("M", [1, 16, 64, 300])
def test_linear_prepacked_with_perm(device, M):
    """act-order weights sorted by act_order_prepack, then k-interleaved: the op reads x[..., perm]
    and the words in their k order (every route: M = 300 and the forced dense route on CUDA)"""
    K, N, G = 256, 24, 64
    t = make_weights(K, N, G, zeros="v1", act_order=True, device=device, scales_dtype=torch.float16)
    qw_sorted, perm = torch_ops.act_order_prepack(t["qweight"], t["g_idx"], G)
    plain = {k: v for k, v in t.items() if k != "g_idx"}
    x = torch.randn(M, K, device=device, dtype=torch.float16)
    expected = torch_ops.w4a16_linear(x, **dict(plain, qweight=qw_sorted, perm=perm))
    routes = [-1, 1] if device == "cuda" else [-1]
    try:
        for route in routes:
            if device == "cuda":
                _C.cuda_w4a16_dense(route)
            out = torch_ops.w4a16_linear(x, **dict(plain, qweight=torch_ops.prepack_w4a16(qw_sorted), perm=perm))
            assert rel_err(out, expected.double().cpu()) < TOL[torch.float16]
            assert rel_err(out, reference(x, t)) < TOL[torch.float16]
    finally:
        if device == "cuda":
            _C.cuda_w4a16_dense(-1)


def test_gradient_wrt_x_prepacked(device):
    K, N = 128, 40
    t = make_weights(K, N, 64, device=device)
    tp = prepacked(t)
    bias = torch.randn(N, device=device)
    x0 = torch.randn(2, 3, K, device=device)
    outs, xgrads, bgrads = [], [], []
    grad = torch.randn(2, 3, N, device=device)
    for weights in (tp, t):
        x = x0.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        out = torch_ops.w4a16_linear(x, bias=b, **weights)
        out.backward(grad)
        outs.append(out.detach())
        xgrads.append(x.grad)
        bgrads.append(b.grad)
    assert rel_err(outs[0], outs[1].double().cpu()) < TOL[torch.float32]
    assert torch.allclose(xgrads[0], xgrads[1], rtol=1e-5, atol=1e-6)
    assert torch.allclose(bgrads[0], bgrads[1], rtol=1e-5, atol=1e-6)
    w = ref.dequantize(t["qweight"].cpu(), t["scales"].cpu().float(), t["qzeros"].cpu(), "gptq", 4,
                       64, None, "v1")
    assert torch.allclose(xgrads[0].cpu(), grad.cpu() @ w, rtol=1e-4, atol=1e-4)
    assert torch.allclose(bgrads[0].cpu(), grad.cpu().sum((0, 1)), rtol=1e-4, atol=1e-4)


def test_opcheck(device):
    qweight = rand_qweight(96, 24, device)
    torch.library.opcheck(torch.ops.torch_ops.prepack_w4a16, (qweight,))
    torch.library.opcheck(torch.ops.torch_ops.unprepack_w4a16, (torch_ops.prepack_w4a16(qweight),))
    t = make_weights(128, 24, 32, zeros="v2", device=device)
    x = torch.randn(3, 128, device=device, requires_grad=True)
    bias = torch.randn(24, device=device)
    torch.library.opcheck(torch.ops.torch_ops.w4a16_linear,
                          (x, torch_ops.prepack_w4a16(t["qweight"]), t["scales"], t["qzeros"], 32,
                           None, bias, "v2"))
    t = make_weights(128, 24, -1, zeros="sym", device=device)
    torch.library.opcheck(torch.ops.torch_ops.w4a16_linear,
                          (x, torch_ops.prepack_w4a16(t["qweight"]), t["scales"], None, -1, None,
                           None, "v2", None))


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    t = make_weights(256, 64, 128, device=device)
    qweight = t.pop("qweight")

    def mlp(x, qweight):
        packed = torch_ops.prepack_w4a16(qweight)
        y = torch.relu(torch_ops.w4a16_linear(x, packed, **t)) * 2
        return y, torch_ops.unprepack_w4a16(packed)

    x = torch.randn(4, 256, device=device, dtype=torch.float16)
    eager = mlp(x, qweight)
    compiled = torch.compile(mlp, fullgraph=True)(x, qweight)
    assert torch.equal(compiled[0], eager[0])
    assert torch.equal(compiled[1], qweight)
    assert rel_err(eager[0], reference(x, dict(t, qweight=qweight)).relu() * 2) < TOL[torch.float16]


def test_linear_prepacked_group_must_hold_whole_blocks(device):
    """a 32-k block of the interleave must lie in one group: group 48 is refused, -1 is fine"""
    K, N = 96, 16
    qweight = torch.randint(-2**31, 2**31, (K // 8, N), dtype=torch.int32, device=device)
    x = torch.randn(2, K, device=device, dtype=torch.float16)
    kil = torch_ops.prepack_w4a16(qweight)
    scales = torch.rand(2, N, device=device, dtype=torch.float16)
    with pytest.raises((ValueError, RuntimeError), match="w4a16_linear: group_size = 48 must be a multiple of 32"):
        torch_ops.w4a16_linear(x, kil, scales, None, 48)
    out = torch_ops.w4a16_linear(x, kil, scales[:1], None, -1)
    torch.testing.assert_close(out, torch_ops.w4a16_linear(x, qweight, scales[:1], None, -1))


@needs_cuda
@pytest.mark.parametrize("M", [1, 40])
def test_cuda_linear_prepacked_misaligned_qweight(M):
    """a prepacked qweight 4 bytes off 16-byte alignment: the CUDA-core fallback reads the layout too"""
    K, N = 256, 24
    t = make_weights(K, N, 64, zeros="v2", device="cuda", scales_dtype=torch.float16)
    kil = torch_ops.prepack_w4a16(t["qweight"])
    buf = torch.empty(kil.numel() + 1, dtype=torch.int32, device="cuda")
    buf[1:].copy_(kil.flatten())
    tp = dict(t, qweight=buf[1:].view(kil.shape))
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    out = torch_ops.w4a16_linear(x, **tp)
    assert rel_err(out, reference(x, t)) < TOL[torch.float16]
