"""The fused w4a16 linear against a float64 reference: shapes, dtypes, group sizes, act-order,
zero formats, bias, every CPU instruction-set path and CUDA; autograd, opcheck, torch.compile,
CUDA graphs and bad input."""
import os

import pytest
import torch
import torch.nn.functional as F

import torch_ops
from torch_ops import _C
from torch_ops import reference as ref

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_weights(K, N, group_size, zeros="v1", act_order=False, device="cpu",
                 scales_dtype=torch.float16):
    """Random GPTQ tensors with every zero point (0 and 15 included) and non-trivial scales."""
    G = K if group_size == -1 else group_size
    q = torch.randint(0, 16, (K, N), dtype=torch.uint8)
    z = torch.randint(0, 16, (K // G, N), dtype=torch.uint8)
    z[0, :2] = torch.tensor([0, 15], dtype=torch.uint8)
    t = {
        "qweight": torch_ops.pack(q, 4, dim=0).to(device),
        "scales": ((torch.rand(K // G, N) + 0.5) / 64).to(scales_dtype).to(device),
        "qzeros": None if zeros == "sym" else torch_ops.pack(
            ((z.long() - int(zeros == "v1")) & 15).to(torch.uint8), 4, dim=1).to(device),
        "group_size": group_size,
        "g_idx": ((torch.randperm(K) // G).to(torch.int32).to(device) if act_order else None),
        "zero_format": "v2" if zeros == "sym" else zeros,
    }
    return t


def reference(x, t, bias=None):
    w = ref.dequantize(t["qweight"].cpu(), t["scales"].cpu().float(),
                       None if t["qzeros"] is None else t["qzeros"].cpu(), "gptq", 4,
                       t["group_size"], None if t["g_idx"] is None else t["g_idx"].cpu(),
                       t["zero_format"]).double()
    return F.linear(x.cpu().double(), w, None if bias is None else bias.cpu().double())


def rel_err(out, expected):
    return ((out.cpu().double() - expected).norm() / expected.norm()).item()


def isa_levels():
    return list(range(_C.cpu_isa_detected() + 1))


@pytest.fixture(params=isa_levels(), ids=lambda level: ["scalar", "avx2", "avx512"][level])
def cpu_isa(request):
    _C.cpu_isa_set(request.param)
    yield request.param
    _C.cpu_isa_set(-1)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_infinite_activation_gives_what_f_linear_gives(cpu_isa, dtype, act_order):
    """An inf in x: +-inf where F.linear on the dequantized weight gives it, NaN only where it
    does (inf - inf, or a zero weight times inf: the blocked path makes s (q - z) exactly zero
    there). The GEMVs factor the zero point out of their sums, which made inf - inf = NaN of
    every column, so they hand such an x to a path that multiplies every weight."""
    K, N = 256, 64
    t = make_weights(K, N, 64, act_order=act_order, scales_dtype=dtype)
    for M in (1, 5, 40):
        x = torch.randn(M, K).to(dtype)
        x[0, 3] = float("inf")
        x[-1, 100] = -float("inf")
        out = torch_ops.w4a16_linear(x, **t).double()
        expected = reference(x, t)
        infinite = expected.isinf()
        assert torch.equal(out[infinite], expected[infinite]), (M, out[0, :8], expected[0, :8])
        assert torch.equal(out.isnan(), expected.isnan()), M
        if M > 2:  # the rows without an inf
            assert rel_err(out[1:-1], expected[1:-1]) < TOL[dtype]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_infinite_scale_gives_what_f_linear_gives(cpu_isa, dtype, act_order):
    """A scale of +-inf: F.linear on the dequantized weight has NaN in that column wherever a
    weight of the group sits at its zero point (inf * 0), which the GEMVs' s * (sum q x - z sum x)
    and the bf16 blocked path's s * sum gave as +-inf; they hand such a call to the blocked fp32
    path. The other columns keep their accuracy."""
    K, N = 256, 64
    t = make_weights(K, N, 64, act_order=act_order,
                     scales_dtype=dtype if dtype != torch.float32 else torch.float16)
    t["scales"][0, 3] = float("inf")
    t["scales"][-1, 4] = -float("inf")
    for M in (1, 5, 12, 16, 40):
        x = torch.randn(M, K).to(dtype)
        out = torch_ops.w4a16_linear(x, **t).double()
        expected = reference(x, t)
        infinite = expected.isinf()
        assert torch.equal(out[infinite], expected[infinite]), M
        assert torch.equal(out.isnan(), expected.isnan()), (M, out[:, 3:5], expected[:, 3:5])
        finite = [n for n in range(N) if n not in (3, 4)]
        assert rel_err(out[:, finite], expected[:, finite]) < TOL[dtype]


@pytest.mark.parametrize("M", [1, 8])
def test_act_order_gemv_rtn_weights_positive_x(cpu_isa, M):
    """The act-order GEMV (M <= 8, g_idx whose groups change inside a word) starts y at minus the
    zero-point term of all K and adds each chunk's sum q s x to it: with RTN weights (codes near
    their zero point) and x of one sign the result is far smaller than either, and the rounding
    of those additions grew with sqrt(K): 4.7e-5 relative at K = 8192, 1.9e-4 at 32768. Kept
    exact now (TwoSum), it is as accurate as the scalar path."""
    K, N, gs = 8192, 64, 32
    torch.manual_seed(0)
    q = torch_ops.quantize(torch.randn(N, K), 4, gs)
    t = {"qweight": q["qweight"], "scales": q["scales"], "qzeros": q["qzeros"], "group_size": gs,
         "g_idx": (torch.randperm(K) // gs).to(torch.int32), "zero_format": "v1"}
    x = torch.rand(M, K) + 1
    assert rel_err(torch_ops.w4a16_linear(x, **t), reference(x, t)) < TOL[torch.float32]


@pytest.mark.parametrize("x_shape", [(1,), (3,), (2, 5), (33,), (64,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_batch_shapes_and_dtypes(device, x_shape, dtype):
    K, N = 256, 200
    t = make_weights(K, N, 64, device=device)
    x = torch.randn(*x_shape, K, device=device).to(dtype)
    out = torch_ops.w4a16_linear(x, **t)
    assert out.shape == (*x_shape, N) and out.dtype == dtype
    assert rel_err(out, reference(x, t)) < TOL[dtype]


@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("zeros", ["v1", "v2", "sym"])
@pytest.mark.parametrize("act_order", [False, True])
def test_group_sizes_zero_formats_act_order(device, group_size, zeros, act_order):
    K, N, M = 512, 72, 5
    t = make_weights(K, N, group_size, zeros, act_order, device)
    x = torch.randn(M, K, device=device, dtype=torch.float16)
    assert rel_err(torch_ops.w4a16_linear(x, **t), reference(x, t)) < TOL[torch.float16]


# the GEMV takes M <= 24 with AVX2, 20 with AVX-512 (11 for bf16 x through vdpbf16ps), 8 for act-order
@pytest.mark.parametrize("M", [1, 4, 11, 12, 17, 20, 21, 24, 25, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_cpu_isa_path(cpu_isa, M, dtype):
    K, N = 384, 264
    t = make_weights(K, N, 128, act_order=M in (4, 17))
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    out = torch_ops.w4a16_linear(x, bias=bias, **t)
    assert rel_err(out, reference(x, t, bias)) < TOL[dtype]


@pytest.mark.parametrize("K,N", [(32, 8), (96, 24), (4224, 8), (128, 4104)])
def test_no_shape_cliffs(device, K, N):
    t = make_weights(K, N, 32, device=device)
    for M in (1, 9, 80):
        x = torch.randn(M, K, device=device, dtype=torch.float16)
        assert rel_err(torch_ops.w4a16_linear(x, **t), reference(x, t)) < TOL[torch.float16]


@pytest.mark.parametrize("M", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_whole_tiles_small_batches(device, M, dtype):
    """K a multiple of 128 and N of 256 (no partial tile anywhere), small batches: split K at
    8192, groups of 32 and the whole K, every zero format, bias"""
    i = M + (dtype == torch.bfloat16)
    K, N = [(1024, 256), (8192, 768)][i % 2]
    gs, zeros = [(32, "v1"), (128, "v2"), (-1, "sym")][i % 3]
    t = make_weights(K, N, gs, zeros=zeros, device=device, scales_dtype=dtype)
    x = torch.randn(M, K, device=device, dtype=dtype)
    bias = torch.randn(N, device=device, dtype=dtype)
    out = torch_ops.w4a16_linear(x, bias=bias, **t)
    assert rel_err(out, reference(x, t, bias)) < TOL[dtype]


def test_bias_and_non_contiguous_x(device):
    K, N = 256, 48
    t = make_weights(K, N, 128, device=device)
    x = torch.randn(K, 7, device=device, dtype=torch.float16).t()  # [7, K], column-major
    bias = torch.randn(N, device=device, dtype=torch.float16)
    assert not x.is_contiguous()
    out = torch_ops.w4a16_linear(x, bias=bias, **t)
    assert rel_err(out, reference(x, t, bias)) < TOL[torch.float16]
    sliced = torch.randn(3, 2 * K, device=device)[:, ::2]  # strided rows
    assert rel_err(torch_ops.w4a16_linear(sliced, **t), reference(sliced, t)) < TOL[torch.float32]
    # rows that alias: a broadcast row (stride 0, as expand gives) and rows overlapping by K - 8
    for aliased in (torch.randn(1, K, device=device).expand(5, K),
                    torch.randn(4 * 8 + K, device=device).as_strided((5, K), (8, 1))):
        expected = reference(aliased, t)
        assert rel_err(torch_ops.w4a16_linear(aliased, **t), expected) < TOL[torch.float32]


def test_mixed_scales_dtype(device):
    K, N = 128, 32
    t = make_weights(K, N, 64, device=device, scales_dtype=torch.float16)
    x = torch.randn(4, K, device=device, dtype=torch.bfloat16)
    assert rel_err(torch_ops.w4a16_linear(x, **t), reference(x, t)) < TOL[torch.bfloat16]


def test_empty_batch(device):
    t = make_weights(64, 16, 32, device=device)
    out = torch_ops.w4a16_linear(torch.empty(0, 64, device=device), **t)
    assert out.shape == (0, 16)
    empty_k = {"qweight": torch.zeros(0, 16, dtype=torch.int32, device=device),
               "scales": torch.zeros(0, 16, device=device), "group_size": 32}
    out = torch_ops.w4a16_linear(torch.empty(2, 3, 0, device=device), **empty_k,
                                 bias=torch.ones(16, device=device))
    assert out.shape == (2, 3, 16) and torch.equal(out, torch.ones_like(out))
    with pytest.raises(ValueError, match=r"group_size = -1 \(one group of all K rows\) needs K > 0"):
        torch_ops.w4a16_linear(torch.empty(2, 0, device=device), **{**empty_k, "group_size": -1})


def test_empty_result_reads_nothing(device):
    """M = 0 or N = 0: the empty result, without the copies of x or the weights or the gather of
    x (each allocated as much as the inputs' views span: out of memory for these, where the fake
    gave the empty result)"""
    zeros = lambda *shape, dtype=torch.float32: torch.zeros(  # noqa: E731
        [1] * len(shape), dtype=dtype, device=device).expand(*shape)
    cases = [  # (x, qweight, scales, group_size): an expanded x of 2**40 rows, N = 0
        (zeros(2**40, 64), zeros(8, 0, dtype=torch.int32), zeros(2, 0), 32),
        # M = 0 with expanded weights of N = 2**40
        (zeros(0, 64), zeros(8, 2**40, dtype=torch.int32), zeros(2, 2**40), 32),
        # M = 0, a k-interleaved qweight of K = 2**40 (the CPU's gather order is K long)
        (zeros(0, 2**40), zeros(2**35, 4, 8, dtype=torch.int32), zeros(1, 8), -1),
    ]
    for x, qweight, scales, group_size in cases:
        out = torch_ops.w4a16_linear(x, qweight, scales, group_size=group_size)
        assert out.shape == (x.shape[0], qweight.shape[-1]) and out.dtype == x.dtype
        meta = torch_ops.w4a16_linear(x.to("meta"), qweight.to("meta"), scales.to("meta"),
                                      group_size=group_size)
        assert meta.shape == out.shape


def test_gradient_wrt_x(device):
    K, N = 128, 40
    t = make_weights(K, N, 64, act_order=True, device=device)
    x = torch.randn(2, 3, K, device=device, requires_grad=True)
    bias = torch.randn(N, device=device, requires_grad=True)
    out = torch_ops.w4a16_linear(x, bias=bias, **t)
    grad = torch.randn_like(out)
    out.backward(grad)
    w = ref.dequantize(t["qweight"].cpu(), t["scales"].cpu().float(), t["qzeros"].cpu(), "gptq", 4,
                       64, t["g_idx"].cpu(), "v1")
    assert torch.allclose(x.grad.cpu(), grad.cpu() @ w, rtol=1e-4, atol=1e-4)
    assert torch.allclose(bias.grad.cpu(), grad.cpu().sum((0, 1)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias_dtype", ["fp32", "the other 16-bit"])
def test_bias_gradient_is_summed_in_the_dtype_of_bias(device, x_dtype, bias_dtype):
    """An fp32 bias beside 16-bit activations: its gradient was summed in the activations' dtype
    and rounded there (2e-3 relative with bf16) before autograd cast it to fp32. A 16-bit bias of
    the other kind: the gradient is rounded once, to bias's dtype (summing with dtype=bf16
    rounded each fp16 element to bf16 first: 2 bf16 ulps off, where Inductor's backward was 0.7)"""
    K, N = 64, 32
    t = make_weights(K, N, 32, device=device, scales_dtype=x_dtype)
    x = torch.randn(300, K, device=device, dtype=x_dtype, requires_grad=True)
    bias_dtype = (torch.float32 if bias_dtype == "fp32" else
                  {torch.bfloat16: torch.float16, torch.float16: torch.bfloat16}[x_dtype])
    bias = torch.randn(N, device=device, dtype=bias_dtype, requires_grad=True)
    out = torch_ops.w4a16_linear(x, bias=bias, **t)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert bias.grad.dtype == bias_dtype
    exact = grad.double().sum(0)
    if bias_dtype == torch.float32:
        assert ((bias.grad.double() - exact).abs().max() / exact.abs().max()).item() < 1e-6
    else:  # within half an ulp of bias's dtype (and fp32's summing error)
        half_ulp = exact.abs() * 2.0 ** -({torch.float16: 11, torch.bfloat16: 8}[bias_dtype])
        assert ((bias.grad.double() - exact).abs() <= half_ulp * 1.01 + 2.0 ** -25).all()


@pytest.mark.parametrize("M", [1, 5, 32, 64, 200, 700])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_perm_reads_permuted_x(device, M, dtype):
    """perm: the product uses x[..., perm] (act-order rows sorted by act_order_prepack); any index
    vector in range, repeats included, against the reference on the gathered x (M = 700: the CUDA
    row gather's blocks take several rows each)"""
    K, N = 384, 72
    t = make_weights(K, N, 128, device=device, scales_dtype=dtype if dtype != torch.float32 else torch.float16)
    x = torch.randn(M, K, device=device, dtype=dtype)
    bias = torch.randn(N, device=device, dtype=dtype)
    for perm in (torch.randperm(K, device=device).to(torch.int32), torch.randint(0, K, (K,), device=device)):
        out = torch_ops.w4a16_linear(x, bias=bias, perm=perm, **t)
        assert rel_err(out, reference(x[:, perm.long()], t, bias)) < TOL[dtype]


@pytest.mark.parametrize("M", [1, 64, 2100])
def test_perm_view_at_an_offset(device, M):
    """perm and x as views that start mid-allocation (the CUDA gather reads 16-byte words)"""
    K, N = 256, 64
    t = make_weights(K, N, 64, device=device)
    perm = torch.cat([torch.zeros(1, dtype=torch.int32),
                      torch.randperm(K).to(torch.int32)]).to(device)[1:]
    x = torch.randn(M * K + 1, device=device, dtype=torch.float16)[1:].view(M, K)
    assert perm.data_ptr() % 16 and x.data_ptr() % 16
    out = torch_ops.w4a16_linear(x, perm=perm, **t)
    assert rel_err(out, reference(x[:, perm.long()], t)) < TOL[torch.float16]


@pytest.mark.parametrize("M", [1, 3, 4, 7, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_perm_small_batches_split_k(device, M, dtype):
    """Small batches with perm on the shapes that split K over several blocks (a K range that
    ends inside a k-tile, groups of 32 and the whole K, every zero format), 3-D x. On CUDA, M = 4
    and 7 in fp16 take K = 8192 with few columns, where x is gathered by row."""
    i = M + (dtype == torch.bfloat16)
    K, N, gs = [(4224, 1000, 128), (8192, 264, 32), (2048, 4104, -1)][i % 3]
    t = make_weights(K, N, gs, zeros=("v1", "v2", "sym")[i % 3], device=device, scales_dtype=dtype)
    x = torch.randn(M, 1, K, device=device, dtype=dtype)
    perm = torch.randperm(K, device=device).to(torch.int32)
    out = torch_ops.w4a16_linear(x, perm=perm, **t)
    assert out.shape == (M, 1, N)
    assert rel_err(out, reference(x[..., perm.long()], t)) < TOL[dtype]


def test_perm_gradient_and_opcheck(device):
    K, N = 128, 40
    t = make_weights(K, N, 64, device=device)
    perm = torch.randperm(K, device=device).to(torch.int32)
    perm[:4] = perm[4]  # repeats: their gradients add up
    x = torch.randn(2, 3, K, device=device, requires_grad=True)
    out = torch_ops.w4a16_linear(x, perm=perm, **t)
    grad = torch.randn_like(out)
    out.backward(grad)
    w = ref.dequantize(t["qweight"].cpu(), t["scales"].cpu().float(), t["qzeros"].cpu(), "gptq", 4,
                       64, None, "v1")
    expected = torch.zeros(2, 3, K).index_add_(-1, perm.cpu().long(), grad.cpu() @ w)
    assert torch.allclose(x.grad.cpu(), expected, rtol=1e-4, atol=1e-4)
    torch.library.opcheck(torch.ops.torch_ops.w4a16_linear,
                          (x.detach().requires_grad_(), t["qweight"], t["scales"], t["qzeros"], 64, None,
                           None, "v1", perm))


def test_opcheck(device):
    t = make_weights(128, 24, 32, act_order=True, device=device)
    x = torch.randn(3, 128, device=device, requires_grad=True)
    bias = torch.randn(24, device=device)
    torch.library.opcheck(torch.ops.torch_ops.w4a16_linear,
                          (x, t["qweight"], t["scales"], t["qzeros"], 32, t["g_idx"], bias, "v1"))


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    t = make_weights(256, 64, 128, device=device)

    def mlp(x):
        return torch.relu(torch_ops.w4a16_linear(x, **t)) * 2

    x = torch.randn(4, 256, device=device, dtype=torch.float16)
    assert torch.equal(torch.compile(mlp, fullgraph=True)(x), mlp(x))


def test_compile_fullgraph_backward(device):
    """gradients through a compiled graph (AOTAutograd traces the C++ autograd formula: its
    dequantize, matmul and the perm scatter) equal eager's, for x and bias"""
    torch._dynamo.reset()
    K, N = 256, 64
    t = make_weights(K, N, 128, device=device)
    perm = torch.randperm(K, device=device).to(torch.int32)
    bias = torch.randn(N, device=device, requires_grad=True)

    def loss(x):
        return (torch.relu(torch_ops.w4a16_linear(x, bias=bias, perm=perm, **t)) ** 2).sum()

    x = torch.randn(3, K, device=device, requires_grad=True)
    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        x.grad = bias.grad = None
        fn(x).backward()
        grads.append((x.grad, bias.grad))
    assert grads[0][0].abs().sum() > 0 and grads[0][1].abs().sum() > 0
    assert torch.allclose(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    assert torch.allclose(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-5)


def test_gradient_only_where_asked(device):
    """bias alone requiring grad gets it (x none); no_grad and constant inputs record no graph"""
    K, N = 128, 24
    t = make_weights(K, N, 64, device=device)
    x = torch.randn(4, K, device=device)
    bias = torch.randn(N, device=device, requires_grad=True)
    out = torch_ops.w4a16_linear(x, bias=bias, **t)
    out.backward(torch.ones_like(out))
    assert x.grad is None and torch.allclose(bias.grad, torch.full((N,), 4.0, device=device))
    assert torch_ops.w4a16_linear(x, **t).grad_fn is None
    with torch.no_grad():
        assert torch_ops.w4a16_linear(x.requires_grad_(), bias=bias, **t).grad_fn is None
    # scales alone requiring grad: a graph (the output requires grad, as any op's would), whose
    # backward gives scales nothing; the call that skips the autograd Function (nothing to
    # differentiate) must not skip this one
    scales = t["scales"].float().requires_grad_()
    out = torch_ops.w4a16_linear(x.detach(), **{**t, "scales": scales})
    assert out.requires_grad and out.grad_fn is not None
    out.sum().backward()
    assert scales.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(device, dtype):
    """under torch.autocast the op casts x to the autocast dtype, as F.linear does: the result is
    the op on x.to(dtype), in dtype; gradients reach the fp32 x; the same inside a compiled graph;
    outside autocast nothing is cast"""
    K, N = 256, 64
    t = make_weights(K, N, 128, device=device)
    bias = torch.randn(N, device=device)
    x = torch.randn(3, K, device=device, requires_grad=True)
    expected = torch_ops.w4a16_linear(x.detach().to(dtype), bias=bias, **t)

    def f(x):
        return torch_ops.w4a16_linear(x, bias=bias, **t)

    with torch.autocast(device, dtype=dtype):
        out = f(x)
        torch._dynamo.reset()
        try:
            compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
        finally:
            torch._dynamo.reset()
    assert out.dtype == dtype and compiled.dtype == dtype
    assert torch.equal(out, expected) and torch.equal(compiled, expected)
    grad = torch.randn(3, N, device=device)
    out.backward(grad.to(dtype))
    w = _dequantized(t).to(dtype).float()
    assert x.grad.dtype == torch.float32
    assert rel_err(x.grad, (grad.to(dtype).float() @ w.to(device)).cpu().double()) < TOL[dtype]
    assert f(x).dtype == torch.float32


def _dequantized(t):
    return ref.dequantize(t["qweight"].cpu(), t["scales"].cpu().float(),
                          None if t["qzeros"] is None else t["qzeros"].cpu(), "gptq", 4,
                          t["group_size"], None if t["g_idx"] is None else t["g_idx"].cpu(),
                          t["zero_format"])


@pytest.mark.parametrize("weights", ["act_order", "perm", "prepacked"])
def test_torch_func_grad_vjp_jvp(device, weights):
    """torch.func's transforms (which refuse the C++ autograd Function) and forward-mode AD take
    the composite route: their derivatives equal grad @ W and dx @ W^T + dbias"""
    K, N = 128, 40
    t = make_weights(K, N, 64 if weights != "prepacked" else 32, act_order=weights == "act_order",
                     device=device)
    w = _dequantized(t)  # [N, K], before perm / prepack
    perm = None
    if weights == "perm":
        perm = torch.randperm(K, device=device).to(torch.int32)
        perm[:4] = perm[4]  # repeats: their gradients add up
    if weights == "prepacked":
        t["qweight"] = torch_ops.prepack_w4a16(t["qweight"])
    bias = torch.randn(N, device=device)
    x = torch.randn(2, 3, K, device=device)

    def f(x, bias):
        return torch_ops.w4a16_linear(x, bias=bias, perm=perm, **t)

    xp = x.cpu() if perm is None else x.cpu()[..., perm.cpu().long()]
    expected = F.linear(xp, w, bias.cpu())
    assert rel_err(f(x, bias), expected.double()) < 1e-5
    grad = torch.randn(2, 3, N, device=device)
    grad_w = grad.cpu() @ w
    grad_x = grad_w if perm is None else torch.zeros(2, 3, K).index_add_(-1, perm.cpu().long(), grad_w)

    gx, gb = torch.func.grad(lambda x, b: (f(x, b) * grad).sum(), argnums=(0, 1))(x, bias)
    assert torch.allclose(gx.cpu(), grad_x, rtol=1e-4, atol=1e-4)
    assert torch.allclose(gb.cpu(), grad.cpu().sum((0, 1)), rtol=1e-4, atol=1e-4)
    out, vjp_fn = torch.func.vjp(f, x, bias)
    assert rel_err(out, expected.double()) < 1e-5
    assert torch.allclose(vjp_fn(grad)[0].cpu(), grad_x, rtol=1e-4, atol=1e-4)

    dx, db = torch.randn_like(x), torch.randn_like(bias)
    dxp = dx.cpu() if perm is None else dx.cpu()[..., perm.cpu().long()]
    tangent = F.linear(dxp, w, db.cpu())
    out, jvp_out = torch.func.jvp(f, (x, bias), (dx, db))
    assert rel_err(out, expected.double()) < 1e-5
    assert torch.allclose(jvp_out.cpu(), tangent, rtol=1e-4, atol=1e-4)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = f(fwAD.make_dual(x, dx), fwAD.make_dual(bias, db))
        assert torch.allclose(fwAD.unpack_dual(dual).tangent.cpu(), tangent, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arg", ["x", "qweight", "scales", "qzeros", "g_idx", "bias", "perm"])
def test_a_meta_tensor_among_others_is_refused(device, arg):
    """One meta tensor among CPU (or CUDA) ones goes to the fake kernel, which returned an
    uninitialised tensor as the product (QuantLinear with buffers never loaded from meta gave
    garbage): refused, as the kernels refuse mixed devices"""
    K, N = 64, 16
    t = make_weights(K, N, 32, device=device)
    args = dict(x=torch.randn(3, K, device=device), qweight=t["qweight"], scales=t["scales"],
                qzeros=t["qzeros"], group_size=32, bias=torch.randn(N, device=device))
    args["g_idx" if arg == "g_idx" else "perm"] = torch.arange(K, device=device).int() // (
        32 if arg == "g_idx" else 1)
    args[arg] = args[arg].to("meta")
    on = t["qweight"].device  # (cuda:0, as the message names it, where device is "cuda")
    if arg == "x":  # x is the reference the others are checked against
        pattern = f"w4a16_linear: qweight is on {on} but the other inputs are on meta"
    else:
        pattern = f"w4a16_linear: {arg} is on meta but the other inputs are on {on}"
    with pytest.raises(ValueError, match=pattern):
        torch_ops.w4a16_linear(**args)


def test_forward_mode_ad_with_dual_scales(device):
    """The weights get no derivative (README), in forward-mode AD too: a dual scales (alone or
    beside a dual x) adds nothing to the tangent, as under torch.func.jvp (the call failed with
    torch's 'jvp is not implemented for the c++ API of custom Function')"""
    import torch.autograd.forward_ad as fwAD
    K, N = 128, 40
    t = make_weights(K, N, 64, device=device)
    scales = t.pop("scales").float()
    x, dx = torch.randn(3, K, device=device), torch.randn(3, K, device=device)
    ds = torch.randn_like(scales)
    plain = torch_ops.w4a16_linear(x, scales=scales, **t)
    tangent = torch_ops.w4a16_linear(dx, scales=scales, **t)  # linear in x
    _, jvp_out = torch.func.jvp(lambda s: torch_ops.w4a16_linear(x, scales=s, **t), (scales,), (ds,))
    assert not jvp_out.any()
    with fwAD.dual_level():
        y = torch_ops.w4a16_linear(x, scales=fwAD.make_dual(scales, ds), **t)
        torch.testing.assert_close(fwAD.unpack_dual(y).primal, plain)
        got = fwAD.unpack_dual(y).tangent
        assert got is None or not got.any()
        y = torch_ops.w4a16_linear(fwAD.make_dual(x, dx), scales=fwAD.make_dual(scales, ds), **t)
        torch.testing.assert_close(fwAD.unpack_dual(y).tangent, tangent, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weights", ["act_order", "perm"])
def test_compile_torch_func_grad(device, weights):
    """torch.compile(fullgraph) of torch.func.grad, and of forward-mode AD, traces the composite
    route with fake tensors (whose g_idx / perm values it cannot read) and equals eager"""
    K, N = 128, 40
    t = make_weights(K, N, 64, act_order=weights == "act_order", device=device)
    perm = torch.randperm(K, device=device).to(torch.int32) if weights == "perm" else None
    x = torch.randn(2, 3, K, device=device)
    grad = torch.func.grad(lambda x: torch_ops.w4a16_linear(x, perm=perm, **t).square().sum())
    torch._dynamo.reset()
    try:
        compiled = torch.compile(grad, fullgraph=True, backend="aot_eager")
        expected = grad(x)
        assert expected.abs().sum() > 0
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
        import torch.autograd.forward_ad as fwAD

        def tangent(x, dx):
            with fwAD.dual_level():
                y = torch_ops.w4a16_linear(fwAD.make_dual(x, dx), perm=perm, **t)
                return fwAD.unpack_dual(y).tangent

        dx = torch.randn_like(x)
        torch.testing.assert_close(torch.compile(tangent, fullgraph=True, backend="aot_eager")(x, dx),
                                   tangent(x, dx), rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("weights", ["plain", "act_order", "perm"])
def test_compile_dynamic_torch_func_grad(device, weights):
    """torch.compile(dynamic=True) of torch.func.grad and of forward-mode AD with g_idx / perm: the
    composite route's range check read numel() of a wrapper with symbolic sizes ("Cannot call
    numel() on tensor with symbolic sizes/strides") before asking whether its values could be
    read; the compiled gradients equal eager's at two batch sizes, from one graph"""
    import torch.autograd.forward_ad as fwAD
    K, N = 128, 40
    t = make_weights(K, N, 64, act_order=weights == "act_order", device=device)
    perm = torch.randperm(K, device=device).to(torch.int32) if weights == "perm" else None
    grad = torch.func.grad(lambda x: torch_ops.w4a16_linear(x, perm=perm, **t).square().sum())

    def tangent(x, dx):
        with fwAD.dual_level():
            y = torch_ops.w4a16_linear(fwAD.make_dual(x, dx), perm=perm, **t)
            return fwAD.unpack_dual(y).tangent

    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    try:
        count = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(grad, fullgraph=True, dynamic=True, backend=count)
        compiled_tangent = torch.compile(tangent, fullgraph=True, dynamic=True, backend="aot_eager")
        for M in (3, 5):
            x, dx = torch.randn(2, M, K, device=device), torch.randn(2, M, K, device=device)
            expected = grad(x)
            assert expected.abs().sum() > 0
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(compiled_tangent(x, dx), tangent(x, dx), rtol=1e-5, atol=1e-5)
        # one graph for both batch sizes: the composite route's checks read no symbolic size
        # (torch 2.13 specialised on them, recompiling per batch; torch 2.11 failed outright)
        assert count.frame_count == 1
        # x against K checked symbolically, naming the op (linear's own error named neither it
        # nor K: "a and b must have same reduction dim")
        for bad_k in (K + 8, K - 8):
            with pytest.raises(Exception, match=r"w4a16_linear: x.shape\[-1\] = \w+ must equal K"):
                compiled(torch.randn(2, 5, bad_k, device=device))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("case", ["bias [1]", "bias float64", "perm float", "g_idx and perm",
                                  "N not a multiple of 8", "perm [K - 8]"])
def test_compile_dynamic_torch_func_bad_input(device, case):
    """torch.compile(dynamic=True) of torch.func.grad: the composite route, whose sizes are
    symbols there, checked x against K only, and compiled code took a [1] bias (broadcast by
    linear), a float64 bias, a float perm (cast to int64) and g_idx with perm, each refused by
    eager, and gave a gradient; now the same message as eager's (sizes as symbols)"""
    K, N = 64, 16
    t = make_weights(K, N, 32, device=device)
    x = torch.randn(4, K, device=device)
    kw = {"bias [1]": dict(bias=torch.randn(1, device=device)),
          "bias float64": dict(bias=torch.randn(N, dtype=torch.float64, device=device)),
          "perm float": dict(perm=torch.randperm(K, device=device).float()),
          "g_idx and perm": dict(g_idx=(torch.arange(K, device=device) // 32).int(),
                                 perm=torch.randperm(K, device=device).int()),
          "N not a multiple of 8": dict(qweight=t["qweight"][:, :12], scales=t["scales"][:, :12],
                                        qzeros=None),
          "perm [K - 8]": dict(perm=torch.arange(K - 8, device=device))}[case]
    message = {"bias [1]": r"w4a16_linear: bias must have shape \[N\] = \[\w+\], got \[1\]",
               "bias float64": r"w4a16_linear: bias must be float32, float16 or bfloat16",
               "perm float": r"w4a16_linear: perm must be int32 or int64, got torch.float32",
               "g_idx and perm": r"w4a16_linear: pass g_idx .* or perm .*, not both",
               "N not a multiple of 8": r"w4a16_linear: N = qweight.shape\[-1\] = \w+ must be a "
                                        r"multiple of 8",
               "perm [K - 8]": r"w4a16_linear: perm must have shape \[K\] = \[[*\w]+\], "
                               r"got \[\w+\]"}[case]
    args = dict(t, **kw)
    grad = torch.func.grad(lambda x: torch_ops.w4a16_linear(x, **args).sum())
    with pytest.raises(Exception, match=message):
        grad(x)  # eager
    torch._dynamo.reset()
    try:
        with pytest.raises(Exception, match=message):
            torch.compile(grad, fullgraph=True, dynamic=True, backend="aot_eager")(x)
    finally:
        torch._dynamo.reset()


def test_compile_dynamic_bias_gradient_one_graph(device):
    """torch.compile(dynamic=True) of a loss whose bias requires grad: the backward's sum of grad
    over the batch read grad's sizes as ints, which specialised the batch (and N) while
    AOTAutograd traced it, so every batch size compiled a graph of its own; the gradients of x
    and bias equal eager's, 2-D and 3-D, from one graph per rank"""
    K, N = 128, 40
    t = make_weights(K, N, 64, device=device)
    bias = torch.randn(N, device=device, requires_grad=True)

    def loss(x):
        return (torch_ops.w4a16_linear(x, bias=bias, **t) ** 2).sum()

    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    try:
        count = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend=count)
        for shape in ((3, K), (5, K), (9, K), (2, 3, K), (2, 6, K), (4, 5, K)):
            x0, grads = torch.randn(shape, device=device), []
            for fn in (loss, compiled):
                x = x0.clone().requires_grad_()
                bias.grad = None
                fn(x).backward()
                grads.append((x.grad, bias.grad))
            torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)
        assert count.frame_count == 2  # one graph for the 2-D batches, one for the 3-D ones
    finally:
        torch._dynamo.reset()


def test_torch_func_bad_input(device):
    """the composite route checks its arguments as the kernels do (its tensors are wrappers)"""
    K, N = 128, 16
    t = make_weights(K, N, 64, act_order=True, device=device)
    x = torch.randn(3, K, device=device)
    bad = dict(t, g_idx=t["g_idx"].clone())
    bad["g_idx"][5] = 2
    with pytest.raises(ValueError, match=r"w4a16_linear: g_idx values must be in \[0, 2\)"):
        torch.func.grad(lambda x: torch_ops.w4a16_linear(x, **bad).sum())(x)
    with pytest.raises(ValueError, match="w4a16_linear: x.shape\\[-1\\] = 120 must equal K = "):
        torch.func.grad(lambda x: torch_ops.w4a16_linear(x, **t).sum())(x[:, :120])
    perm = torch.arange(K, device=device) + 1
    t.pop("g_idx")
    with pytest.raises(ValueError, match=r"w4a16_linear: perm values must be in \[0, 128\)"):
        torch.func.grad(lambda x: torch_ops.w4a16_linear(x, perm=perm, **t).sum())(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vmap_rule(device, dtype):
    """torch.vmap over x, bias or the weights uses the op's batching rule (torch's fallback is
    turned off) and equals a loop; per-sample gradients (vmap of grad, and grad of vmap) equal
    autograd's"""
    K, N = 128, 24
    t = make_weights(K, N, 64, act_order=True, device=device)
    xs = torch.randn(4, 3, K, device=device, dtype=dtype)
    biases = torch.randn(4, N, device=device)
    scales = torch.stack([t["scales"], t["scales"] * 2, t["scales"] / 2, t["scales"]])
    kw = {k: v for k, v in t.items() if k != "scales"}

    def f(x, bias=None, scales=t["scales"]):
        return torch_ops.w4a16_linear(x, scales=scales, bias=bias, **kw)

    fallback = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)  # without the rule: an error
    try:
        cases = [
            (torch.vmap(f)(xs), [f(x) for x in xs]),
            (torch.vmap(f, in_dims=(1, 0))(xs.transpose(0, 1), biases), [f(x, b) for x, b in zip(xs, biases)]),
            (torch.vmap(f, in_dims=(None, 0))(xs[0], biases), [f(xs[0], b) for b in biases]),
            (torch.vmap(f, in_dims=(0, None, 0))(xs, None, scales),
             [f(x, None, s) for x, s in zip(xs, scales)]),
        ]
        for got, loop in cases:
            assert got.shape == (4, 3, N) and got.dtype == dtype
            assert rel_err(got, torch.stack(loop).cpu().double()) < TOL[dtype]

        def loss(x):
            return f(x.unsqueeze(0)).float().square().sum()

        x32 = xs.float()
        per_sample = torch.func.vmap(torch.func.grad(loss))(x32)
        whole = torch.func.grad(lambda x: torch.vmap(loss)(x).sum())(x32)
        torch._dynamo.reset()
        compiled = torch.compile(torch.vmap(f, in_dims=(1, 0)), fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(xs.transpose(0, 1), biases), cases[1][0])
    finally:
        torch._dynamo.reset()
        torch._C._functorch._set_vmap_fallback_enabled(fallback)
    expected = []
    for x in x32:
        x = x.clone().requires_grad_()
        loss(x).backward()
        expected.append(x.grad)
    expected = torch.stack(expected)
    assert expected.abs().sum() > 0
    assert torch.allclose(per_sample, expected, rtol=1e-4, atol=1e-3)
    assert torch.allclose(whole, expected, rtol=1e-4, atol=1e-3)



@pytest.mark.parametrize("case", ["gptq4", "gptq3-sym", "gptq8-act-order", "gptq2-one-group", "awq"])
def test_compile_dynamic_dequantize_vmap_over_scales_one_graph(device, case):
    """torch.vmap of dequantize over a batch of scales (one set of codes), compiled with dynamic
    shapes: the batching rule called the op once per entry, a loop that torch.compile unrolled, so
    every batch size compiled a graph of its own. The batch is one product now, bit for bit the
    per-entry results, eager and compiled, from one graph (scales' dim 1 batched too)"""
    bits = 4 if case == "awq" else int(case[4])
    fmt = "awq" if case == "awq" else "gptq"
    K, N = 128, 64
    G = -1 if "one-group" in case else 32
    t = torch_ops.quantize(torch.randn(N, K, device=device), bits, G, "sym" in case, fmt)
    g_idx = ((torch.randperm(K, device=device) // G).to(torch.int32) if "act-order" in case
             else None)

    def f(s):
        return torch_ops.dequantize(t["qweight"], s, None if "sym" in case else t["qzeros"], fmt,
                                    bits, G, g_idx)

    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    try:
        count = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(torch.vmap(f), fullgraph=True, dynamic=True, backend=count)
        for B in (2, 3, 5):
            batch = t["scales"] * torch.rand(B, 1, N, device=device, dtype=t["scales"].dtype)
            loop = torch.stack([f(s) for s in batch])
            assert torch.equal(torch.vmap(f)(batch), loop)
            assert torch.equal(torch.vmap(f, in_dims=1)(batch.transpose(0, 1)), loop)
            assert torch.equal(compiled(batch), loop)
        assert count.frame_count == 1
    finally:
        torch._dynamo.reset()

def test_compile_inductor_jacrev_over_perm(device):
    """Inductor compiles jacrev and vmap(grad) of the op with perm right: the composite route moves
    W's columns instead of gathering x (torch 2.13's Inductor got the Jacobian of an index_select of
    x wrong; torch 2.11 failed on its backward under dynamic shapes)"""
    K, N = 128, 40
    t = make_weights(K, N, 64, device=device)
    perm = torch.randperm(K, device=device).to(torch.int32)
    x = torch.randn(3, K, device=device)
    w = ref.dequantize(t["qweight"].cpu(), t["scales"].cpu().float(), t["qzeros"].cpu(), "gptq", 4,
                       64, None, "v1").to(device)

    def f(x):
        return torch_ops.w4a16_linear(x, perm=perm, **t)

    def loss(x):
        return f(x).square().sum()

    expected_jac = torch.func.jacrev(lambda x: F.linear(x[..., perm.long()], w))(x)
    expected_grad = torch.vmap(torch.func.grad(lambda x: F.linear(x[perm.long()], w).square().sum()))(x)
    assert expected_jac.abs().sum() > 0 and expected_grad.abs().sum() > 0
    torch._dynamo.reset()
    try:
        torch.testing.assert_close(torch.compile(torch.func.jacrev(f), fullgraph=True)(x),
                                   expected_jac, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.compile(torch.vmap(torch.func.grad(loss)), fullgraph=True)(x),
                                   expected_grad, rtol=1e-3, atol=1e-3)
    finally:
        torch._dynamo.reset()


def test_vmap_of_grad_over_perm(device):
    """vmap (over perm) of grad: the composite route cannot read a batched perm's values and leaves
    them to index_add; the gradients equal a loop's; an empty batch gives an empty result"""
    K, N = 128, 40
    t = make_weights(K, N, 64, device=device)
    x = torch.randn(3, K, device=device)
    perms = torch.stack([torch.randperm(K, device=device) for _ in range(4)]).to(torch.int32)

    def loss(x, perm):
        return torch_ops.w4a16_linear(x, perm=perm, **t).square().sum()

    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(x, perms)
    expected = torch.stack([torch.func.grad(loss)(x, perm) for perm in perms])
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    empty = torch.vmap(lambda p: torch_ops.w4a16_linear(x, perm=p, **t))(perms[:0])
    assert empty.shape == (0, 3, N)


@pytest.mark.parametrize("arg", ["scales", "qzeros", "g_idx", "bias", "group_size"])
def test_fake_checks_shapes_as_the_kernel(device, arg):
    """The fake kernel checked x against K only: a wrong scales / qzeros / g_idx / bias shape or a
    group size that does not divide K gave a meta-device call a result, and a compiled call met
    the kernel's error only when the graph ran. Eager, meta and compiled (dynamic) name the same"""
    K, N = 128, 16
    t = make_weights(K, N, 64, act_order=arg == "g_idx", device=device)
    w = dict(t)
    if arg == "scales":
        w["scales"] = t["scales"][:1]
    elif arg == "qzeros":
        w["qzeros"] = t["qzeros"][:, :1]
    elif arg == "g_idx":
        w["g_idx"] = t["g_idx"][:-8]
    elif arg == "bias":
        w["bias"] = torch.randn(N + 8, device=device)
    else:
        w["group_size"] = 48
    message = {"scales": r"scales must have shape \[K/group_size, N\]",
               "qzeros": r"qzeros must have shape \[K/group_size, N/8\]",
               "g_idx": r"g_idx must have shape \[K\]", "bias": r"bias must have shape \[N\]",
               "group_size": r"K = \S+ must be a multiple of group_size = 48"}[arg]
    x = torch.randn(3, K, device=device)
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in w.items()}
    with pytest.raises(ValueError, match="w4a16_linear: " + message):
        torch_ops.w4a16_linear(x, **w)
    with pytest.raises(ValueError, match="w4a16_linear: " + message):
        torch_ops.w4a16_linear(x.to("meta"), **meta)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda x: torch_ops.w4a16_linear(x, **w), fullgraph=True,
                                 dynamic=True, backend="aot_eager")
        with pytest.raises(Exception, match="w4a16_linear: " + message):
            compiled(x)
    finally:
        torch._dynamo.reset()


def test_vmap_of_transform_over_out_of_range_perm(device):
    """vmap (over perm) of grad / jacfwd: the composite route reads the batched perm below the
    transforms' wrappers. index_add found an out-of-range entry in words naming neither the op nor
    perm on the CPU, and on CUDA as a device-side assert that left the CUDA context unusable (the
    H100 run's next 90 tests errored): the error names both, and the device still works after"""
    K, N = 128, 16
    t = make_weights(K, N, 64, device=device)
    x = torch.randn(3, K, device=device)

    def f(x, perm):
        return torch_ops.w4a16_linear(x, perm=perm, **t)

    good = torch.randperm(K, device=device)
    transforms = (torch.func.grad(lambda x, p: f(x, p).sum()), torch.func.jacfwd(f))
    for bad, got in ((torch.arange(K, device=device) + 1, r"\[0, 128\]"),
                     (torch.arange(K, device=device) - 1, r"\[-1, 127\]")):
        perms = torch.stack([good, bad])
        for transform in transforms:
            with pytest.raises(ValueError, match=r"w4a16_linear: perm values must be in \[0, 128\) "
                                                 r"\(positions in a row of x\), got values in " + got):
                torch.vmap(transform, in_dims=(None, 0))(x, perms)
        # perm under grad's wrapper inside vmap (made in the transform), and under functionalize's
        inner = torch.vmap(lambda x, p: torch.func.grad(lambda x: f(x, p.clone()).sum())(x),
                           in_dims=(None, 0))
        functional = torch.func.functionalize(torch.func.grad(lambda x, p: f(x, p).sum()))
        for call in (lambda: inner(x, perms), lambda: functional(x, bad)):
            with pytest.raises(ValueError, match=r"w4a16_linear: perm values must be in \[0, 128\)"):
                call()
    # a good batch after the bad ones: each sample's transform of its own perm
    perms = torch.stack([good, torch.arange(K, device=device)])
    for transform in transforms:
        batched = torch.vmap(transform, in_dims=(None, 0))(x, perms)
        for i in range(2):
            torch.testing.assert_close(batched[i], transform(x, perms[i]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture():
    t = make_weights(512, 256, 128, act_order=True, device="cuda")
    x = torch.randn(2, 512, device="cuda", dtype=torch.float16)
    expected = torch_ops.w4a16_linear(x, **t)  # eager warm-up (also validates g_idx)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch_ops.w4a16_linear(x, **t)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, reference(x, t)) < TOL[torch.float16]
    assert not torch.equal(out, expected)


_CAPTURE_UNSEEN_G_IDX = """
import sys, torch, torch_ops
K, N, G = 512, 256, 128
qweight = torch.randint(-2**31, 2**31, (K // 8, N), dtype=torch.int32, device="cuda")
scales = torch.rand(K // G, N, device="cuda", dtype=torch.float16) / 64
x = torch.randn(2, K, device="cuda", dtype=torch.float16)
g_idx = (torch.randperm(K, device="cuda") // G).to(torch.int32)
if sys.argv[1] == "bad":
    g_idx[7] = K // G  # one past the last group of scales
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):  # no eager call first: g_idx is new to the op
    out = torch_ops.w4a16_linear(x, qweight, scales, None, G, g_idx)
graph.replay()
torch.cuda.synchronize()
w = torch_ops.dequantize(qweight, scales, None, "gptq", 4, G, g_idx.clamp(max=K // G - 1))
err = ((out.double() - x.double() @ w.double().t()).norm() / out.double().norm()).item()
print("rel_err", err)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("which", ["good", "bad"])
def test_cuda_graph_capture_checks_a_g_idx_not_seen_before(which, tmp_path):
    """A g_idx first met during capture (no eager warm-up) cannot be read on the host there (no
    sync): it was taken unchecked, and out-of-range values read past the kernels' group tables
    without a word. The graph now checks it on each replay (a device-side assert, which ends the
    process's CUDA context: run in a process of its own)"""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _CAPTURE_UNSEEN_G_IDX, which], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if which == "good":
        assert r.returncode == 0, r.stderr
        assert float(r.stdout.split()[-1]) < TOL[torch.float16], r.stdout
    else:
        assert r.returncode != 0 and "assert" in r.stderr.lower(), (r.stdout, r.stderr)


@pytest.mark.parametrize("M,K", [(1, 1024), (16, 1024), (12, 4096), (64, 1024), (200, 1024)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dependent_layers_back_to_back(device, M, K, dtype):
    """Each layer reads the previous one's output with no sync in between. On Hopper the kernel
    starts (programmatic dependent launch) while the previous one still runs and may only read x
    after waiting for it: a missing wait shows up as a layer computed from a stale input. The
    shapes take each way of gathering x for perm (by element signalling the GEMM early or, at
    12 x 4096, late; by row from 32 rows). The last two layers' scales are in the other 16-bit
    dtype and the last perm is int64: converted by the op just before its kernel, they are
    written by the kernel before it, which a programmatic dependent launch (reading the weights
    before its wait) may not see finished: those launches go after it."""
    layers = []
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    for i in range(6):
        t = make_weights(K, K, 128, zeros=("v1", "v2", "sym")[i % 3], device=device,
                         scales_dtype=dtype if i < 4 else other)
        t["scales"] = t["scales"] * 0.3  # keeps the activations' magnitude about constant
        if i % 2:  # x gathered by perm (a gather kernel, then the GEMM)
            t["perm"] = torch.randperm(K, device=device).to(torch.int32 if i < 5 else torch.int64)
        layers.append(t)
    ys = [torch.randn(M, K, device=device, dtype=dtype)]
    for t in layers:
        ys.append(torch_ops.w4a16_linear(ys[-1], **t))
    for i, t in enumerate(layers):
        x = ys[i] if "perm" not in t else ys[i][:, t["perm"].long()]
        expected = reference(x, {k: v for k, v in t.items() if k != "perm"})
        assert rel_err(ys[i + 1], expected) < TOL[dtype], f"layer {i}"


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(params=[1, 0], ids=["dense", "fused"])
def cuda_route(request):
    """CUDA w4a16_linear's dense route (weights dequantised a column chunk at a time, then cuBLAS;
    chosen automatically for large batches and fp32 x) forced on or off at every batch size"""
    _C.cuda_w4a16_dense(request.param)
    yield request.param
    _C.cuda_w4a16_dense(-1)


@needs_cuda
@pytest.mark.parametrize("group_size", [32, 128, -1, 96])
@pytest.mark.parametrize("zeros", ["v1", "v2", "sym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_routes(cuda_route, group_size, zeros, dtype):
    """Both CUDA routes over zero formats, group sizes (96: not a power of two), raw act-order,
    perm (repeats included), bias and 3-D x"""
    K, N, M = 384, 200, 7
    sdt = torch.float16 if dtype == torch.float32 else dtype
    x = torch.randn(M, 1, K, device="cuda", dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    for act_order in (False, True):
        t = make_weights(K, N, group_size, zeros, act_order, "cuda", scales_dtype=sdt)
        out = torch_ops.w4a16_linear(x, bias=bias, **t)
        assert out.shape == (M, 1, N)
        assert rel_err(out, reference(x, t, bias)) < TOL[dtype]
    t = make_weights(K, N, group_size, zeros, False, "cuda", scales_dtype=sdt)
    perm = torch.randint(0, K, (K,), device="cuda")
    out = torch_ops.w4a16_linear(x, bias=bias, perm=perm, **t)
    assert rel_err(out, reference(x[..., perm], t, bias)) < TOL[dtype]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_dense_route_column_chunks(dtype):
    """K N larger than the dense route's scratch: several column chunks (the last one narrower),
    dequantised on a second stream while the previous chunk multiplies, each GEMM writing its
    columns of out; eager and in a CUDA graph; with perm"""
    _C.cuda_w4a16_dense(1)
    try:
        K, N = 8192, 4104
        t = make_weights(K, N, 128, device="cuda", scales_dtype=torch.float16)
        x = torch.randn(3, K, device="cuda", dtype=dtype)
        bias = torch.randn(N, device="cuda", dtype=dtype)
        expected = reference(x, t, bias)
        assert rel_err(torch_ops.w4a16_linear(x, bias=bias, **t), expected) < TOL[dtype]
        # the same in a CUDA graph: the second stream forks from and joins the captured one
        x_in = torch.zeros_like(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = torch_ops.w4a16_linear(x_in, bias=bias, **t)
        x_in.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, expected) < TOL[dtype]
        # perm: a permutation moves each chunk's weight rows to the activations they multiply
        # (x is not gathered), eager (where it is found to be one) and captured; the same tensor
        # changed in place into an index vector with repeats and gaps takes the gather again
        perm = torch.randperm(K, device="cuda").to(torch.int32)
        expected = reference(x[:, perm.long()], t, bias)
        assert rel_err(torch_ops.w4a16_linear(x, bias=bias, perm=perm, **t), expected) < TOL[dtype]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = torch_ops.w4a16_linear(x_in, bias=bias, perm=perm, **t)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, expected) < TOL[dtype]
        perm[: K // 2] = perm[K // 2:].clone()
        perm[-7:] = 5
        out = torch_ops.w4a16_linear(x, bias=bias, perm=perm, **t)
        assert rel_err(out, reference(x[:, perm.long()], t, bias)) < TOL[dtype]
    finally:
        _C.cuda_w4a16_dense(-1)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_large_batch_automatic(dtype):
    """M = 2100: the automatic choice (the dense route); plain, act-order and perm agree with the
    reference"""
    K, N, M = 256, 1032, 2100
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    for act_order in (False, True):
        t = make_weights(K, N, 64, act_order=act_order, device="cuda", scales_dtype=dtype)
        assert rel_err(torch_ops.w4a16_linear(x, **t), reference(x, t)) < TOL[dtype]
    perm = torch.randperm(K, device="cuda").to(torch.int32)
    assert rel_err(torch_ops.w4a16_linear(x, perm=perm, **t | {"g_idx": None}),
                   reference(x[:, perm.long()], t | {"g_idx": None})) < TOL[dtype]


@needs_cuda
@pytest.mark.parametrize("M", [1, 5, 8])
def test_cuda_small_batch_grid_wider_than_the_gpu(M):
    """M <= 8 with more 256-column tiles than SMs (the lean-load build of the small-batch tile,
    chosen when the grid has more blocks than SMs): whole tiles, then a partial last column tile
    and k-tile; with perm too"""
    dtype = torch.float16 if M % 2 else torch.bfloat16
    n_tiles = torch.cuda.get_device_properties(0).multi_processor_count + 2
    for K, N, gs, zeros in [(1024, 256 * n_tiles, 128, "v2"), (1160, 256 * n_tiles + 136, -1, "v1")]:
        t = make_weights(K, N, gs, zeros=zeros, device="cuda", scales_dtype=dtype)
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        bias = torch.randn(N, device="cuda", dtype=dtype)
        assert rel_err(torch_ops.w4a16_linear(x, bias=bias, **t), reference(x, t, bias)) < TOL[dtype]
        perm = torch.randperm(K, device="cuda").to(torch.int32)
        assert rel_err(torch_ops.w4a16_linear(x, perm=perm, **t),
                       reference(x[:, perm.long()], t)) < TOL[dtype]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zeros", ["v1", "v2", "sym"])
def test_cuda_small_batch_extreme_codes_and_magnitudes(dtype, zeros):
    """M <= 8 (magic-number codes minus magic + zero point into the mma, the scale applied to
    each group's fp32 partial sum): codes and zero points at both ends (|q - z| = 15, v1's zero
    16), activations tiny and large, group 128 (one group per stage) and 32 (groups change
    inside a stage)"""
    K, N = 1024, 520
    for M, scale, gs in [(1, 1e-4, 128), (8, 1e-4, 32), (3, 30.0, 128), (8, 1.0, 32)]:
        for q_end, z_end in [(15, 0), (0, 15)]:
            G = K // gs
            q = torch.full((K, N), q_end, dtype=torch.uint8)
            q[::7] = torch.randint(0, 16, (len(range(0, K, 7)), N), dtype=torch.uint8)
            z = torch.full((G, N), z_end, dtype=torch.uint8)
            t = {"qweight": torch_ops.pack(q, 4, dim=0).cuda(),
                 "scales": ((torch.rand(G, N) + 0.5) / 64).to(dtype).cuda(),
                 "qzeros": None if zeros == "sym" else torch_ops.pack(
                     ((z.long() - int(zeros == "v1")) & 15).to(torch.uint8), 4, dim=1).cuda(),
                 "group_size": gs, "g_idx": None, "zero_format": "v2" if zeros == "sym" else zeros}
            x = (torch.randn(M, K) * scale).to(dtype).cuda()
            assert rel_err(torch_ops.w4a16_linear(x, **t), reference(x, t)) < TOL[dtype], (M, scale, gs, q_end)


@needs_cuda
@pytest.mark.parametrize("M", [40, 64, 100, 256])
@pytest.mark.parametrize("group_size,zeros", [(32, "v1"), (64, "sym"), (128, "v2"), (-1, "v1")])
def test_cuda_mid_batch_interior_and_tail_stages(cuda_route, M, group_size, zeros):
    """M = 33..256 (on Hopper the wgmma tiles, whose interior stages copy from running pointers
    with no bounds checks): K with a half-filled last stage, N ending inside a column tile, M
    inside a row tile, K split over blocks, one to four scale rows per stage, every zero format
    (groups of 128 need K = 33 x 128: a whole last stage there)"""
    dtype = torch.float16 if M % 3 else torch.bfloat16
    K, N = (4224 if group_size == 128 else 4160), 1048
    t = make_weights(K, N, group_size, zeros=zeros, device="cuda", scales_dtype=dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    assert rel_err(torch_ops.w4a16_linear(x, bias=bias, **t), reference(x, t, bias)) < TOL[dtype]


@needs_cuda
@pytest.mark.parametrize("M", [65, 100, 128, 200, 256])
@pytest.mark.parametrize("group_size,zeros", [(32, "v1"), (128, "v2"), (-1, "sym")])
def test_cuda_mid_batch_wide_tiles(M, group_size, zeros):
    """M = 65..256 with long K over few columns, where on sm_90 the 128 x 256 wgmma tiles are
    chosen (their stages paced by mbarriers, K split through the workspace; above M = 128 two
    rows of them): K with a half-filled last stage (groups of 32 and the whole K), N ending inside
    a column tile (M <= 128), bias, both 16-bit dtypes, the same bits on a repeated call"""
    dtype = torch.float16 if M % 2 else torch.bfloat16
    K, N = (14336 if group_size == 128 else 14368), (4104 if M <= 128 else 4096)
    t = make_weights(K, N, group_size, zeros=zeros, device="cuda", scales_dtype=dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    out = torch_ops.w4a16_linear(x, bias=bias, **t)
    torch.cuda.synchronize()
    cfg, split = _C.cuda_w4a16_last_config()
    assert rel_err(out, reference(x, t, bias)) < TOL[dtype]
    assert torch.equal(out, torch_ops.w4a16_linear(x, bias=bias, **t))
    props = torch.cuda.get_device_properties(0)
    if (props.major, props.minor) == (9, 0) and props.multi_processor_count >= 114:  # H100 / H200
        # the 128 x 256 tile, its K split through the workspace (the H200 took 7 here; 4 at M > 128)
        assert cfg == 11 and (4 if M <= 128 else 2) <= split <= 8, (cfg, split)
        # (above M = 128 the rule takes that tile only with its K split through the workspace)
        assert M <= 128 or _C.cuda_w4a16_last_workspace() & 1


@needs_cuda
@pytest.mark.parametrize("M", [33, 40, 64])
def test_cuda_mid_batch_one_wave_with_perm(M):
    """M = 33..64 on N = 8192: 64 x 128 tiles split so the grid is about one block per SM, where
    the x gather for perm signals the GEMM late; plain and perm against the reference"""
    dtype = torch.float16 if M % 2 else torch.bfloat16
    K, N = 1024, 8192
    t = make_weights(K, N, 128, zeros="v2", device="cuda", scales_dtype=dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    assert rel_err(torch_ops.w4a16_linear(x, **t), reference(x, t)) < TOL[dtype]
    for perm in (torch.randperm(K, device="cuda").to(torch.int32), torch.randint(0, K, (K,), device="cuda")):
        assert rel_err(torch_ops.w4a16_linear(x, perm=perm, **t), reference(x[:, perm.long()], t)) < TOL[dtype]


@needs_cuda
def test_cuda_dense_route_opcheck_compile_and_graph(cuda_route):
    t = make_weights(256, 64, 64, act_order=True, device="cuda")
    x = torch.randn(5, 256, device="cuda", dtype=torch.float16, requires_grad=True)
    bias = torch.randn(64, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.torch_ops.w4a16_linear,
                          (x, t["qweight"], t["scales"], t["qzeros"], 64, t["g_idx"], bias, "v1"))
    x = x.detach()
    torch._dynamo.reset()
    f = torch.compile(lambda x: torch_ops.w4a16_linear(x, bias=bias, **t) * 2, fullgraph=True)
    assert torch.equal(f(x), torch_ops.w4a16_linear(x, bias=bias, **t) * 2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch_ops.w4a16_linear(x, bias=bias, **t)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, reference(x, t, bias)) < TOL[torch.float16]


def test_g_idx_changed_in_place_is_checked_again(device):
    t = make_weights(128, 16, 64, act_order=True, device=device)
    x = torch.randn(2, 128, device=device)
    torch_ops.w4a16_linear(x, **t)  # validated (and cached) here
    t["g_idx"][5] = 7  # in place: the version counter moves, so the next call checks again
    with pytest.raises(ValueError, match=r"w4a16_linear: g_idx values must be in \[0, 2\)"):
        torch_ops.w4a16_linear(x, **t)
    # another view at the same address and of the same size and version, here every other entry
    # of a tensor whose second half is out of range, is checked as a new tensor
    base = torch.zeros(256, dtype=torch.int32, device=device)
    base[128:] = 10**9
    t["g_idx"] = base[:128]
    torch_ops.w4a16_linear(x, **t)
    t["g_idx"] = base[::2]
    with pytest.raises(ValueError, match=r"g_idx values must be in \[0, 2\) .*got values in \[0, 1000000000\]"):
        torch_ops.w4a16_linear(x, **t)
    if device == "cpu":  # a write the version counter does not see: the CPU reads g_idx every call
        t["g_idx"] = torch.zeros(128, dtype=torch.int32)
        torch_ops.w4a16_linear(x, **t)
        t["g_idx"].numpy()[5] = 10**9
        with pytest.raises(ValueError, match=r"g_idx values must be in \[0, 2\)"):
            torch_ops.w4a16_linear(x, **t)


def test_index_tensors_made_under_inference_mode(device):
    """inference tensors have no version counter (the range check's cache key): g_idx and perm
    made under torch.inference_mode work inside and outside it, and a bad one is still refused"""
    t = make_weights(128, 16, 64, act_order=True, device=device)
    x = torch.randn(2, 128, device=device)
    expected = reference(x, t)
    with torch.inference_mode():
        g_idx = t["g_idx"].clone()
        qweight, perm = torch_ops.act_order_prepack(t["qweight"], g_idx, 64)
        bad = torch.full_like(g_idx, 2)
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            out = torch_ops.w4a16_linear(x, **{**t, "g_idx": g_idx})
            assert rel_err(out, expected) < TOL[torch.float32]
            out = torch_ops.w4a16_linear(x, **{**t, "qweight": qweight, "g_idx": None}, perm=perm)
            assert rel_err(out, expected) < TOL[torch.float32]
            with pytest.raises(ValueError, match=r"g_idx values must be in \[0, 2\)"):
                torch_ops.w4a16_linear(x, **{**t, "g_idx": bad})


def test_index_range_cache_does_not_keep_index_tensors_alive(device):
    """the range check's cache of g_idx / perm tensors it has seen holds no reference to their
    storage: it kept every one alive (up to 4096 of them) after the caller dropped it, a dropped
    model's perm buffers, or the whole storage of an index that is a view of a larger tensor.
    A tensor at a freed one's address is checked as a new one."""
    from torch.multiprocessing.reductions import StorageWeakRef

    t = make_weights(128, 16, 64, act_order=True, device=device)
    x = torch.randn(2, 128, device=device)
    qweight, perm = torch_ops.act_order_prepack(t["qweight"], t["g_idx"], 64)
    calls = {
        "g_idx": lambda idx: torch_ops.w4a16_linear(x, **{**t, "g_idx": idx}),
        "perm": lambda idx: torch_ops.w4a16_linear(x, **{**t, "qweight": qweight, "g_idx": None},
                                                   perm=idx),
        "dequantize": lambda idx: torch_ops.dequantize(t["qweight"], t["scales"], t["qzeros"],
                                                       group_size=64, g_idx=idx),
    }
    for name, call in calls.items():
        src = perm if name == "perm" else t["g_idx"]
        big = torch.zeros(1 << 20, dtype=src.dtype, device=device)  # the index: a view of it
        big[:128] = src
        ref_ = StorageWeakRef(big.untyped_storage())
        call(big[:128])
        call(big[:128])  # (a cache hit where one is kept)
        del big
        assert ref_.expired(), f"{name}: the index's storage is kept alive after it was dropped"
    layer = torch_ops.QuantLinear.from_gptq(t["qweight"], t["qzeros"], t["scales"],
                                            g_idx=t["g_idx"], group_size=64).to(device)
    layer(x)
    refs = [StorageWeakRef(b.untyped_storage()) for b in (layer.g_idx, layer.perm)
            if b is not None]
    del layer
    assert all(r.expired() for r in refs), "a dropped layer's index buffers are kept alive"
    # an index freed after its check and a bad one of the same size, likely at its address
    good = t["g_idx"].clone()
    calls["g_idx"](good)
    del good
    bad = torch.full_like(t["g_idx"], 5)
    with pytest.raises(ValueError, match=r"g_idx values must be in \[0, 2\)"):
        calls["g_idx"](bad)


def test_cpu_bf16_blocked_path_on_a_sparse_layer(cpu_isa):
    """weights at their zero point but for 0.1%, x of one sign: nothing cancels in the bf16 blocked
    path (it once took s (z + 128) sum x off a sum of (128 + q) x: 2.7e-2 here with AVX512_BF16)"""
    torch.manual_seed(0)
    K, N, G = 4096, 64, 128
    q = torch.full((K, N), 8, dtype=torch.uint8)
    moved = torch.rand(K, N) < 0.001
    q[moved] = (8 + torch.randint(0, 2, (int(moved.sum()),)) * 2 - 1).to(torch.uint8)
    t = {"qweight": torch_ops.pack(q, 4, dim=0), "group_size": G, "g_idx": None,
         "scales": ((torch.rand(K // G, N) + 0.5) / 64).bfloat16(), "qzeros": None,
         "zero_format": "v2"}
    x = (torch.rand(16, K) + 1).bfloat16()
    assert rel_err(torch_ops.w4a16_linear(x, **t), reference(x, t)) < TOL[torch.bfloat16]


def test_bad_input(device):
    t = make_weights(128, 16, 64, device=device)
    x = torch.randn(2, 128, device=device)
    cases = [
        (dict(x=torch.randn(2, 120, device=device)), r"w4a16_linear: x.shape\[-1\] = 120 must equal K = 8 \* qweight.shape\[0\] = 128"),
        (dict(x=x.to(torch.int32)), r"w4a16_linear: x must be float32, float16 or bfloat16, got torch.int32"),
        (dict(qweight=t["qweight"].float()), r"w4a16_linear: qweight must be torch.int32, got torch.float32"),
        (dict(g_idx=torch.full((128,), 2, dtype=torch.int32, device=device)), r"w4a16_linear: g_idx values must be in \[0, 2\)"),
        (dict(g_idx=torch.zeros(64, dtype=torch.int32, device=device)), r"w4a16_linear: g_idx must have shape \[K\] = \[128\], got \[64\]"),
        (dict(scales=t["scales"][:1]), r"w4a16_linear: scales must have shape \[K/group_size, N\] = \[2, 16\], got \[1, 16\]"),
        (dict(group_size=48), r"w4a16_linear: K = 128 must be a multiple of group_size = 48"),
        (dict(qzeros=t["qzeros"][:, :1]), r"w4a16_linear: qzeros must have shape \[K/group_size, N/8\] = \[2, 2\], got \[2, 1\]"),
        (dict(bias=torch.zeros(15, device=device)), r"w4a16_linear: bias must have shape \[N\] = \[16\], got \[15\]"),
        (dict(zero_format="v9"), r'w4a16_linear: zero_format must be "v1" or "v2", got "v9"'),
        # (g_idx out of range: the pair is refused first, as the fake kernel refuses it)
        (dict(perm=torch.arange(128, device=device), g_idx=torch.full((128,), 7, dtype=torch.int32, device=device)),
         r"w4a16_linear: pass g_idx \(act-order as stored\) or perm \(rows sorted by act_order_prepack\), not both"),
        (dict(perm=torch.arange(1, 129, device=device)), r"w4a16_linear: perm values must be in \[0, 128\) \(positions in a row of x\), got values in \[1, 128\]"),
        (dict(perm=torch.arange(64, device=device)), r"w4a16_linear: perm must have shape \[K\] = \[128\], got \[64\]"),
        (dict(perm=torch.arange(128, device=device).float()), r"w4a16_linear: perm must be int32 or int64, got torch.float32"),
    ]
    for change, pattern in cases:
        args = dict(t, x=x)
        args.update(change)
        with pytest.raises((ValueError, TypeError, RuntimeError), match=pattern):
            torch_ops.w4a16_linear(**args)


@pytest.mark.skipif(_C.cpu_isa_detected() < 2, reason="needs AVX-512")
@pytest.mark.parametrize("M", [16, 40, 64])
@pytest.mark.parametrize("group_size,zeros", [(32, "v1"), (128, "v2"), (-1, "sym")])
def test_cpu_bf16_blocked_path(M, group_size, zeros):
    # bf16 x with M > 8 on AVX-512: the vdpbf16ps blocked path where the CPU has AVX512_BF16 (else
    # the fp32 one), its full blocks of 16 rows on AMX tiles where the CPU has them (M = 40: two
    # blocks and 8 rows left); strided x rows, one row scaled by 1e-30 (the path scales rows by
    # powers of two: vdpbf16ps and the tiles read bf16 denormals as zero), bias, N with an 8-column
    # tail (the AVX2 path). Against the float64 reference, the path without AMX tiles and the AVX2
    # build (the fp32 blocked path).
    K, N = 640, 200
    t = make_weights(K, N, group_size, zeros=zeros)
    xw = torch.randn(M, K + 24)
    xw[1] *= 1e-30
    x = xw.bfloat16()[:, 8:K + 8]
    bias = torch.randn(N).bfloat16()
    out = torch_ops.w4a16_linear(x, bias=bias, **t)
    expected = reference(x, t, bias)
    assert rel_err(out, expected) < TOL[torch.bfloat16]
    assert rel_err(out[1], expected[1]) < TOL[torch.bfloat16]
    _C.cpu_isa_set(1)
    try:
        out_avx2 = torch_ops.w4a16_linear(x, bias=bias, **t)
    finally:
        _C.cpu_isa_set(-1)
    assert rel_err(out, out_avx2.double()) < TOL[torch.bfloat16]
    amx = _C.w4a16_amx_set(-1)
    assert _C.w4a16_amx_set(0) == 0
    try:
        out_no_amx = torch_ops.w4a16_linear(x, bias=bias, **t)
    finally:
        assert _C.w4a16_amx_set(-1) == amx
    assert rel_err(out_no_amx, expected) < TOL[torch.bfloat16]
    assert rel_err(out, out_no_amx.double()) < TOL[torch.bfloat16]


@needs_cuda
def test_cuda_long_k_takes_the_mma_tiles():
    """The 128- and 256-row wgmma tiles address their x rows by 32-bit element offsets from row
    m0 (up to 255 K < 2^31), so K >= 2^23 goes to the mma.sync tiles. M = 450 runs the 256-row
    tile, and at K = 2^23 + 2^17 rows 253..255 of a tile would be read from the wrong place
    without that guard. About 8 GB of x: skipped on smaller GPUs"""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GB of GPU memory")
    M, K, N, dtype = 450, (1 << 23) + (1 << 17), 8, torch.float16
    t = make_weights(K, N, 128, zeros="v2", device="cuda", scales_dtype=dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    out = torch_ops.w4a16_linear(x, **t)
    w = ref.dequantize(t["qweight"], t["scales"], t["qzeros"], "gptq", 4, 128, None, "v2").float()  # [N, K]
    expected = torch.cat([x[i:i + 64].float() @ w.t() for i in range(0, M, 64)]).double()
    del x
    assert ((out.double() - expected).norm() / expected.norm()).item() < TOL[dtype]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_group_size_past_2_62_with_g_idx(dtype):
    """With g_idx any group_size is taken (it is not read); the launcher's shift for the
    plain-group tiles looped for ever on one past 2**62 (1 << 63 wrapped negative). The same
    result, bit for bit, as the same g_idx with group_size = K (the act-order tiles, which sum in
    another order than the plain ones: close to those)"""
    K, N = 64, 64
    t = make_weights(K, N, -1, zeros="v1", device="cuda", scales_dtype=dtype)
    x = torch.randn(3, K, device="cuda", dtype=dtype)
    plain = torch_ops.w4a16_linear(x, **t)
    t.update(group_size=K, g_idx=torch.zeros(K, dtype=torch.int32, device="cuda"))
    expected = torch_ops.w4a16_linear(x, **t)
    assert rel_err(expected, plain.cpu().double()) < TOL[dtype]  # (rel_err's second is on the CPU)
    t.update(group_size=2**62 + 1)
    out = torch_ops.w4a16_linear(x, **t)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@needs_cuda
@pytest.mark.skipif(not os.environ.get("TORCH_OPS_SLOW_TESTS"),
                    reason="minutes on an H100; set TORCH_OPS_SLOW_TESTS=1 to run")
@pytest.mark.parametrize("K", [2**31 - 8, 2**31 + 8])
def test_cuda_k_near_2_31(K):
    """K within 256 of 2**31 overflowed the tensor-core tiles' int tile count, and K past it was
    refused as an invalid argument: both take the 64-bit generic kernel. x is zero but at a few
    columns, some past 2**31, so the exact result is their codes' sum. About 12 GB (x 4, qweight
    8): skipped on smaller GPUs. Opt-in: the generic kernel runs each column's K in one thread,
    2**31 dependent steps (more than two minutes each on an H100)"""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GB of GPU memory")
    N, dtype = 8, torch.float16
    qweight = torch.randint(-2**31, 2**31, (K // 8, N), dtype=torch.int32, device="cuda")
    scales = torch.full((1, N), 0.5, dtype=dtype, device="cuda")
    x = torch.zeros(1, K, dtype=dtype, device="cuda")
    cols = torch.tensor([0, 5, 2**31 - 9, K - 9, K - 1], device="cuda")
    x[0, cols] = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0], dtype=dtype, device="cuda")
    out = torch_ops.w4a16_linear(x, qweight, scales, None, group_size=-1)
    codes = (qweight[cols // 8] >> (4 * (cols % 8))[:, None]) & 15  # [5, N], symmetric: z = 8
    expected = (x[0, cols].float()[:, None] * (codes - 8).float() * 0.5).sum(0, keepdim=True)
    del x, qweight
    torch.testing.assert_close(out.float(), expected, rtol=1e-3, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("M,N", [(1, 2048), (16, 2048), (32, 2048), (64, 2048), (128, 4096)])
def test_cuda_split_k_workspace_taken(M, N):
    """Long K over few column tiles is where splitting K pays most: on sm_90 every small-batch
    tile (8, 16, 32 rows: mma.sync; 64 rows: wgmma) sends it through the workspace, and so does
    the 128 x 256 wgmma tile where the clusters of its split would not all fit at once (16 tiles
    split 8 ways: 15 clusters of 8 fit on an H100 or H200), so the test above exercises that path;
    elsewhere it is never taken"""
    dtype = torch.float16
    t = make_weights(14336, N, 128, zeros="v2", device="cuda", scales_dtype=dtype)
    x = torch.randn(M, 14336, device="cuda", dtype=dtype)
    out = torch_ops.w4a16_linear(x, **t)
    torch.cuda.synchronize()
    taken = _C.cuda_w4a16_last_workspace()
    assert rel_err(out, reference(x, t)) < TOL[dtype]
    assert taken == (1 if torch.cuda.get_device_capability() == (9, 0) else 0)


@needs_cuda
@pytest.mark.parametrize("M", [1, 16])
def test_cuda_graphs_replayed_at_once_on_two_streams(M):
    """Graphs captured one after another on torch's shared default capture stream, then replayed
    at the same time on two streams: each capture has split-K lock words of its own. Sharing the
    capture stream's words mixed the two launches' arrival counts: a tile summed before all its
    partials were in (stale partials of the previous replay, with another input), or never. One
    column tile split 8 ways, so both grids fit on the GPU at once; a sleep queued first on each
    stream lets every replay be queued before any runs, so the two streams run side by side."""
    K, N, replays = 8192, 256, 200
    t = make_weights(K, N, 128, zeros="v1", device="cuda")
    pool = [torch.randn(M, K, device="cuda", dtype=torch.float16) for _ in range(5)]
    expected = [reference(x, t) for x in pool]
    graphs, x_in, outs = [], [], []
    for i in range(2):
        x_in.append(pool[i].clone())
        torch_ops.w4a16_linear(x_in[i], **t)  # eager warm-up
        graphs.append(torch.cuda.CUDAGraph())
        with torch.cuda.graph(graphs[i]):
            outs.append(torch_ops.w4a16_linear(x_in[i], **t))
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert (_C.cuda_w4a16_last_workspace() & 1) == (1 if hopper else 0)
    streams = [torch.cuda.Stream() for _ in graphs]
    history = [[], []]
    torch.cuda.synchronize()
    for s in streams:
        with torch.cuda.stream(s):
            torch.cuda._sleep(200_000_000)  # (cycles: about 0.1 s)
    for r in range(replays):
        for i, (g, s) in enumerate(zip(graphs, streams)):
            with torch.cuda.stream(s):
                x_in[i].copy_(pool[(r + 2 * i) % len(pool)])
                g.replay()
                history[i].append(outs[i].clone())
    torch.cuda.synchronize()
    for i in range(2):
        bad = [r for r, o in enumerate(history[i])
               if rel_err(o, expected[(r + 2 * i) % len(pool)]) >= TOL[torch.float16]]
        assert not bad, f"graph {i}: {len(bad)} of {replays} replays wrong (first: {bad[:5]})"


def check_graph_and_streams(call, xs, expected, dtype):
    """call(x) captured in a CUDA graph on a stream of its own (the split-K locks are allocated
    during the capture), replayed with each of xs copied into its input; then launches
    alternating between two streams (each has locks of its own)"""
    x_in = xs[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
        out = call(x_in)
    for x, e in zip(xs, expected):
        x_in.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, e) < TOL[dtype]
    streams = (torch.cuda.Stream(), torch.cuda.Stream())
    torch.cuda.synchronize()
    outs = []
    for i in range(6):
        with torch.cuda.stream(streams[i % 2]):
            outs.append(call(xs[i % 3]))
    torch.cuda.synchronize()
    for i, o in enumerate(outs):
        assert rel_err(o, expected[i % 3]) < TOL[dtype]


def check_forced_gather(mode, bit, t, run, perm, xs, expected, dtype, more=None):
    """x[:, perm] gathered the way `mode` forces (cuda_w4a16_gather_mode), which sets `bit` of
    cuda_w4a16_last_workspace on sm_90: repeated launches, the same bits, more() if given, layers
    back to back with no sync (the next one starts early by PDL), a CUDA graph on a stream of its
    own replayed with new inputs, and launches alternating between two streams. t: the layer's
    GPTQ tensors, run: what the op is given (t, or t prepacked)"""
    hopper = torch.cuda.get_device_capability() == (9, 0)
    K = xs[0].shape[1]
    _C.cuda_w4a16_gather_mode(mode)
    try:
        outs = [torch_ops.w4a16_linear(x, perm=perm, **run) for x in xs + xs]
        torch.cuda.synchronize()
        assert (_C.cuda_w4a16_last_workspace() & bit) == (bit if hopper else 0)
        for i, o in enumerate(outs):
            assert rel_err(o, expected[i % 3]) < TOL[dtype]
        assert torch.equal(outs[0], outs[3])
        if more is not None:
            more()
        # back to back: a square layer's output is the next one's x
        sq = make_weights(K, K, t["group_size"], zeros="v2", device="cuda", scales_dtype=dtype)
        sq["scales"] = sq["scales"] * 0.3
        y1 = torch_ops.w4a16_linear(xs[0], perm=perm, **sq)
        y2 = torch_ops.w4a16_linear(y1, perm=perm, **run)
        assert rel_err(y2, reference(y1[:, perm.long()], t)) < TOL[dtype]
        check_graph_and_streams(lambda x: torch_ops.w4a16_linear(x, perm=perm, **run), xs, expected, dtype)
    finally:
        _C.cuda_w4a16_gather_mode(0)


@needs_cuda
@pytest.mark.parametrize("kil", [False, True], ids=["gptq", "kinterleaved"])
@pytest.mark.parametrize("M,K,N,dtype", [(1, 8192, 4096, torch.float16), (4, 4096, 4096, torch.bfloat16),
                                         (9, 8192, 1000, torch.float16), (16, 14336, 2048, torch.bfloat16)])
def test_cuda_perm_gathered_by_the_grid(kil, M, K, N, dtype):
    """perm (prepacked act-order) at M <= 16 on sm_90: the GEMM's own blocks may gather x[:, perm]
    into the workspace and wait for each other on words that every launch leaves at zero, instead
    of a gather kernel first. Chosen where few column tiles leave SMs idle at M > 4 (here M = 9
    and 16), forced here at every M (check_forced_gather)"""
    hopper = torch.cuda.get_device_capability() == (9, 0)
    t = make_weights(K, N, 128, zeros="v1", device="cuda", scales_dtype=dtype)
    run = dict(t, qweight=torch_ops.prepack_w4a16(t["qweight"])) if kil else t
    perm = torch.randperm(K, device="cuda").to(torch.int32)
    xs = [torch.randn(M, K, device="cuda", dtype=dtype) for _ in range(3)]
    expected = [reference(x[:, perm.long()], t) for x in xs]
    out = torch_ops.w4a16_linear(xs[0], perm=perm, **run)
    torch.cuda.synchronize()
    assert (_C.cuda_w4a16_last_workspace() & 2) == (2 if hopper and M > 4 else 0)
    assert rel_err(out, expected[0]) < TOL[dtype]
    check_forced_gather(4, 2, t, run, perm, xs, expected, dtype)


@needs_cuda
@pytest.mark.parametrize("K,N,gs,dtype", [(8192, 4096, 128, torch.float16), (14336, 1000, 64, torch.bfloat16),
                                          (8224, 264, 32, torch.float16), (4096, 4096, 128, torch.bfloat16),
                                          (6144, 2048, 128, torch.float16)])
def test_cuda_perm_gathered_by_each_block(K, N, gs, dtype):
    """perm (prepacked act-order) at M = 1 on sm_90, k-interleaved: each block of the GEMM may
    gather its own K range of x[:, perm] into shared memory (no gather kernel, no waiting on other
    blocks). Chosen where K is 4096 or >= 8192 and the column tiles are few (N <= 4096 here); forced
    here at every K (8224: the last k-tile holds 32 k of 128) and at M = 5 (check_forced_gather);
    M = 9 and the GPTQ layout fall back to another gather"""
    hopper = torch.cuda.get_device_capability() == (9, 0)
    t = make_weights(K, N, gs, zeros="v2", device="cuda", scales_dtype=dtype)
    run = dict(t, qweight=torch_ops.prepack_w4a16(t["qweight"]))
    perm = torch.randperm(K, device="cuda").to(torch.int32)
    xs = [torch.randn(1, K, device="cuda", dtype=dtype) for _ in range(3)]
    expected = [reference(x[:, perm.long()], t) for x in xs]
    out = torch_ops.w4a16_linear(xs[0], perm=perm, **run)
    torch.cuda.synchronize()
    chosen = hopper and (K == 4096 or K >= 8192)  # (the SM count allows 16 column tiles on an H100)
    assert (_C.cuda_w4a16_last_workspace() & 4) == (4 if chosen else 0)
    assert rel_err(out, expected[0]) < TOL[dtype]

    def more():  # up to 8 rows (the 8-row tile) when forced; not 9 rows, nor the GPTQ layout
        for m, bit in ((5, 4 if hopper else 0), (9, 0)):
            xm = torch.randn(m, K, device="cuda", dtype=dtype)
            assert rel_err(torch_ops.w4a16_linear(xm, perm=perm, **run), reference(xm[:, perm.long()], t)) < TOL[dtype]
            assert (_C.cuda_w4a16_last_workspace() & 4) == bit
        assert rel_err(torch_ops.w4a16_linear(xs[1], perm=perm, **t), expected[1]) < TOL[dtype]
        assert (_C.cuda_w4a16_last_workspace() & 4) == 0

    check_forced_gather(5, 4, t, run, perm, xs, expected, dtype, more)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N", [(1, 8192, 4096), (5, 4096, 1000), (9, 8192, 8), (13, 8192, 1000), (16, 8192, 2056),
                                   (16, 1024, 264), (24, 8192, 2056), (40, 4096, 1000), (64, 14336, 2048),
                                   (100, 8192, 4104)])
def test_cuda_split_k_through_workspace(dtype, M, K, N):
    """Batches up to 128 on Hopper split K over up to 8 blocks per tile that reduce through the
    workspace, counted on a lock per tile that every launch leaves at zero (8- and 16-row tiles;
    the 16-row tile's last 2-4 blocks to arrive share the sum, one slice each, rows 9..16 here),
    or summed by a kernel after the GEMM (32- and 64-row tiles, the 128 x 256 one: M = 100 here,
    17 column tiles, the last one of 8 columns): repeated launches, both ways of
    reducing (workspace, cluster), bias, the same bits for the same input, a CUDA graph captured
    on a stream of its own (whose locks are allocated during the capture) replayed with new
    inputs, and launches alternating between two streams"""
    t = make_weights(K, N, 128, zeros="v2", device="cuda", scales_dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    xs = [torch.randn(M, K, device="cuda", dtype=dtype) for _ in range(3)]
    expected = [reference(x, t, bias) for x in xs]
    for on in (1, 0):
        _C.cuda_w4a16_global_split(on)
        try:
            for _ in range(2):
                for x, e in zip(xs, expected):
                    assert rel_err(torch_ops.w4a16_linear(x, bias=bias, **t), e) < TOL[dtype]
        finally:
            _C.cuda_w4a16_global_split(1)
    assert torch.equal(torch_ops.w4a16_linear(xs[0], bias=bias, **t), torch_ops.w4a16_linear(xs[0], bias=bias, **t))
    check_graph_and_streams(lambda x: torch_ops.w4a16_linear(x, bias=bias, **t), xs, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 7, 80])
def test_row_shard_of_an_act_order_layer(device, dtype, M):
    """A row-parallel (tensor-parallel) shard of an act-order layer: its rows of qweight and g_idx
    with the whole scales and qzeros (a rank cannot split groups scattered over K; vLLM keeps them
    whole), K not a multiple of group_size. dequantize took it; w4a16_linear refused the scales'
    shape ("[K/group_size, N]"). The shards' products sum to the whole layer's, each matches the
    float64 reference of its rows, and the op checks, compiles and differentiates as usual."""
    K, N, G = 384, 72, 128
    t = make_weights(K, N, G, act_order=True, device=device)
    x = torch.randn(M, K, device=device).to(dtype)
    whole = torch_ops.w4a16_linear(x, **t)
    total = 0
    for a, b in ((0, 96), (96, 200), (200, 384)):  # 96 and 104 rows: no multiple of G
        shard = dict(t, qweight=t["qweight"][a // 8:b // 8], g_idx=t["g_idx"][a:b])
        y = torch_ops.w4a16_linear(x[:, a:b], **shard)
        assert y.dtype == dtype and y.shape == (M, N)
        assert rel_err(y, reference(x[:, a:b], shard)) < TOL[dtype]
        total = total + y.double()
    assert rel_err(total, reference(x, t)) < 2 * TOL[dtype]
    assert rel_err(whole, reference(x, t)) < TOL[dtype]
    shard = dict(t, qweight=t["qweight"][12:25], g_idx=t["g_idx"][96:200])
    xs = x[:, 96:200].float().clone().requires_grad_()
    args = (xs, shard["qweight"], shard["scales"], shard["qzeros"], G, shard["g_idx"], None, "v1")
    torch.library.opcheck(torch.ops.torch_ops.w4a16_linear, args)
    torch_ops.w4a16_linear(xs, **shard).sum().backward()
    w = ref.dequantize(shard["qweight"].cpu(), shard["scales"].cpu().float(), shard["qzeros"].cpu(),
                       "gptq", 4, G, shard["g_idx"].cpu(), "v1")
    assert torch.allclose(xs.grad.cpu(), w.sum(0).expand(M, -1), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: torch_ops.w4a16_linear(x, **shard), fullgraph=True)
    assert torch.equal(compiled(xs.detach()), torch_ops.w4a16_linear(xs.detach(), **shard))
    torch._dynamo.reset()


def test_row_shard_bad_input(device):
    """The shard's scales may hold any number of groups, but qzeros must hold as many, g_idx must
    name one of them, and without g_idx K must still be a multiple of group_size: in the kernel's
    words, on the meta device too."""
    K, N, G = 384, 16, 128
    t = make_weights(K, N, G, act_order=True, device=device)
    x = torch.randn(2, 96, device=device)
    shard = dict(t, qweight=t["qweight"][:12], g_idx=t["g_idx"][:96])
    cases = [(dict(shard, qzeros=t["qzeros"][:2]),
              r"qzeros must have shape \[scales.shape\[0\], N/8\] = \[3, 2\], got \[2, 2\]"),
             (dict(shard, scales=t["scales"][:, :8]), r"scales must have shape \[groups, N\]"),
             (dict(shard, g_idx=None), r"K = 96 must be a multiple of group_size = 128")]
    for w, message in cases:
        meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in w.items()}
        with pytest.raises(ValueError, match="w4a16_linear: " + message):
            torch_ops.w4a16_linear(x, **w)
        with pytest.raises(ValueError, match="w4a16_linear: " + message):
            torch_ops.w4a16_linear(x.to("meta"), **meta)
    with pytest.raises(ValueError, match=r"w4a16_linear: g_idx values must be in \[0, 3\)"):
        torch_ops.w4a16_linear(x, **dict(shard, g_idx=shard["g_idx"] + 3))
