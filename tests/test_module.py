"""QuantLinear and quantize_model, against torch_ops.reference (the pure-torch oracle)."""
import copy
import re
import warnings

import pytest
import torch
from torch import nn

import torch_ops
from torch_ops import QuantLinear, quantize_model
from torch_ops import reference as ref

K, N, G = 256, 128, 64
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def random_words(*shape, device="cpu"):
    """int32 words with every bit pattern possible (nibble 7 >= 8 included: negative words)."""
    return torch.randint(-2**31, 2**31, shape, dtype=torch.int32, device=device)


def random_awq(device="cpu", k=K, n=N, g=G):
    ng = 1 if g == -1 else k // g
    return {"qweight": random_words(k, n // 8, device=device),
            "qzeros": random_words(ng, n // 8, device=device),
            "scales": (torch.rand(ng, n, device=device) * 0.02 + 0.001).half()}


def random_gptq(device="cpu", k=K, n=N, g=G):
    ng = 1 if g == -1 else k // g
    return {"qweight": random_words(k // 8, n, device=device),
            "qzeros": random_words(ng, n // 8, device=device),
            "scales": (torch.rand(ng, n, device=device) * 0.02 + 0.001).half()}


def act_order_g_idx(k=K, g=G, device="cpu"):
    """g_idx of act-order: row k belongs to group rank(k) // G for a random column order."""
    perm = torch.randperm(k, device=device)
    g_idx = (torch.argsort(perm) // g).to(torch.int32)
    assert not torch.equal(g_idx, (torch.arange(k, device=device) // g).to(torch.int32))
    return g_idx


def irregular_g_idx(k=K, g=G, device="cpu"):
    """A scattered g_idx whose groups differ in size (group 0 has g + 8 rows, group 1 g - 8): no
    sort of the rows turns it into arange(K) // G, so it cannot be prepacked."""
    g_idx = torch.arange(k) // g
    g_idx[g:g + 8] = 0
    return g_idx[torch.randperm(k)].to(torch.int32).to(device)


def gptq_output(x, gq, g_idx, group_size=G, bias=None):
    """The pure-torch reference output of GPTQ tensors, computed on the CPU."""
    return ref.w4a16_linear(x.cpu(), gq["qweight"].cpu(), gq["scales"].cpu(), gq["qzeros"].cpu(),
                            group_size, None if g_idx is None else g_idx.cpu(),
                            None if bias is None else bias.cpu(), "v1")


@torch.no_grad()
def rel_error(y, expected):
    return float((y - expected).norm() / expected.norm())


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- constructors and export
@pytest.mark.parametrize("group_size", [64, -1])
def test_awq_round_trip_is_bit_exact(device, group_size):
    awq = random_awq(device, g=group_size)
    awq["bias"] = torch.randn(N, device=device, dtype=torch.float16)
    layer = QuantLinear.from_awq(**awq, group_size=group_size)
    assert (layer.in_features, layer.out_features, layer.group_size) == (K, N, group_size)
    assert layer.qweight.shape == (K // 32, 4, N) and layer.qweight.device.type == device  # k-interleaved
    assert_same(layer.to_awq(), awq)
    gq = layer.to_gptq("v1")
    qweight, qzeros = ref.awq_to_gptq(awq["qweight"].cpu(), awq["qzeros"].cpu(), "v1")
    assert torch.equal(gq["qweight"].cpu(), qweight) and torch.equal(gq["qzeros"].cpu(), qzeros)
    assert torch.equal(gq["g_idx"].cpu(), (torch.arange(K) // (K if group_size == -1 else group_size)).int())
    # and back through the GPTQ constructor
    assert_same(QuantLinear.from_gptq(**gq, group_size=group_size).to_awq(), awq)


@pytest.mark.parametrize("zero_format", ["v1", "v2"])
def test_gptq_round_trip_is_bit_exact(device, zero_format):
    gq = random_gptq(device)
    layer = QuantLinear.from_gptq(**gq, group_size=G, zero_format=zero_format)
    out = layer.to_gptq(zero_format)
    assert_same({k: v for k, v in out.items() if k != "g_idx"}, gq)
    other = "v2" if zero_format == "v1" else "v1"
    assert torch.equal(layer.to_gptq(other)["qzeros"].cpu(),
                       ref.convert_gptq_zeros(gq["qzeros"].cpu(), 4, zero_format, other))
    expected = ref.dequantize(gq["qweight"].cpu(), gq["scales"].cpu(), gq["qzeros"].cpu(), "gptq",
                              4, G, None, zero_format)
    assert torch.equal(layer.dequantize().cpu(), expected)


def test_v1_zero_point_zero_survives(device):
    # z = 0 is stored as nibble 15 in v1 (FORMATS.md section 3): [0,5,3,9,15,1,8,2] -> 0x170E824F
    z = torch.tensor([0, 5, 3, 9, 15, 1, 8, 2], dtype=torch.uint8)
    v2 = ref.pack(z.repeat(K // G, N // 8).reshape(K // G, N), 4, dim=1)
    gq = random_gptq(device)
    gq["qzeros"] = v2.to(device)
    layer = QuantLinear.from_gptq(**gq, group_size=G, zero_format="v2")
    assert int(layer.to_gptq("v1")["qzeros"][0, 0]) == 0x170E824F
    assert torch.equal(layer.to_gptq("v2")["qzeros"], gq["qzeros"])


def test_g_idx_trivial_dropped_act_order_kept(device):
    gq = random_gptq(device)
    plain = QuantLinear.from_gptq(**gq, g_idx=(torch.arange(K, device=device) // G).int(), group_size=G)
    assert plain.g_idx is None and not plain.act_order
    g_idx = act_order_g_idx(device=device)
    layer = QuantLinear.from_gptq(**gq, g_idx=g_idx, group_size=G)
    assert layer.act_order and torch.equal(layer.g_idx, g_idx)
    assert torch.equal(layer.to_gptq()["g_idx"], g_idx)
    with pytest.raises(ValueError, match="act-order"):
        layer.to_awq()
    expected = ref.dequantize(gq["qweight"].cpu(), gq["scales"].cpu(), gq["qzeros"].cpu(), "gptq",
                              4, G, g_idx.cpu(), "v1")
    assert torch.equal(layer.dequantize().cpu(), expected)
    with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, 4\)"):
        QuantLinear.from_gptq(**gq, g_idx=g_idx + 1, group_size=G)


def test_g_idx_range_is_checked_before_narrowing(device):
    """An int64 g_idx is range-checked before it is stored as int32: 2**32 + g would wrap to g
    (the trivial g_idx) and pass. Every integer dtype but bool is taken."""
    gq = random_gptq(device)
    trivial = torch.arange(K, device=device) // G
    with pytest.raises(ValueError, match=r"from_gptq: g_idx values must lie in \[0, 4\) .*"
                                         r"got values in \[4294967296, 4294967299\]"):
        QuantLinear.from_gptq(**gq, g_idx=trivial + 2**32, group_size=G)
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        assert QuantLinear.from_gptq(**gq, g_idx=trivial.to(dtype), group_size=G).g_idx is None
    g_idx = act_order_g_idx(device=device)
    assert torch.equal(QuantLinear.from_gptq(**gq, g_idx=g_idx.to(torch.int8), group_size=G).g_idx,
                       g_idx)
    with pytest.raises(ValueError, match="from_gptq: g_idx must be an integer tensor .* got torch.bool"):
        QuantLinear.from_gptq(**gq, g_idx=trivial.bool(), group_size=G)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="in_features must be a positive multiple of 8"):
        QuantLinear(100, 64)
    with pytest.raises(ValueError, match="group_size must be -1 or a positive divisor"):
        QuantLinear(256, 64, group_size=96)
    awq = random_awq()
    with pytest.raises(ValueError, match=re.escape("from_awq: scales must have shape [4, 128]")):
        QuantLinear.from_awq(awq["qweight"], awq["qzeros"], awq["scales"][:, :64], group_size=G)


def test_constructor_sizes_must_be_ints():
    """A float, None or bool group_size failed with TypeErrors that named nothing ("unsupported
    operand type(s) for &"), or, True, built a layer whose forward refused it; with num_groups,
    group_size=128.0 built a row shard of all the rows (num_groups = in_features / group_size
    went unseen). Integers of other types (numpy's) are taken, as int."""
    for kw, arg, got in [({"group_size": 128.0}, "group_size", "128.0 (float)"),
                         ({"group_size": None}, "group_size", "None"),
                         ({"group_size": True}, "group_size", "True (bool)"),
                         ({"group_size": 128.0, "num_groups": 3}, "group_size", "128.0 (float)"),
                         ({"in_features": 384.0}, "in_features", "384.0 (float)")]:
        with pytest.raises(TypeError, match=re.escape(f"QuantLinear: {arg} must be an int, "
                                                      f"got {got}")):
            QuantLinear(**{"in_features": 384, "out_features": N, **kw})
    np = pytest.importorskip("numpy")
    layer = QuantLinear(np.int64(384), np.int64(N), group_size=np.int64(128), num_groups=3)
    assert not layer.row_shard and type(layer.group_size) is int and layer.kinterleaved
    # num_groups too (refused: "must be an int >= 1"), and from_gptq's group_size, whose row-shard
    # test took np.int64 for no group size and refused a shard, blaming its shape
    shard = QuantLinear(136, N, group_size=np.int64(64), num_groups=np.int64(4))
    assert shard.row_shard and type(shard.num_groups) is int and shard.num_groups == 4
    gq = random_gptq("cpu", k=256, g=64)
    g_idx = act_order_g_idx(k=256, g=64)
    for rows in (136, 128):
        q = torch_ops.pack(torch_ops.unpack(gq["qweight"], 4, dim=0)[:rows], 4, dim=0)
        layer = QuantLinear.from_gptq(q, gq["qzeros"], gq["scales"], g_idx=g_idx[:rows],
                                      group_size=np.int64(64))
        assert layer.row_shard and layer.num_groups == 4 and type(layer.group_size) is int



@pytest.mark.parametrize("dtype", [torch.int32, torch.float64], ids=str)
def test_constructor_refuses_a_dtype_the_layer_cannot_compute_in(dtype):
    """dtype=torch.int32 (or float64) built a layer whose scales the op refused only at forward.
    from_awq / from_gptq, whose scales give the dtype, name the scales as before."""
    with pytest.raises(ValueError, match=re.escape(
            f"QuantLinear: dtype must be float16, bfloat16 or float32, got {dtype}")):
        QuantLinear(K, N, group_size=G, dtype=dtype)
    gq, awq = random_gptq(), random_awq()
    with pytest.raises(ValueError, match=re.escape(
            f"from_gptq: scales must be float16, bfloat16 or float32, got {dtype}")):
        QuantLinear.from_gptq(**dict(gq, scales=gq["scales"].to(dtype)), group_size=G)
    with pytest.raises(ValueError, match=re.escape(
            f"from_awq: scales must be float16, bfloat16 or float32, got {dtype}")):
        QuantLinear.from_awq(awq["qweight"], awq["qzeros"], awq["scales"].to(dtype), group_size=G)
    for ok in (torch.float16, torch.bfloat16, torch.float32):
        assert QuantLinear(K, N, group_size=G, dtype=ok).scales.dtype == ok
    # None, as for nn.Linear: torch's default dtype
    assert QuantLinear(K, N, group_size=G, dtype=None).scales.dtype == torch.get_default_dtype()


def test_tensors_that_are_not_tensors_are_refused_by_name():
    """None (a symmetric checkpoint without qzeros), a numpy array or a qweight that is not 2-D
    (a k-interleaved [K/32, 4, N]) failed with AttributeError / IndexError, or a message about
    other dimensions; a state dict's None bias escaped load_state_dict's error report."""
    gq = random_gptq()
    cases = [(dict(gq, qzeros=None), "from_gptq: qzeros must be a torch.Tensor, got NoneType"),
             (dict(gq, scales=None), "from_gptq: scales must be a torch.Tensor, got NoneType"),
             (dict(gq, qweight=gq["qweight"].numpy()), "from_gptq: qweight must be a torch.Tensor"),
             (dict(gq, qweight=gq["qweight"].flatten()), "from_gptq: qweight must be a 2-D tensor"),
             (dict(gq, qweight=torch_ops.prepack_w4a16(gq["qweight"])),
              re.escape("from_gptq: qweight must be a 2-D tensor [K/8, N], got shape [8, 4, 128]"))]
    for tensors, message in cases:
        with pytest.raises(ValueError, match=message):
            QuantLinear.from_gptq(**tensors, group_size=G)
    awq = random_awq()
    with pytest.raises(ValueError, match="from_awq: qzeros must be a torch.Tensor, got NoneType"):
        QuantLinear.from_awq(awq["qweight"], None, awq["scales"], group_size=G)
    layer = QuantLinear(K, N, group_size=G)
    for key in ("qweight", "qzeros", "scales", "bias"):
        with pytest.raises(RuntimeError, match=f"{key} must be a torch.Tensor, got NoneType"):
            layer.load_state_dict({**gq, "bias": torch.zeros(N, dtype=torch.float16), key: None})


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act_order", [False, True])
def test_forward_matches_reference(device, dtype, act_order):
    gq = random_gptq(device)
    g_idx = act_order_g_idx(device=device) if act_order else None
    bias = torch.randn(N, device=device, dtype=torch.float16)
    layer = QuantLinear.from_gptq(**gq, g_idx=g_idx, bias=bias, group_size=G)
    x = torch.randn(3, 5, K, device=device, dtype=dtype)
    y = layer(x)
    assert y.shape == (3, 5, N) and y.dtype == dtype
    expected = ref.w4a16_linear(x.cpu(), gq["qweight"].cpu(), gq["scales"].cpu(), gq["qzeros"].cpu(),
                                G, None if g_idx is None else g_idx.cpu(), bias.cpu(), "v1")
    torch.testing.assert_close(y.cpu(), expected, rtol=TOL[dtype], atol=TOL[dtype])


# ---------------------------------------------------------------- act-order prepack
def test_act_order_prepack(device):
    gq = random_gptq(device)
    g_idx = act_order_g_idx(device=device)
    qweight, perm = torch_ops.act_order_prepack(gq["qweight"], g_idx, G)
    assert perm.dtype == torch.int32 and perm.device.type == device
    assert qweight.dtype == torch.int32 and qweight.shape == gq["qweight"].shape
    # a stable sort by group: group 0's rows in their order, then group 1's, ...
    expected_perm = torch.cat([torch.nonzero(g_idx.cpu() == i).flatten() for i in range(K // G)])
    assert torch.equal(perm.cpu().long(), expected_perm)
    rows = ref.unpack(gq["qweight"].cpu(), 4, dim=0)
    assert torch.equal(ref.unpack(qweight.cpu(), 4, dim=0), rows[expected_perm])
    again = torch_ops.act_order_prepack(gq["qweight"], g_idx.long(), G)  # int64 g_idx as well
    assert torch.equal(again[0], qweight) and torch.equal(again[1], perm)
    # what it is for: the op without g_idx, on permuted activations
    x = torch.randn(5, K, device=device, dtype=torch.float16)
    y = torch_ops.w4a16_linear(x, qweight, gq["scales"], gq["qzeros"], G, perm=perm)
    torch.testing.assert_close(y.cpu(), gptq_output(x, gq, g_idx), rtol=TOL[x.dtype],
                               atol=TOL[x.dtype])
    y2 = torch_ops.w4a16_linear(x.index_select(-1, perm), qweight, gq["scales"], gq["qzeros"], G)
    torch.testing.assert_close(y, y2, rtol=TOL[x.dtype], atol=TOL[x.dtype])


def test_act_order_prepack_declines_and_refuses(device):
    qweight = random_gptq(device)["qweight"]
    # groups of unequal size, or values that are not 0..K/G-1: only the g_idx path can run them
    assert torch_ops.act_order_prepack(qweight, irregular_g_idx(device=device), G) is None
    assert torch_ops.act_order_prepack(qweight, act_order_g_idx(device=device) + 1, G) is None
    # K not a multiple of group_size (a row shard of an act-order layer, which w4a16_linear
    # takes with g_idx): the g_idx path too (it raised ValueError, as for a bad argument)
    assert torch_ops.act_order_prepack(qweight, act_order_g_idx(device=device) % 2, 96) is None
    # group_size -1 is one group: the sort is the identity
    zeros = torch.zeros(K, dtype=torch.int32, device=device)
    same, perm = torch_ops.act_order_prepack(qweight, zeros, -1)
    assert torch.equal(same, qweight) and torch.equal(perm.cpu(), torch.arange(K, dtype=torch.int32))
    assert QuantLinear.from_gptq(**random_gptq(device, g=-1), g_idx=zeros, group_size=-1).perm is None
    g_idx = act_order_g_idx(device=device)
    bad = [((qweight.float(), g_idx, G), "qweight must be a 2-D torch.int32 tensor [K/8, N], got "
                                         "torch.float32 of shape [32, 128]"),
           ((qweight, g_idx.float(), G), "g_idx must be an int32 or int64 tensor of shape [K] = "
                                         "[256] (K = 8 * qweight.shape[0]), got torch.float32"),
           ((qweight, g_idx[:-8], G), "g_idx must be an int32 or int64 tensor of shape [K] = "
                                      "[256] (K = 8 * qweight.shape[0]), got torch.int32 of shape "
                                      "[248]"),
           ((qweight, g_idx, 0), "group_size must be -1 or positive, got 0"),
           # (K % G raised ZeroDivisionError, naming nothing; the ops refuse it in these words)
           ((qweight[:0], g_idx[:0], -1), "group_size = -1 (one group of all K rows) needs K > 0, "
                                          "got K = 0"),
           ((qweight.to("meta"), g_idx.to("meta"), G), "g_idx is on the meta device: its values "
                                                       "decide the sort")]
    if device == "cuda":
        bad.append(((qweight, g_idx.cpu(), G), "g_idx is on cpu, qweight on cuda:0"))
    for args, message in bad:
        with pytest.raises(ValueError, match=re.escape("act_order_prepack: " + message)):
            torch_ops.act_order_prepack(*args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [32, 128])
def test_act_order_prepacked_forward(device, dtype, group_size):
    gq = random_gptq(device, g=group_size)
    g_idx = act_order_g_idx(g=group_size, device=device)
    bias = torch.randn(N, device=device, dtype=torch.float16)
    layer = QuantLinear.from_gptq(**gq, g_idx=g_idx, bias=bias, group_size=group_size)
    assert layer.perm is not None and "prepacked=True" in repr(layer)
    assert not torch.equal(layer.qweight, gq["qweight"])  # kept sorted by group
    x = torch.randn(3, 5, K, device=device, dtype=dtype)
    y = layer(x)
    assert y.shape == (3, 5, N) and y.dtype == dtype
    tol = dict(rtol=TOL[dtype], atol=TOL[dtype])
    # the op on its g_idx path, and the pure-torch reference
    on_g_idx_path = torch_ops.w4a16_linear(x, gq["qweight"], gq["scales"], gq["qzeros"],
                                           group_size, g_idx, bias)
    torch.testing.assert_close(y, on_g_idx_path, **tol)
    torch.testing.assert_close(y.cpu(), gptq_output(x, gq, g_idx, group_size, bias), **tol)
    assert layer.kinterleaved == (group_size % 32 == 0)  # sorted groups, then k-interleaved
    with pytest.raises(ValueError, match=r"x.shape\[-1\] = 264 must equal K = (8|32) \* qweight"):
        layer(torch.randn(2, K + 8, device=device, dtype=dtype))


def test_act_order_prepacked_backward(device):
    gq = random_gptq(device)
    g_idx = act_order_g_idx(device=device)
    layer = QuantLinear.from_gptq(**gq, g_idx=g_idx, group_size=G)
    x = torch.randn(3, K, device=device, requires_grad=True)
    grad = torch.randn(3, N, device=device)
    layer(x).backward(grad)
    w = ref.dequantize(gq["qweight"].cpu(), gq["scales"].float().cpu(), gq["qzeros"].cpu(), "gptq",
                       4, G, g_idx.cpu(), "v1")
    torch.testing.assert_close(x.grad.cpu(), grad.cpu() @ w, rtol=1e-4, atol=1e-4)


def test_lora_through_torch_func(device):
    """a LoRA adapter over a quantized base (act-order, prepacked) trained with torch.func, with a
    trainable scale in front of the base (so its gradient crosses the base's backward):
    functional_call + grad equals eager autograd, and per-sample gradients (vmap of grad) sum to it"""
    gq = random_gptq(device)
    base = QuantLinear.from_gptq(**gq, g_idx=act_order_g_idx(device=device), group_size=G)
    init = {"a": torch.randn(8, K, device=device) / 16, "b": torch.randn(N, 8, device=device) / 16,
            "pre": 1 + torch.randn(K, device=device) / 8}

    def loss(params, x):
        h = x * params["pre"]
        y = torch.func.functional_call(base, {}, (h,)) + h @ params["a"].t() @ params["b"].t()
        return y.square().mean()

    x = torch.randn(5, K, device=device)
    params = {k: v.clone().requires_grad_() for k, v in init.items()}
    loss(params, x).backward()
    grads = torch.func.grad(loss)(init, x)
    for k in init:
        assert params[k].grad.abs().sum() > 0
        torch.testing.assert_close(grads[k], params[k].grad, rtol=1e-4, atol=1e-5)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(init, x.unsqueeze(1))
    for k in init:  # mean over 5 samples of the per-sample means
        torch.testing.assert_close(per_sample[k].sum(0) / 5, params[k].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_irregular_g_idx_keeps_the_g_idx_path(device, dtype):
    gq = random_gptq(device)
    g_idx = irregular_g_idx(device=device)
    layer = QuantLinear.from_gptq(**gq, g_idx=g_idx, group_size=G)
    assert layer.act_order and layer.perm is None and "prepacked" not in repr(layer)
    assert torch.equal(layer.qweight, gq["qweight"])
    x = torch.randn(3, 5, K, device=device, dtype=dtype)
    torch.testing.assert_close(layer(x).cpu(), gptq_output(x, gq, g_idx), rtol=TOL[dtype],
                               atol=TOL[dtype])
    assert_same(layer.to_gptq(), {**gq, "g_idx": g_idx})


@pytest.mark.parametrize("zero_format", ["v1", "v2"])
def test_act_order_prepack_is_invisible_from_outside(device, zero_format):
    gq = random_gptq(device)
    g_idx = act_order_g_idx(device=device)
    bias = torch.randn(N, device=device, dtype=torch.float16)
    layer = QuantLinear.from_gptq(**gq, g_idx=g_idx, bias=bias, group_size=G, zero_format=zero_format)
    assert layer.perm is not None
    original = {**gq, "g_idx": g_idx, "bias": bias}
    assert_same(layer.state_dict(), original)  # the checkpoint's row order, and no perm
    assert_same(layer.to_gptq(zero_format), original)
    with pytest.raises(ValueError, match="act-order"):
        layer.to_awq()
    expected = ref.dequantize(gq["qweight"].cpu(), gq["scales"].cpu(), gq["qzeros"].cpu(), "gptq",
                              4, G, g_idx.cpu(), zero_format)
    assert torch.equal(layer.dequantize().cpu(), expected)


@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_switches_act_order_on_and_off(device, assign):
    layer = QuantLinear(K, N, bias=False, group_size=G, device=device)
    x = torch.randn(4, K, device=device, dtype=torch.float16)
    perm_ptr = None
    for kind in ["act_order", "act_order", "plain", "awq", "irregular", "act_order"]:
        if kind == "awq":
            sd = random_awq(device)
            gq = dict(zip(["qweight", "qzeros"], ref.awq_to_gptq(sd["qweight"].cpu(),
                                                                sd["qzeros"].cpu(), "v1")),
                      scales=sd["scales"])
            g_idx = None
        else:
            gq = random_gptq(device)
            g_idx = {"act_order": act_order_g_idx, "irregular": irregular_g_idx,
                     "plain": lambda device: (torch.arange(K, device=device) // G).int()}[kind](
                device=device)
            sd = {**gq, "g_idx": g_idx}
            g_idx = None if kind == "plain" else g_idx
        qweight_ptr = layer.qweight.data_ptr()
        layer.load_state_dict(sd, assign=assign)
        assert layer.loaded_from == ("awq" if kind == "awq" else "gptq")
        assert layer.act_order == (g_idx is not None)
        assert (layer.perm is not None) == (kind == "act_order")
        if not assign:  # copied in place, perm too once it exists
            assert layer.qweight.data_ptr() == qweight_ptr
            if layer.perm is not None and perm_ptr is not None:
                assert layer.perm.data_ptr() == perm_ptr
            perm_ptr = None if layer.perm is None else layer.perm.data_ptr()
        torch.testing.assert_close(layer(x).cpu(), gptq_output(x, gq, g_idx), rtol=2e-3, atol=2e-3)
        assert torch.equal(layer.state_dict()["qweight"].cpu(), gq["qweight"].cpu())


def test_load_quantized_prepacks_act_order(tmp_path):
    gq = random_gptq()
    g_idx = act_order_g_idx()
    saved = nn.Sequential(QuantLinear.from_gptq(**gq, g_idx=g_idx, group_size=G))
    torch_ops.checkpoint.save_quantized(saved, tmp_path, "gptq")
    with torch.device("meta"):  # as transformers builds big models: loaded with assign=True
        model = nn.Sequential(nn.Linear(K, N, bias=False))
    layer = torch_ops.load_quantized(model, tmp_path)[0]
    assert isinstance(layer, QuantLinear) and layer.perm is not None
    assert {b.device.type for b in layer.buffers()} == {"cpu"}
    x = torch.randn(2, K, dtype=torch.float16)
    torch.testing.assert_close(layer(x), gptq_output(x, gq, g_idx), rtol=2e-3, atol=2e-3)
    assert_same(layer.state_dict(), {**gq, "g_idx": g_idx})


def test_from_linear_is_close_to_float(device):
    lin = nn.Linear(K, N).to(device)
    layer = QuantLinear.from_linear(lin, group_size=G)
    q = ref.quantize(lin.weight.detach().cpu(), 4, G, False, "gptq", "v1")
    assert torch.equal(layer.to_gptq()["qweight"].cpu(), q["qweight"])
    assert torch.equal(layer.qzeros.cpu(), q["qzeros"])
    assert torch.equal(layer.bias, lin.bias.detach())
    x = torch.randn(4, K, device=device)
    w = ref.dequantize(q["qweight"], q["scales"].float(), q["qzeros"], "gptq", 4, G).to(device)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, w, lin.bias), rtol=1e-4, atol=1e-4)
    assert rel_error(layer(x), lin(x)) < 0.1  # 4-bit RTN of uniform weights: about 1/15
    assert "format=linear" in repr(layer)


def test_from_linear_refuses_bad_arguments_by_name():
    """A group_size of another type raised TypeError "'<=' not supported between instances of
    'str' and 'int'" from check_dims, a module other than a Linear "too many values to unpack"
    (a Conv1d's 3-D weight) or AttributeError (None), none naming from_linear or the argument."""
    for kw, match in [({"linear": nn.Linear(K, N), "group_size": "64"},
                       "from_linear: group_size must be an int, got '64' (str)"),
                      ({"linear": nn.Linear(K, N), "group_size": None},
                       "from_linear: group_size must be an int, got None"),
                      ({"linear": nn.Conv1d(K, N, 1)},
                       "from_linear: linear must be an nn.Linear, got Conv1d"),
                      ({"linear": None}, "from_linear: linear must be an nn.Linear, got NoneType")]:
        with pytest.raises(TypeError, match=re.escape(match)):
            QuantLinear.from_linear(**kw)


# ---------------------------------------------------------------- state dict
def test_state_dict_round_trip_from_awq_keys():
    awq = random_awq()
    awq["bias"] = torch.randn(N, dtype=torch.float16)
    layer = QuantLinear(K, N, group_size=G)
    assert layer.load_state_dict(awq) is not None
    assert layer.loaded_from == "awq"
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "qzeros", "scales", "bias"} and sd["qweight"].shape == (K // 8, N)
    again = QuantLinear(K, N, group_size=G)
    again.load_state_dict(sd)
    assert again.loaded_from == "gptq"
    assert_same(again.to_awq(), awq)


def test_awq_keys_with_a_g_idx_that_is_not_plain_are_refused():
    """AWQ has no g_idx: with the plain one it loads, with any other it is refused. A sorted one
    of other groups (all zeros) was called act-order; the message now says what is wrong."""
    awq = random_awq()
    layer = QuantLinear(K, N, bias=False, group_size=G)
    layer.load_state_dict({**awq, "g_idx": (torch.arange(K) // G).int()})
    assert layer.g_idx is None
    for g_idx in (torch.zeros(K, dtype=torch.int32), act_order_g_idx()):
        with pytest.raises(RuntimeError, match=re.escape(
                "g_idx is not arange(K) // group_size (act-order, or groups of another size) but "
                "qweight has the AWQ layout, which has no g_idx")):
            QuantLinear(K, N, bias=False, group_size=G).load_state_dict({**awq, "g_idx": g_idx})


@pytest.mark.parametrize("zero_format", ["v1", "v2"])
def test_state_dict_round_trip_from_gptq_keys(zero_format):
    gq = random_gptq()
    g_idx = act_order_g_idx()
    layer = QuantLinear(K, N, bias=False, group_size=G, checkpoint_zero_format=zero_format)
    layer.load_state_dict({**gq, "g_idx": g_idx})
    assert layer.act_order and layer.loaded_from == "gptq" and layer.perm is not None
    sd = layer.state_dict()
    assert_same(sd, {**gq, "g_idx": g_idx})  # written back in the zero format it reads
    expected = ref.dequantize(gq["qweight"], gq["scales"], gq["qzeros"], "gptq", 4, G, g_idx, zero_format)
    assert torch.equal(layer.dequantize(), expected)
    # a non-act-order state dict clears the act-order
    layer.load_state_dict({**gq, "g_idx": (torch.arange(K) // G).int()})
    assert not layer.act_order and layer.perm is None and "g_idx" not in layer.state_dict()


def test_checkpoint_zero_format_is_checked_on_assignment(tmp_path):
    """layer.checkpoint_zero_format = "v3" was taken, and the next state_dict() failed inside
    convert_gptq_zeros without naming the attribute. Refused as the constructor refuses it; a
    layer keeps its format through deepcopy and torch.save of the whole layer."""
    message = "QuantLinear: checkpoint_zero_format must be one of ('v1', 'v2'), got 'v3'"
    with pytest.raises(ValueError, match=re.escape(message)):
        QuantLinear(K, N, bias=False, group_size=G, checkpoint_zero_format="v3")
    gq = random_gptq()
    layer = QuantLinear.from_gptq(**gq, group_size=G)
    with pytest.raises(ValueError, match=re.escape(message)):
        layer.checkpoint_zero_format = "v3"
    assert layer.checkpoint_zero_format == "v1"
    assert_same(layer.state_dict(), gq)
    layer.checkpoint_zero_format = "v2"
    torch.save(layer, tmp_path / "layer.pt")
    for again in (copy.deepcopy(layer), torch.load(tmp_path / "layer.pt", weights_only=False)):
        assert again.checkpoint_zero_format == "v2"
        assert torch.equal(again.state_dict()["qzeros"], layer.to_gptq("v2")["qzeros"])
        with pytest.raises(ValueError, match=re.escape(message)):
            again.checkpoint_zero_format = "v3"


@pytest.mark.parametrize("saved,loader", [("v2", "v1"), ("v1", "v2"), ("v2", "v2")])
def test_state_dict_records_its_zero_format(saved, loader):
    """A state dict from a module of one zero format loads right into a module of the other: the
    format travels in the state dict's metadata (through torch.save too); without it, the loading
    module's checkpoint_zero_format decides."""
    import io
    gq = random_gptq()
    source = QuantLinear.from_gptq(**gq, group_size=G, zero_format=saved)
    expected = source.dequantize()
    sd = source.state_dict()
    assert torch.equal(sd["qzeros"], gq["qzeros"])  # the tensors are untouched, v1 or v2
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    for state in (sd, torch.load(io.BytesIO(buffer.getvalue()))):
        layer = QuantLinear(K, N, bias=False, group_size=G, checkpoint_zero_format=loader)
        layer.load_state_dict(state)
        assert torch.equal(layer.dequantize(), expected)
    nested = nn.Sequential(nn.Identity(), copy.deepcopy(source)).state_dict()
    layer = QuantLinear(K, N, bias=False, group_size=G, checkpoint_zero_format=loader)
    nn.Sequential(nn.Identity(), layer).load_state_dict(nested)
    assert torch.equal(layer.dequantize(), expected)
    plain = dict(sd)  # no metadata: read as the loading module's format
    layer = QuantLinear(K, N, bias=False, group_size=G, checkpoint_zero_format=loader)
    layer.load_state_dict(plain)
    want = ref.dequantize(gq["qweight"], gq["scales"], gq["qzeros"], "gptq", 4, G, None, loader)
    assert torch.equal(layer.dequantize(), want)
    assert (saved == loader) == torch.equal(want, expected)
    sd._metadata[""]["gptq_zero_format"] = "v3"
    with pytest.raises(RuntimeError, match="qzeros: the state dict's recorded zero format"):
        layer.load_state_dict(sd)


def test_load_state_dict_warns_of_v2_zeros_read_as_v1(device):
    """GPTQ qzeros loaded as v1 whose every word is 0x88888888 (zero points of 9: v2's symmetric
    zeros under a v1 label, as transformers/optimum and GPTQModel hold them in memory) load as v1
    all the same, with a warning; not v1's own symmetric zeros (0x77777777), the same words read as
    v2 (checkpoint_zero_format or the state dict's record), AWQ's, or a meta state dict."""
    def v2_zero_warnings(layer, sd, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer.load_state_dict(sd, **kwargs)
        return [str(w.message) for w in caught if "0x88888888" in str(w.message)]

    gq = random_gptq(device)
    v2_sym = {**gq, "qzeros": torch.full_like(gq["qzeros"], 0x88888888 - (1 << 32))}
    layer = QuantLinear(K, N, bias=False, group_size=G).to(device)
    found = v2_zero_warnings(layer, v2_sym)
    assert len(found) == 1 and found[0].startswith("QuantLinear.load_state_dict: GPTQ qzeros "
                                                   "read as v1"), found
    assert "0x77777777" in found[0] and 'checkpoint_zero_format="v2"' in found[0]
    want = ref.dequantize(*(v2_sym[k].cpu() for k in ("qweight", "scales", "qzeros")), "gptq", 4,
                          G, None, "v1")
    assert torch.equal(layer.dequantize().cpu(), want)  # read as v1 all the same
    model = nn.Sequential(QuantLinear(K, N, bias=False, group_size=G).to(device))
    assert len(v2_zero_warnings(model, {f"0.{k}": v for k, v in v2_sym.items()})) == 1
    v1_sym = {**gq, "qzeros": torch.full_like(gq["qzeros"], 0x77777777)}
    assert v2_zero_warnings(layer, v1_sym) == [] and v2_zero_warnings(layer, gq) == []
    as_v2 = QuantLinear(K, N, bias=False, group_size=G, checkpoint_zero_format="v2").to(device)
    assert v2_zero_warnings(as_v2, v2_sym) == []
    recorded = as_v2.state_dict()  # the v2 record wins over the v1 module's format
    assert v2_zero_warnings(QuantLinear(K, N, bias=False, group_size=G).to(device), recorded) == []
    assert v2_zero_warnings(layer, {**random_awq(device), "qzeros": v2_sym["qzeros"]}) == []
    meta = {k: v.to("meta") for k, v in v2_sym.items()}
    assert v2_zero_warnings(QuantLinear(K, N, bias=False, group_size=G, device="meta"), meta,
                            assign=True) == []


@pytest.mark.parametrize("k,g,kinterleave,held", [(K, G, True, True), (K, -1, True, True),
                                                  (K, G, False, False), (40, -1, True, False),
                                                  (96, 48, True, False), (192, 96, True, False),
                                                  (96, 96, True, True)])
def test_kinterleaved_qweight_is_invisible_from_outside(device, k, g, kinterleave, held):
    """qweight is held k-interleaved where the layer allows it (K a multiple of 32; one group or a
    power-of-two group: 96 of 192 is not) and kinterleave is on; outputs, state dicts and exports do not depend on it"""
    gq = random_gptq(device, k=k, g=g)
    layer = QuantLinear.from_gptq(**gq, group_size=g)
    if not kinterleave:
        layer = QuantLinear(k, N, bias=False, group_size=g, device=device, kinterleave=False)
        layer.load_state_dict(gq)
    assert layer.kinterleaved == held
    assert layer.qweight.shape == ((k // 32, 4, N) if held else (k // 8, N))
    assert ("kinterleaved=True" in repr(layer)) == held
    x = torch.randn(3, k, device=device, dtype=torch.float16)
    torch.testing.assert_close(layer(x).cpu(), gptq_output(x, gq, None, group_size=g),
                               rtol=2e-3, atol=2e-3)
    assert torch.equal(layer.state_dict()["qweight"].cpu(), gq["qweight"].cpu())
    assert torch.equal(layer.to_gptq()["qweight"].cpu(), gq["qweight"].cpu())
    w = ref.dequantize(gq["qweight"].cpu(), gq["scales"].cpu(), gq["qzeros"].cpu(), "gptq", 4,
                       k if g == -1 else g)
    torch.testing.assert_close(layer.dequantize().cpu(), w)


def test_load_state_dict_copies_in_place_on_the_module_device(device):
    layer = QuantLinear(K, N, group_size=G, device=device)
    ptr = layer.qweight.data_ptr()
    gq = random_gptq()  # on the CPU
    layer.load_state_dict({**gq, "bias": torch.zeros(N, dtype=torch.float16)})
    assert layer.qweight.data_ptr() == ptr  # same storage: CUDA graphs captured on it stay valid
    assert layer.qweight.device.type == device
    assert torch.equal(torch_ops.unprepack_w4a16(layer.qweight).cpu(), gq["qweight"])


def test_load_state_dict_names_key_and_shapes():
    awq = random_awq()
    layer = nn.Sequential(QuantLinear(K, N, bias=False, group_size=G))
    bad = {"0.qweight": awq["qweight"][:, :3], "0.qzeros": awq["qzeros"], "0.scales": awq["scales"]}
    with pytest.raises(RuntimeError) as info:
        layer.load_state_dict(bad)
    msg = str(info.value)
    for part in ["0.qweight", "[32, 128]", "[256, 16]", "[256, 3]", "GPTQ", "AWQ"]:
        assert part in msg, (part, msg)
    bad = {"0.qweight": awq["qweight"], "0.qzeros": awq["qzeros"][:, :5], "0.scales": awq["scales"]}
    with pytest.raises(RuntimeError, match=re.escape("0.qzeros must have shape [4, 16]")):
        layer.load_state_dict(bad)


def test_load_state_dict_missing_and_unexpected_keys():
    awq = random_awq()
    layer = QuantLinear(K, N, group_size=G)  # has a bias
    with pytest.raises(RuntimeError, match="Missing key.*bias.*\n?.*Unexpected key.*extra"):
        layer.load_state_dict({**awq, "extra": torch.zeros(1)})
    result = layer.load_state_dict({"bias": torch.ones(N)}, strict=False)
    assert sorted(result.missing_keys) == ["qweight", "qzeros", "scales"]
    # part of a layer's quantized tensors is an error even with strict=False (it was ignored)
    before = layer.scales.clone()
    for part in ({"qweight": awq["qweight"]}, {"scales": awq["scales"] * 2}):
        with pytest.raises(RuntimeError, match="load together.*got " + next(iter(part))):
            layer.load_state_dict(part, strict=False)
    assert torch.equal(layer.scales, before)
    no_bias = QuantLinear(K, N, bias=False, group_size=G)
    with pytest.raises(RuntimeError, match="Unexpected key.*bias"):
        no_bias.load_state_dict({**awq, "bias": torch.zeros(N)})



def test_a_refused_bias_leaves_the_layer_as_it_was():
    """load_state_dict checks the bias before it loads the quantized tensors: a bias of the
    wrong shape or dtype left the layer holding the new weights beside the old bias"""
    layer = QuantLinear.from_gptq(**random_gptq(), bias=torch.randn(N, dtype=torch.float16),
                                  group_size=G)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    new = dict(random_gptq(), g_idx=act_order_g_idx())
    for bias in (torch.zeros(N + 8, dtype=torch.float16), torch.zeros(N, dtype=torch.int64)):
        with pytest.raises(RuntimeError, match="bias must"):
            layer.load_state_dict({**new, "bias": bias})
        assert_same(dict(layer.state_dict()), before)
        assert layer.perm is None and layer.g_idx is None



def test_a_meta_g_idx_is_refused_by_name():
    """The state dict of an act-order layer moved to the meta device (a skeleton's): its g_idx
    has no values to check or prepack by; the load raised "Tensor.item() cannot be called on meta
    tensors" outside load_state_dict's report. Without g_idx a meta state dict loads."""
    layer = QuantLinear.from_gptq(**random_gptq(), g_idx=act_order_g_idx(), group_size=G)
    meta_sd = layer.to("meta").state_dict()
    for assign in (False, True):
        for device in ("meta", "cpu"):
            target = QuantLinear(K, N, bias=False, group_size=G, device=device)
            with pytest.raises(RuntimeError, match="g_idx is on the meta device"):
                target.load_state_dict(meta_sd, assign=assign)
            assert target.g_idx is None
    with pytest.raises(ValueError, match="from_gptq: g_idx is on the meta device"):
        QuantLinear.from_gptq(**{k: v for k, v in meta_sd.items()}, group_size=G)
    plain = QuantLinear(K, N, bias=False, group_size=G, device="meta")
    plain.load_state_dict({k: v for k, v in meta_sd.items() if k != "g_idx"}, assign=True)
    assert plain.qweight.is_meta


# ---------------------------------------------------------------- module behaviour
def test_extra_repr():
    layer = QuantLinear.from_awq(**random_awq(), group_size=G)
    text = repr(layer)
    for part in ["in_features=256", "out_features=128", "bits=4", "group_size=64", "format=awq",
                 "act_order=False", "bias=False"]:
        assert part in text, text
    layer = QuantLinear.from_gptq(**random_gptq(), g_idx=act_order_g_idx(), group_size=G)
    assert "format=gptq" in repr(layer) and "act_order=True" in repr(layer)


@pytest.mark.parametrize("act_order", [False, True])
def test_to_dtype_and_device(device, act_order):
    layer = QuantLinear.from_gptq(**random_gptq(), g_idx=act_order_g_idx() if act_order else None,
                                  bias=torch.randn(N, dtype=torch.float16), group_size=G)
    x = torch.randn(2, K)
    expected = layer(x)
    moved = copy.deepcopy(layer).to(device)
    assert {b.device.type for b in moved.buffers()} == {device}
    assert (moved.perm is not None) == act_order
    torch.testing.assert_close(moved(x.to(device)).cpu(), expected, rtol=1e-3, atol=1e-3)
    bf = moved.to(torch.bfloat16)
    assert bf.scales.dtype == torch.bfloat16 and bf.bias.dtype == torch.bfloat16
    assert bf.qweight.dtype == torch.int32 and bf.qzeros.dtype == torch.int32
    assert bf.perm is None or bf.perm.dtype == torch.int32
    y = bf(x.to(device, torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().cpu(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("g_idx_kind", ["prepacked", "irregular", "row shard"])
def test_compile_fullgraph(device, g_idx_kind):
    bias = torch.randn(N, device=device, dtype=torch.float16)
    if g_idx_kind == "row shard":  # 136 rows of an act-order layer (num_groups 3)
        gq = random_gptq(device, k=SK, g=SG)
        layer = QuantLinear.from_gptq(**row_shards(gq, act_order_g_idx(k=SK, g=SG, device=device),
                                                   bias=bias)[0], group_size=SG)
        assert layer.row_shard
    else:
        gq = random_gptq(device)
        g_idx = (act_order_g_idx if g_idx_kind == "prepacked" else irregular_g_idx)(device=device)
        layer = QuantLinear.from_gptq(**gq, g_idx=g_idx, bias=bias, group_size=G)
        assert (layer.perm is not None) == (g_idx_kind == "prepacked")
    x = torch.randn(4, layer.in_features, device=device, dtype=torch.float16)
    torch._dynamo.reset()
    try:
        # aot_eager traces the whole graph through the fake kernels, as inductor would, without
        # spending half a minute generating C++ (examples/demo.py runs the inductor path)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # a graph break raises
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-3, atol=1e-3)
    finally:
        torch._dynamo.reset()


def _exported_two_layers(device):
    """Two QuantLinear layers (the first act-order prepacked, with bias) around a ReLU, a sample
    x, and their torch.export program with a dynamic batch"""
    model = nn.Sequential(
        QuantLinear.from_gptq(**random_gptq(device), g_idx=act_order_g_idx(device=device),
                              group_size=G, bias=torch.randn(N, device=device)),
        nn.ReLU(),
        QuantLinear.from_gptq(**random_gptq(device, k=N, n=64), group_size=G))
    x = torch.randn(3, K, device=device)
    return model, x, torch.export.export(model, (x,),
                                         dynamic_shapes=({0: torch.export.Dim("batch")},))


def test_torch_export_save_load(device, tmp_path):
    """torch.export of a model with QuantLinear layers (act-order prepacked, bias) and a dynamic
    batch: the program holds one torch_ops.w4a16_linear per layer, survives save / load, and
    computes what the module does"""
    model, x, program = _exported_two_layers(device)
    calls = [n for n in program.graph.nodes if n.target is torch.ops.torch_ops.w4a16_linear.default]
    assert len(calls) == 2
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    for batch in (3, 1, 9):
        xb = torch.randn(batch, K, device=device)
        assert torch.equal(loaded(xb), model(xb))
    # the layer itself as the exported module: a plain one with bias (its None g_idx and perm
    # buffers come after bias: torch.export fails on two None buffers before a tensor one)
    layer = QuantLinear.from_gptq(**random_gptq(device), group_size=G, bias=torch.randn(N, device=device))
    assert torch.equal(torch.export.export(layer, (x,)).module()(x), layer(x))


def test_aoti_package(device, tmp_path, aoti_package_check):
    """AOTInductor (what an inference engine deploys: the exported program compiled to a shared
    library, loaded without Python's model code) calls the ops through its custom-op fallback:
    a package of QuantLinear layers (act-order prepacked, bias, dynamic batch) computes what the
    module does, in a fresh process that imports torch_ops and loads it"""
    model, _, program = _exported_two_layers(device)
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "m.pt2"))
    xs = [torch.randn(batch, K, device=device) for batch in (3, 1, 9)]
    aoti_package_check(package, xs, [model(xb) for xb in xs])


@pytest.mark.parametrize("act_order", [False, True])
def test_cuda_graph_replay(device, act_order):
    if device != "cuda":
        pytest.skip("CUDA graphs need CUDA")

    def act_order_keys():
        return {"g_idx": act_order_g_idx(device="cuda")} if act_order else {}

    layer = QuantLinear.from_gptq(**random_gptq("cuda"), **act_order_keys(), group_size=G)
    assert (layer.perm is not None) == act_order
    x = torch.randn(2, K, device="cuda", dtype=torch.float16)
    layer(x)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    x.copy_(torch.randn_like(x))
    ptrs = [b.data_ptr() for b in layer.buffers()]
    layer.load_state_dict({**random_gptq("cuda"), **act_order_keys()})  # new weights (and perm)
    assert [b.data_ptr() for b in layer.buffers()] == ptrs  # in the same storage
    graph.replay()
    torch.testing.assert_close(y, layer(x), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- row shards (tensor parallel)
SK, SG = 384, 128  # a layer of 3 groups; shards of 136 / 128 / 120 rows (136, 120: not of SG)
SHARDS = ((0, 136), (136, 264), (264, 384))


def row_shards(gq, g_idx, bias=None):
    """The row-parallel shards of a GPTQ layer: each its rows of qweight and g_idx, with the whole
    layer's scales and qzeros (as vLLM keeps them for act-order); the bias on the first only."""
    return [{"qweight": gq["qweight"][a // 8:b // 8], "qzeros": gq["qzeros"],
             "scales": gq["scales"], "g_idx": g_idx[a:b],
             **({"bias": bias} if bias is not None and i == 0 else {})}
            for i, (a, b) in enumerate(SHARDS)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_row_shards_of_an_act_order_layer_sum_to_the_layer(device, dtype):
    """A tensor-parallel loader builds one QuantLinear per rank from its rows of an act-order layer
    (qweight, g_idx) and the whole scales and qzeros, by from_gptq (num_groups inferred from the
    scales) or QuantLinear(..., num_groups=3).load_state_dict: from_gptq refused K % group_size
    != 0 ("group_size must be -1 or a positive divisor") and scales of the whole layer. The
    shards' outputs sum to the whole layer's; state dicts and exports give the shard's tensors."""
    gq = random_gptq(device, k=SK, g=SG)
    g_idx = act_order_g_idx(k=SK, g=SG, device=device)
    bias = torch.randn(N, device=device, dtype=torch.float16)
    whole = QuantLinear.from_gptq(**gq, g_idx=g_idx, bias=bias, group_size=SG)
    assert not whole.row_shard and whole.num_groups == 3
    x = torch.randn(3, 5, SK, device=device, dtype=dtype)
    total = 0
    for (a, b), shard in zip(SHARDS, row_shards(gq, g_idx, bias)):
        layer = QuantLinear.from_gptq(**shard, group_size=SG)
        assert layer.row_shard and (layer.in_features, layer.num_groups) == (b - a, 3)
        assert layer.act_order and layer.perm is None and not layer.kinterleaved
        assert layer.qweight.shape == ((b - a) // 8, N)
        assert "num_groups=3" in repr(layer) and "num_groups" not in repr(whole)
        loaded = QuantLinear(b - a, N, bias="bias" in shard, group_size=SG, num_groups=3,
                             device=device)
        loaded.load_state_dict(shard)
        y = layer(x[..., a:b])
        assert y.dtype == dtype and y.shape == (3, 5, N)
        assert torch.equal(loaded(x[..., a:b]), y)
        torch.testing.assert_close(y.cpu(), gptq_output(x[..., a:b], shard, shard["g_idx"], SG,
                                                        shard.get("bias")),
                                   rtol=TOL[dtype], atol=TOL[dtype])
        total = total + y.float()
        # what goes out is what came in: the shard's rows, the whole layer's groups
        assert_same(dict(loaded.state_dict()), shard)
        assert_same(layer.to_gptq(), shard)
        assert torch.equal(layer.dequantize(), whole.dequantize()[:, a:b])
        with pytest.raises(ValueError, match=r"to_awq: .* is a row shard of an act-order "
                                             r"layer \(num_groups=3\)"):
            layer.to_awq()
        again = copy.deepcopy(layer)
        assert again.num_groups == 3 and torch.equal(again(x[..., a:b]), y)
        # a skeleton on the meta device takes the shard's tensors as they are (assign=True)
        meta = QuantLinear(b - a, N, bias="bias" in shard, group_size=SG, num_groups=3,
                           device="meta")
        meta.load_state_dict(shard, assign=True)
        assert torch.equal(meta(x[..., a:b]), y)
    assert rel_error(total, whole(x).float()) < 2 * TOL[dtype]


def test_a_row_shard_keeps_a_g_idx_that_looks_plain(device):
    """Rows 0..127 of a layer without act-order, its scales whole: the shard's g_idx (all 0) is
    arange(128) // 128, which a whole layer drops, and act_order_prepack would sort; a shard keeps
    it and passes it to the op, which reads scales as [num_groups, N] only with g_idx."""
    gq = random_gptq(device, k=SK, g=SG)
    plain = (torch.arange(SK, device=device) // SG).to(torch.int32)
    whole = QuantLinear.from_gptq(**gq, g_idx=plain, group_size=SG)
    assert whole.g_idx is None
    shard = dict(gq, qweight=gq["qweight"][:16], g_idx=plain[:128])
    layer = QuantLinear.from_gptq(**shard, group_size=SG)
    assert layer.row_shard and layer.num_groups == 3 and torch.equal(layer.g_idx, plain[:128])
    assert layer.perm is None and not layer.kinterleaved
    x = torch.randn(4, 128, device=device, dtype=torch.float16)
    torch.testing.assert_close(layer(x).cpu(), gptq_output(x, shard, shard["g_idx"], SG),
                               rtol=TOL[x.dtype], atol=TOL[x.dtype])
    torch.testing.assert_close(layer.dequantize(), whole.dequantize()[:, :128])


def test_a_row_shard_not_loaded_yet_runs_and_gives_a_state_dict_that_loads(device):
    """As a whole layer built and not loaded yet (zeros: its output is the bias), a row shard
    runs: its forward and dequantize raised (without g_idx the op reads scales as [K/G, N]: "K =
    136 must be a multiple of group_size"), and its state dict lacked the g_idx that a shard's
    load needs, so one fresh shard's state dict did not load into another."""
    layer = QuantLinear(136, N, group_size=SG, num_groups=3, device=device)
    x = torch.randn(2, 136, device=device, dtype=torch.float16)
    assert torch.equal(layer(x), layer.bias.expand(2, N))
    assert layer.g_idx.shape == (136,) and layer.g_idx.dtype == torch.int32
    assert torch.equal(layer.dequantize(), torch.zeros(N, 136, device=device, dtype=torch.float16))
    other = QuantLinear(136, N, group_size=SG, num_groups=3, device=device)
    other.load_state_dict(layer.state_dict())
    assert_same(dict(other.state_dict()), dict(layer.state_dict()))
    assert_same(layer.to_gptq(), dict(layer.state_dict()))
    # loads copy into the g_idx held (its storage kept, as for the other buffers)
    ptr = layer.g_idx.data_ptr()
    shard = row_shards(random_gptq(device, k=SK, g=SG), act_order_g_idx(k=SK, g=SG, device=device),
                       bias=torch.randn(N, device=device, dtype=torch.float16))[0]
    layer.load_state_dict(shard)
    assert layer.g_idx.data_ptr() == ptr and torch.equal(layer.g_idx, shard["g_idx"])


def test_a_row_shard_skeleton_takes_a_meta_state_dict(device):
    """Meta skeletons pass state dicts between them (assign=True) as plain layers do: a shard's
    g_idx (always kept, never prepacked) has no values to decide anything at load, yet a meta one
    was refused ("its values (act-order or not) are needed"). Materialised, it is checked."""
    skeleton = QuantLinear(136, N, group_size=SG, num_groups=3, device="meta")
    other = QuantLinear(136, N, group_size=SG, num_groups=3, device="meta")
    other.load_state_dict(skeleton.state_dict(), assign=True)
    assert other.g_idx.is_meta and other.g_idx.shape == (136,) and other.row_shard
    gq = random_gptq(device, k=SK, g=SG)
    shard = row_shards(gq, act_order_g_idx(k=SK, g=SG, device=device))[0]
    meta = {k: v.to("meta") for k, v in shard.items()}
    assert QuantLinear.from_gptq(**meta, group_size=SG).g_idx.is_meta
    # a materialised layer still refuses meta tensors without assign, and bad values are checked
    layer = QuantLinear(136, N, bias=False, group_size=SG, num_groups=3, device=device)
    with pytest.raises(RuntimeError, match="g_idx is on the meta device"):
        layer.load_state_dict(meta)
    with pytest.raises(RuntimeError, match=re.escape("g_idx values must lie in [0, 3)")):
        other.load_state_dict(dict(shard, g_idx=shard["g_idx"] + 1, bias=other.bias),
                              assign=True)
    # a whole act-order layer still needs g_idx's values (they decide the prepack)
    whole = QuantLinear(SK, N, bias=False, group_size=SG, device="meta")
    with pytest.raises(RuntimeError, match=re.escape("g_idx is on the meta device: its values")):
        whole.load_state_dict({**{k: v.to("meta") for k, v in gq.items()},
                               "g_idx": torch.zeros(SK, dtype=torch.int32, device="meta")},
                              assign=True)


def test_a_shard_of_all_the_rows_is_the_whole_layer(device):
    """num_groups = K / group_size (a loader that always passes num_groups, at tensor parallelism
    of 1) builds a whole layer: act-order prepacked (perm, as from_gptq builds it), not forward
    through g_idx; its outputs and exports are the whole layer's."""
    gq = random_gptq(device, k=SK, g=SG)
    g_idx = act_order_g_idx(k=SK, g=SG, device=device)
    whole = QuantLinear.from_gptq(**gq, g_idx=g_idx, group_size=SG)
    layer = QuantLinear(SK, N, bias=False, group_size=SG, num_groups=SK // SG, device=device)
    assert not layer.row_shard and "num_groups" not in repr(layer)
    layer.load_state_dict(dict(gq, g_idx=g_idx))
    assert layer.perm is not None and layer.kinterleaved == whole.kinterleaved
    x = torch.randn(5, SK, device=device, dtype=torch.float16)
    assert torch.equal(layer(x), whole(x))
    assert_same(layer.to_gptq(), whole.to_gptq())
    # and a plain layer so declared loads without g_idx, as any whole layer
    plain = QuantLinear(SK, N, bias=False, group_size=SG, num_groups=SK // SG, device=device)
    plain.load_state_dict(gq)
    assert plain.g_idx is None
    assert torch.equal(plain(x), QuantLinear.from_gptq(**gq, group_size=SG)(x))


def test_row_shard_bad_input(device):
    """num_groups below 1 (or with group_size=-1), a shard without g_idx, g_idx values past
    num_groups and an AWQ qweight are refused, each by name: from_gptq and the constructor with
    ValueError, load_state_dict in its report (RuntimeError), naming the key."""
    gq = random_gptq(device, k=SK, g=SG)
    shard = row_shards(gq, act_order_g_idx(k=SK, g=SG, device=device))[0]  # 136 rows
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match=re.escape(
                f"QuantLinear: num_groups (the groups of the whole layer's scales and qzeros, for "
                f"a row shard) must be an int >= 1, got {bad!r}")):
            QuantLinear(136, N, group_size=SG, num_groups=bad)
    with pytest.raises(ValueError, match="num_groups is for a row shard .* group_size=-1"):
        QuantLinear(136, N, group_size=-1, num_groups=1)
    with pytest.raises(ValueError, match="in_features must be a positive multiple of 8"):
        QuantLinear(132, N, group_size=SG, num_groups=3)
    with pytest.raises(ValueError, match=re.escape(
            "QuantLinear: num_groups=1 groups of group_size=128 cover 128 rows, fewer than "
            "in_features=136")):
        QuantLinear(136, N, group_size=SG, num_groups=1)
    # a whole act-order layer given the wrong group_size: its scales' 3 groups of 64 cover fewer
    # rows than its 384, so not a shard (it was built as one): the groups' shapes are refused
    with pytest.raises(ValueError, match=re.escape(
            "from_gptq: qzeros must have shape [6, 16] for in_features=384, out_features=128, "
            "group_size=64; got [3, 16]")):
        QuantLinear.from_gptq(**dict(gq, g_idx=act_order_g_idx(k=SK, g=SG, device=device)),
                              group_size=64)
    # without g_idx, from_gptq reads the tensors as a whole layer, as before
    with pytest.raises(ValueError, match="group_size must be -1 or a positive divisor of in_"):
        QuantLinear.from_gptq(**dict(shard, g_idx=None), group_size=SG)
    with pytest.raises(ValueError, match=re.escape("from_gptq: qzeros must have shape [1, 16]")):
        QuantLinear.from_gptq(**dict(gq, qweight=gq["qweight"][:16]), group_size=SG)
    # g_idx values past the whole layer's groups
    with pytest.raises(ValueError, match=re.escape(
            "from_gptq: g_idx values must lie in [0, 3) (num_groups), got values in [1, 3]")):
        QuantLinear.from_gptq(**dict(shard, g_idx=shard["g_idx"] + 1), group_size=SG)
    # qzeros of other groups than scales': both named (which one is wrong is not known)
    with pytest.raises(ValueError, match=re.escape(
            "from_gptq: scales has 3 rows (groups) and qzeros 2; both must have the whole "
            "layer's number of groups for a row shard of an act-order layer")):
        QuantLinear.from_gptq(**dict(shard, qzeros=shard["qzeros"][:2]), group_size=SG)
    whole = dict(gq, g_idx=act_order_g_idx(k=SK, g=SG, device=device))
    with pytest.raises(ValueError, match=re.escape(
            f"from_gptq: scales has 4 rows (groups) and qzeros 3; both must have in_features / "
            f"group_size = 3 for a whole layer (in_features={SK}, group_size={SG}), or the whole "
            "layer's number of groups for a row shard")):
        QuantLinear.from_gptq(**dict(whole, scales=torch.cat([gq["scales"], gq["scales"][:1]])),
                              group_size=SG)
    # (2 groups of 128 cover fewer rows than 384: not a shard's, the whole layer's scales wrong)
    with pytest.raises(ValueError, match=re.escape(
            f"from_gptq: scales must have shape [3, {N}] for in_features={SK}")):
        QuantLinear.from_gptq(**dict(whole, scales=gq["scales"][:2]), group_size=SG)

    def load(state, prefix="0."):
        model = nn.Sequential(QuantLinear(136, N, bias=False, group_size=SG, num_groups=3,
                                          device=device))
        model.load_state_dict({prefix + k: v for k, v in state.items()})

    with pytest.raises(RuntimeError, match=re.escape(
            "0.g_idx is missing: this QuantLinear (136->128) is a row shard of an act-order layer "
            "(num_groups=3), whose rows cannot be grouped by k // group_size")):
        load({k: v for k, v in shard.items() if k != "g_idx"})
    with pytest.raises(RuntimeError, match=re.escape(
            "0.g_idx values must lie in [0, 3) (num_groups), got values in [2, 4]")):
        load(dict(shard, g_idx=shard["g_idx"] + 2))
    awq = random_awq(device, k=136, g=SG)  # AWQ qweight [136, 16] (its own scales, whole ones)
    for g in ({}, {"g_idx": shard["g_idx"]}):
        with pytest.raises(RuntimeError, match=re.escape(
                "0.qweight has the AWQ layout [K, N/8] = [136, 16], but this QuantLinear (136->128)"
                " is a row shard of an act-order layer (num_groups=3), whose rows are grouped by a "
                "g_idx, which AWQ has not")):
            load(dict(awq, scales=shard["scales"], qzeros=shard["qzeros"], **g))
    result = QuantLinear(136, N, bias=False, group_size=SG, num_groups=3).load_state_dict(
        {}, strict=False)
    assert sorted(result.missing_keys) == ["g_idx", "qweight", "qzeros", "scales"]


# ---------------------------------------------------------------- quantize_model
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 128, bias=False)
        self.lm_head = nn.Linear(128, 36)

    def forward(self, x):
        return self.lm_head(self.down(torch.relu(self.up(x))))


def test_quantize_model(device):
    model = Tiny().to(device)
    reference_model = copy.deepcopy(model)
    assert quantize_model(model, group_size=G) is model
    assert isinstance(model.up, QuantLinear) and isinstance(model.down, QuantLinear)
    assert type(model.lm_head) is nn.Linear  # skipped by name
    x = torch.randn(3, 128, device=device)
    assert rel_error(model(x), reference_model(x)) < 0.15  # two 4-bit layers in a row
    # the same as quantizing each layer by hand
    by_hand = QuantLinear.from_linear(reference_model.up, group_size=G)
    assert torch.equal(model.up.qweight, by_hand.qweight)


def test_quantize_model_refuses_unquantizable_layers_before_changing_anything():
    model = Tiny()
    with pytest.raises(ValueError, match="lm_head.*out_features must be a positive multiple of 8"):
        quantize_model(model, group_size=G, skip=())
    assert type(model.up) is nn.Linear  # untouched
    quantize_model(model, group_size=G, skip=["lm_head", "up"])
    assert type(model.up) is nn.Linear and isinstance(model.down, QuantLinear)


@pytest.mark.parametrize("group_size,error,match", [
    ("128", TypeError, "quantize_model: group_size must be an int, got '128'"),
    (None, TypeError, "quantize_model: group_size must be an int, got None"),
    (0, ValueError, "quantize_model: group_size must be -1 or a positive int, got 0"),
    (-2, ValueError, "quantize_model: group_size must be -1 or a positive int, got -2")])
def test_quantize_model_refuses_a_bad_group_size_by_name(group_size, error, match):
    """A group_size no layer can take is the argument's fault, not the layers': a string or None
    raised TypeError "'<=' not supported between instances of 'str' and 'int'" naming nothing, and
    0 listed every layer as one to add to skip=."""
    model = Tiny()
    with pytest.raises(error, match=re.escape(match)):
        quantize_model(model, group_size=group_size)
    assert type(model.up) is nn.Linear  # untouched


@pytest.mark.parametrize("model", [None, {"up": nn.Linear(128, 128)}], ids=["None", "dict"])
def test_model_that_is_not_a_module_is_refused_by_name(tmp_path, model):
    """quantize_model, save_quantized and load_quantized of something other than an nn.Module
    (None, a state dict) raised AttributeError "'NoneType' object has no attribute
    'named_modules'", naming neither the function nor the argument."""
    got = type(model).__name__
    for call, name in [(lambda: quantize_model(model, group_size=G), "quantize_model"),
                       (lambda: torch_ops.save_quantized(model, tmp_path / "c"), "save_quantized"),
                       (lambda: torch_ops.load_quantized(model, tmp_path), "load_quantized")]:
        with pytest.raises(TypeError, match=re.escape(f"{name}: model must be an nn.Module, "
                                                      f"got {got}")):
            call()
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("skip,got", [(5, "5 (int)"), (["lm_head", 5], "an entry 5 (int)")])
def test_quantize_model_refuses_a_bad_skip_by_name(skip, got):
    """skip=5 raised TypeError "'int' object is not iterable", a list holding a number
    AttributeError "'int' object has no attribute 'split'", neither naming the argument. A
    generator was used up by the first Linear's name: the later ones were not skipped."""
    model = Tiny()
    with pytest.raises(TypeError, match=re.escape(
            f"quantize_model: skip must be a module name or a list of them, got {got}")):
        quantize_model(model, group_size=G, skip=skip)
    assert type(model.up) is nn.Linear  # untouched
    quantize_model(model, group_size=G, skip=(n for n in ["lm_head"]))  # (36 outputs: must skip)
    assert isinstance(model.up, QuantLinear) and type(model.lm_head) is nn.Linear


def test_quantize_model_keeps_shared_layers_shared():
    shared = nn.Linear(128, 128)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    quantize_model(model, group_size=G)
    assert isinstance(model[0], QuantLinear) and model[0] is model[2]
    # skipped under one of its names: skipped under all (it stays one layer)
    model = nn.Sequential(nn.Sequential(shared), nn.ReLU(), shared)
    with pytest.warns(UserWarning, match="no nn.Linear left to quantize"):
        quantize_model(model, group_size=G, skip=["0.0"])
    assert model[0][0] is shared and model[2] is shared


def test_quantize_model_leaves_attention_out_proj_and_fails_whole():
    """nn.MultiheadAttention reads out_proj.weight itself, and nn.TransformerEncoderLayer the
    weights of linear1 / linear2 (its inference fast path: a quantized encoder failed every
    eval-mode forward with AttributeError 'QuantLinear' object has no attribute 'weight'):
    they stay float, a Linear beside them is quantized"""
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Linear(64, 64)).eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = model(x)
    quantize_model(model, group_size=32)
    for block in model[0].layers:
        assert [type(m) for m in (block.self_attn.out_proj, block.linear1, block.linear2)] == [
            nn.modules.linear.NonDynamicallyQuantizableLinear, nn.Linear, nn.Linear]
    assert isinstance(model[1], QuantLinear)
    with torch.no_grad():
        assert rel_error(model(x), expected) < 0.15  # (the eval fast path runs; 4-bit RTN)
    assert "linear1 of an nn.TransformerEncoderLayer" in torch_ops.module.must_stay_float(
        layer.linear1, torch_ops.module.weights_read_by_parents(layer))
    # nn.TransformerDecoderLayer calls its Linears: quantized
    decoder = nn.TransformerDecoderLayer(64, 4, 128, batch_first=True)
    quantize_model(decoder, group_size=32)
    assert isinstance(decoder.linear1, QuantLinear) and isinstance(decoder.linear2, QuantLinear)
    # a weight not materialised (meta) is refused before any layer is replaced
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64, device="meta"))
    with pytest.raises(ValueError, match="1: the weight is on the meta device"):
        quantize_model(model, group_size=32)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]


def test_quantize_model_leaves_linear_subclasses_with_their_own_forward():
    """A Linear subclass that overrides forward (scales its output here) would lose that as a
    QuantLinear: it stays float; a subclass that does not override forward is quantized."""
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class Tagged(nn.Linear):
        pass
    model = nn.Sequential(Scaled(64, 64), Tagged(64, 64))
    x = torch.randn(3, 64)
    expected = model(x)
    quantize_model(model, group_size=32)
    assert type(model[0]) is Scaled and isinstance(model[1], QuantLinear)
    torch.testing.assert_close(model(x), expected, rtol=0.1, atol=0.1)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_quantize_model_leaves_linears_with_hooks_or_an_instance_forward():
    """A Linear with a hook of its own (one that scales its output; weight_norm's pre-hook, which
    recomputes the weight from weight_g / weight_v) or a forward set on the instance would lose
    that as a QuantLinear, silently (the output was 100x off): it stays float, as a subclass
    with a forward of its own does. A hook-free Linear beside them is quantized."""
    def make():
        model = nn.Sequential(*(nn.Linear(64, 64) for _ in range(5)))
        model[0].register_forward_hook(lambda m, inp, out: out * 100)
        model[1].register_forward_pre_hook(lambda m, inp: (inp[0] * 100,))
        torch.nn.utils.weight_norm(model[2])
        with torch.no_grad():
            model[2].weight_g.mul_(3)  # the weight is recomputed at the next forward
        forward = model[3].forward
        model[3].forward = lambda inp: forward(inp) * 100
        return model

    model = make()
    x = torch.randn(3, 64)
    expected = model(x)
    quantize_model(model, group_size=32)
    assert [type(m) for m in model][:4] == [nn.Linear] * 4 and isinstance(model[4], QuantLinear)
    assert rel_error(model(x), expected) < 0.1
    assert "forward hooks" in torch_ops.module.must_stay_float(make()[0])


def test_quantize_model_scales_dtype():
    """weights whose groups need scales past fp16's range: quantize's message says "pass
    scales_dtype=torch.float32", which quantize_model (and quantize_fused) had no argument for"""
    model = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.mul_(1e7)
    x = torch.randn(2, 64)
    expected = model(x)
    with pytest.raises(ValueError, match=r"scales overflow .* pass scales_dtype=torch.float32"):
        quantize_model(model, group_size=32)
    assert type(model[0]) is nn.Linear
    quantize_model(model, group_size=32, scales_dtype=torch.float32)
    assert model[0].scales.dtype == torch.float32
    assert rel_error(model(x), expected) < 0.15  # (4-bit RTN)
    with pytest.raises(TypeError, match="quantize_model: scales_dtype must be"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), 32, scales_dtype=torch.float64)


def test_float64_linear_quantizes_to_a_working_layer():
    linear = nn.Linear(64, 64, dtype=torch.float64)
    layer = QuantLinear.from_linear(linear, group_size=32)
    x = torch.randn(2, 64, dtype=torch.float16)
    assert layer(x).shape == (2, 64)
    gq = layer.to_gptq()
    with pytest.raises(RuntimeError, match="scales must be float16, bfloat16 or float32"):
        QuantLinear(64, 64, group_size=32).load_state_dict(dict(gq, scales=gq["scales"].double()))


def test_annotations_resolve():
    """typing.get_type_hints (documentation tools, argument parsers built from signatures)
    evaluates the annotations, which the module keeps as strings: every name must exist."""
    import typing

    for f in (QuantLinear.__init__, QuantLinear.from_awq, QuantLinear.from_gptq,
              QuantLinear.from_linear, QuantLinear.to_awq, QuantLinear.to_gptq,
              QuantLinear.dequantize, QuantLinear.forward, quantize_model):
        typing.get_type_hints(f)


def test_loaded_layer_owns_its_tensors():
    """A load copies what it keeps (g_idx, scales of another dtype, bias): a later load into the
    layer, or an in-place change of it, leaves the caller's state dict alone, and the other
    layers loaded from it."""
    sd_a = dict(random_gptq(), scales=torch.rand(K // G, N) + 0.5, g_idx=act_order_g_idx())
    sd_b = dict(random_gptq(), scales=torch.rand(K // G, N) + 0.5, g_idx=act_order_g_idx())
    kept = {k: v.clone() for k, v in sd_a.items()}
    m1, m2 = QuantLinear(K, N, bias=False, group_size=G), QuantLinear(K, N, bias=False, group_size=G)
    m1.load_state_dict(sd_a)
    m2.load_state_dict(sd_a)
    w1 = m1.dequantize()
    m2.load_state_dict(sd_b)
    with torch.no_grad():
        m2.scales.mul_(2)
    assert all(torch.equal(sd_a[k], kept[k]) for k in kept)
    assert torch.equal(m1.dequantize(), w1)
    layer = QuantLinear.from_gptq(**{k: v for k, v in sd_a.items()}, group_size=G)
    layer.load_state_dict(sd_b)
    assert all(torch.equal(sd_a[k], kept[k]) for k in kept)


def test_load_state_dict_runs_pre_hooks_and_loads_subclass_state():
    calls = []
    layer = QuantLinear.from_awq(**random_awq(), group_size=G)
    layer.register_load_state_dict_pre_hook(lambda module, sd, prefix, *rest: calls.append(prefix))
    layer.load_state_dict(layer.state_dict())
    assert calls == [""]

    class LoraQuantLinear(QuantLinear):  # adapters and a parameter of its own
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.lora_a = nn.Linear(K, 4, bias=False)
            self.alpha = nn.Parameter(torch.ones(()))

    src = LoraQuantLinear(K, N, bias=False, group_size=G)
    src.load_state_dict(random_gptq(), strict=False)  # (its adapters stay as built)
    with torch.no_grad():
        src.alpha.fill_(3.0)
    dst = LoraQuantLinear(K, N, bias=False, group_size=G)
    dst.load_state_dict(src.state_dict())
    assert dst.alpha.item() == 3.0 and torch.equal(dst.lora_a.weight, src.lora_a.weight)
    assert torch.equal(dst.dequantize(), src.dequantize())
    with pytest.raises(RuntimeError, match="Missing key.*alpha"):
        dst.load_state_dict({k: v for k, v in src.state_dict().items() if k != "alpha"})
    with pytest.raises(RuntimeError, match="Unexpected key.*beta"):
        dst.load_state_dict({**src.state_dict(), "beta": torch.ones(())})


def test_a_value_that_requires_grad_is_stored_without_its_graph():
    """from_gptq(bias=linear.bias) with an fp32 Parameter beside fp16 scales (copied into another
    dtype), or load_state_dict of Parameters: the buffers were non-leaf tensors of the caller's
    graph (grad_fn ToCopyBackward0), every forward built a graph and deepcopy raised."""
    linear = nn.Linear(K, N)  # fp32 bias, requires grad
    gq = random_gptq()
    layer = QuantLinear.from_gptq(**gq, bias=linear.bias, group_size=G)
    loaded = QuantLinear(K, N, group_size=G)
    loaded.load_state_dict({**gq, "scales": nn.Parameter(gq["scales"].float()),
                            "bias": linear.bias})
    x = torch.randn(2, K, dtype=torch.float16)
    for m in (layer, loaded):
        assert all(b.grad_fn is None and not b.requires_grad for b in m.buffers())
        assert not m(x).requires_grad
        copy.deepcopy(m)  # raised "Only Tensors created explicitly by the user (graph leaves)"
        assert torch.equal(m.bias, linear.bias.detach())


def test_a_load_inside_inference_mode_keeps_normal_tensors():
    """An act-order load inside torch.inference_mode() (as engines load) made the new perm and
    g_idx inference tensors: a later load outside it raised "Inplace update to inference tensor
    outside InferenceMode", and a backward through x "Inference tensors cannot be saved for
    backward". nn.Linear loaded the same way keeps normal tensors; so does QuantLinear now."""
    layer = QuantLinear(K, N, bias=True, group_size=G)
    gq = random_gptq()
    with torch.inference_mode():
        layer.load_state_dict({**gq, "g_idx": act_order_g_idx(), "bias": torch.randn(N)})
    assert layer.perm is not None
    assert not any(b.is_inference() for b in layer.buffers())
    x = torch.randn(2, K, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    g_idx = act_order_g_idx()
    layer.load_state_dict({**gq, "g_idx": g_idx, "bias": torch.zeros(N)})
    x = x.detach()
    torch.testing.assert_close(layer(x), gptq_output(x, gq, g_idx, bias=torch.zeros(N)),
                               rtol=1e-4, atol=1e-4)


def test_a_meta_state_dict_into_a_materialised_layer_is_refused_by_name():
    """A skeleton's (meta) state dict loaded into a layer on the CPU without assign: copy_ raised
    NotImplementedError "Cannot copy out of meta tensor; no data!", naming no key and escaping
    load_state_dict's report. Now a RuntimeError names the key; the layer is unchanged."""
    for sd in (random_gptq(), random_awq(), {**random_gptq(), "bias": torch.zeros(N)}):
        model = nn.Sequential(QuantLinear.from_gptq(**random_gptq(), group_size=G,
                                                    bias=torch.ones(N, dtype=torch.float16)))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        meta = {f"0.{k}": v.to("meta") for k, v in sd.items()}
        with pytest.raises(RuntimeError, match=re.escape("0.qweight is on the meta device")):
            model.load_state_dict(meta, strict=False)
        assert_same(dict(model.state_dict()), before)
    layer = QuantLinear.from_gptq(**random_gptq(), group_size=G, bias=torch.ones(N))
    with pytest.raises(RuntimeError, match="bias is on the meta device"):
        layer.load_state_dict({"bias": torch.zeros(N, device="meta")}, strict=False)
    # with assign=True, or into a meta layer, meta tensors load as they are
    layer.load_state_dict({k: v.to("meta") for k, v in layer.state_dict().items()}, assign=True)
    assert layer.qweight.is_meta and layer.bias.is_meta


def test_quantize_model_keeps_the_train_eval_mode():
    """A model put in eval() and then quantized held its QuantLinears in training mode (a new
    module's default): model.training read False while its layers read True."""
    for train in (False, True):
        model = Tiny().train(train)
        quantize_model(model, group_size=G)
        assert [m.training for m in model.modules()] == [train] * 4


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as GPT-2 uses it: a Linear with weight [K, N]."""
    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(
            *x.shape[:-1], self.nf)


class FusedExperts(nn.Module):
    """Experts held in 3-D parameters as transformers 5 holds them, without its act_fn and forward
    (so not computed by UnfusedExperts: tests/test_experts.py has those)."""
    def __init__(self, experts=4, hidden=64, inter=128):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inter))


def test_quantize_model_warns_of_weight_matrices_it_leaves_float():
    """GPT-2's projections (transformers' Conv1D, not nn.Linear) were left float and the model
    came back unchanged without a word (save_quantized then said only "the model has no
    QuantLinear layer"); transformers 5's fused MoE experts (3-D parameters, most of an MoE's
    weights) stayed float just as silently beside the quantized attention. Both are warned of
    by name; embeddings, convolutions, 2-D router weights and what skip= names are not."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(192, 64)
            self.c_proj = Conv1D(64, 64)

    gpt2 = nn.ModuleDict({"wte": nn.Embedding(256, 64), "h": nn.ModuleList([Block(), Block()]),
                          "lm_head": nn.Linear(64, 256, bias=False)})
    with pytest.warns(UserWarning, match=r"quantize_model: 4 module\(s\) holding weight matrices "
                      r"are not nn.Linear layers and stay float .*h\.0\.c_attn \(Conv1D: weight\).*"
                      r"nothing was quantized"):
        quantize_model(gpt2, group_size=32)
    assert type(gpt2.lm_head) is nn.Linear and type(gpt2.h[0].c_attn) is Conv1D

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 64))  # 2-D: stays float, unnamed

    class Moe(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(64, 64)
            self.gate = Router()
            self.experts = FusedExperts()
            self.conv = nn.Conv1d(64, 64, 3)

    model = nn.Sequential(Moe(), Moe())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(model, group_size=32)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert ("2 module(s)" in messages[0] and "0.experts (FusedExperts: gate_up_proj, down_proj; "
            "no act_fn); 1.experts (FusedExperts" in messages[0] and "gate" not in messages[0].replace(
                "gate_up", "") and "conv" not in messages[0] and "nothing" not in messages[0])
    assert isinstance(model[0].q_proj, QuantLinear)
    # named in skip=: no warning; a second call finds nothing left to quantize and says so
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(nn.Sequential(Moe()), group_size=32, skip=["lm_head", "experts"])
    with pytest.warns(UserWarning, match="no nn.Linear left to quantize"):
        quantize_model(model, group_size=32, skip=["experts"])


def test_quantize_model_keeps_moe_routers_float():
    """MoE routers held as nn.Linear (transformers 5's JetMoE and DBRX ``router.layer``, Mixtral's
    ``gate`` before transformers 5, Hunyuan's ``wg``, Qwen-MoE's ``shared_expert_gate``) were
    quantized (the last session warned), where GPTQ and AWQ tools keep them float and vLLM loads
    them float; Qwen-MoE's Linear(H, 1) shared_expert_gate made the whole call fail. They stay
    float now, silently; ``routers=True`` quantizes those that can be; a ``gate_proj`` is no
    router, and a bad ``routers`` is refused by name."""
    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(64, 8, bias=False)

    class Block(nn.Module):
        def __init__(self, shared_gate):
            super().__init__()
            self.router = Router()
            self.gate = nn.Linear(64, 8, bias=False)
            self.wg = nn.Linear(64, 16, bias=False)
            self.gate_proj = nn.Linear(64, 128)
            self.shared_expert_gate = nn.Linear(64, 1 if shared_gate else 8)

    routers = ("router.layer", "gate", "wg", "shared_expert_gate")
    model = nn.ModuleList([Block(True), Block(True)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(model, group_size=32)
    for block in model:
        assert all(type(block.get_submodule(n)) is nn.Linear for n in routers)
        assert isinstance(block.gate_proj, QuantLinear)
    model = nn.ModuleList([Block(False), Block(False)])
    quantize_model(model, group_size=32, routers=True)
    assert all(isinstance(b.get_submodule(n), QuantLinear) for b in model for n in routers)
    with pytest.raises(TypeError, match=r"quantize_model: routers must be True or False, got "
                                        r"'no' \(str\)"):
        quantize_model(nn.ModuleList([Block(False)]), group_size=32, routers="no")
    with pytest.warns(UserWarning, match="no nn.Linear left to quantize .outside skip=, not a "
                                         "router"):
        quantize_model(nn.ModuleDict({"gate": nn.Linear(64, 8)}), group_size=32, skip=())

    # routers=True where some cannot be: a Linear(H, 1) gate (Qwen2-MoE's shared_expert_gate
    # refused the whole call) and a router that is a module of its own (transformers 5's
    # Qwen3MoeTopKRouter...: left float without a word) stay float, named in a warning
    class TopKRouter(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 64))

    model = nn.ModuleList([Block(True), Block(False)])
    model[1].gate = TopKRouter()
    with pytest.warns(UserWarning, match=r"routers=True, but 2 router\(s\) stay float: "
                      r"0.shared_expert_gate: .*multiple of 8; 1.gate: a TopKRouter, not an "
                      r"nn.Linear$") as record:
        quantize_model(model, group_size=32, routers=True)
    assert len(record) == 1 and record[0].filename == __file__
    assert type(model[0].shared_expert_gate) is nn.Linear and type(model[1].gate) is TopKRouter
    assert isinstance(model[0].gate, QuantLinear) and isinstance(model[1].shared_expert_gate, QuantLinear)


def test_built_under_fake_tensor_mode():
    """Under FakeTensorMode (shapes only, no values) from_linear built nothing: it read the g_idx
    quantize returns (always arange(K) // group_size) and raised torch's
    DataDependentOutputException naming nothing. It builds the real layer's shapes now; a g_idx,
    whose values decide act-order, is refused by name, as on the meta device"""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    torch.manual_seed(0)
    linear = nn.Linear(K, N)
    real = QuantLinear.from_linear(linear, group_size=G)
    gq = random_gptq()
    real_gptq = QuantLinear.from_gptq(**gq, group_size=G)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = QuantLinear.from_linear(linear, group_size=G)
        want = {k: (t.shape, t.dtype) for k, t in real.state_dict().items()}
        assert {k: (t.shape, t.dtype) for k, t in fake.state_dict().items()} == want
        assert all(isinstance(t, FakeTensor) for t in fake.state_dict().values())
        y = fake(torch.randn(3, K))
        assert isinstance(y, FakeTensor) and y.shape == (3, N)
        faked = {k: mode.from_tensor(t) for k, t in gq.items()}
        assert QuantLinear.from_gptq(**faked, group_size=G).qweight.shape == real_gptq.qweight.shape
        g_idx = mode.from_tensor(torch.arange(K, dtype=torch.int32) // G)
        with pytest.raises(ValueError, match=re.escape(
                "from_gptq: g_idx is a fake tensor (FakeTensorMode): its values (act-order or "
                "not) are needed to load it")):
            QuantLinear.from_gptq(**faked, g_idx=g_idx, group_size=G)


def test_a_bias_or_scales_made_a_parameter_stays_one_through_loads():
    """A bias made an nn.Parameter to train it (BitFit), or scales learned through dequantize:
    load_state_dict with assign=True, or of a value in another dtype, raised TypeError "cannot
    assign 'torch.HalfTensor' as parameter 'bias'", naming no key, outside load_state_dict's
    report (scales: after qweight and qzeros were loaded). As under nn.Module's loader, a load
    copies into the Parameter in place, in its dtype (an optimizer holds it); assign=True puts a
    Parameter of the value in its place, requiring grad as the old one did."""
    sd = QuantLinear.from_gptq(**random_gptq(), bias=torch.randn(N, dtype=torch.float16),
                               group_size=G).state_dict()
    for name in ("bias", "scales"):
        for dtype in (torch.float16, torch.float32):
            layer = QuantLinear.from_gptq(**random_gptq(), bias=torch.zeros(N), group_size=G)
            setattr(layer, name, nn.Parameter(getattr(layer, name).float()))
            param = getattr(layer, name)
            layer.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                   for k, v in sd.items()})
            assert getattr(layer, name) is param and param.dtype == torch.float32
            assert torch.equal(param.detach(), sd[name].float())
            assert torch.equal(layer.state_dict()["qweight"], sd["qweight"])
            layer.load_state_dict(sd, assign=True)
            now = getattr(layer, name)
            assert isinstance(now, nn.Parameter) and now.requires_grad
            assert torch.equal(now.detach(), sd[name])
            layer(torch.randn(2, K, dtype=torch.float16)).float().sum().backward()


def test_a_parameter_bias_or_scales_is_read_in_eager_and_compiled_forward():
    """forward reads its tensors from the buffer dict (host time); a bias or scales made an
    nn.Parameter leaves that dict, and must still be the one the product reads, in eager mode
    and in a fullgraph compile (the bias with its gradient; w4a16_linear gives scales none)."""
    for name in ("bias", "scales"):
        layer = QuantLinear.from_gptq(**random_gptq(), bias=torch.zeros(N), group_size=G)
        x = torch.randn(3, K, dtype=torch.float16)
        setattr(layer, name, nn.Parameter(getattr(layer, name).float() * 2 + (name == "bias")))
        assert name not in layer._buffers
        w = layer.dequantize().float()
        expected = x.float() @ w.t() + layer.bias.detach().float()
        torch._dynamo.reset()
        try:
            compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
            for run in (layer, compiled):
                getattr(layer, name).grad = None
                y = run(x)
                torch.testing.assert_close(y.float(), expected, rtol=2e-3, atol=2e-3)
                y.float().sum().backward()
                assert (getattr(layer, name).grad is not None) == (name == "bias")
        finally:
            torch._dynamo.reset()


def test_a_layer_pickled_before_its_newer_attributes_existed_loads(tmp_path):
    """A QuantLinear saved whole (torch.save(model)) before kinterleave and num_groups existed
    has neither in its __dict__: its next load_state_dict raised AttributeError "'QuantLinear'
    object has no attribute 'kinterleave'". It now runs, exports and loads as a layer built with
    the defaults (k-interleaved where it can be)."""
    gq = random_gptq()
    old = QuantLinear(K, N, bias=False, group_size=G, kinterleave=False)
    old.load_state_dict(gq)
    del old.__dict__["kinterleave"], old.__dict__["_num_groups"]  # (as pickled then)
    torch.save(old, tmp_path / "old.pt")
    layer = torch.load(tmp_path / "old.pt", weights_only=False)
    x = torch.randn(2, K, dtype=torch.float16)
    torch.testing.assert_close(layer(x), gptq_output(x, gq, None), rtol=2e-3, atol=2e-3)
    new = random_gptq()
    layer.load_state_dict(new)
    assert layer.kinterleaved and not layer.row_shard
    assert_same(layer.state_dict(), new)
    torch.testing.assert_close(layer(x), gptq_output(x, new, None), rtol=2e-3, atol=2e-3)


def test_a_parametrized_scales_or_bias_loads_its_own_state_dict():
    """scales (learned: scales * exp(log_alpha)) or bias under torch.nn.utils.parametrize: the
    layer's state dict holds "parametrizations.scales.original" in place of "scales", which the
    parametrization loads; loading it back into a layer parametrized alike raised "qweight, qzeros
    and scales load together ...; got qweight, qzeros". A plain "scales" given is unexpected (as
    nn.Module reports a parametrized Linear's "weight"), the original missing."""
    import torch.nn.utils.parametrize as P

    class Learned(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.log_alpha = nn.Parameter(torch.zeros(shape))

        def forward(self, s):
            return s * self.log_alpha.exp().to(s.dtype)

    def make(gq, g_idx):
        layer = QuantLinear.from_gptq(**gq, g_idx=g_idx, bias=torch.randn(N, dtype=torch.float16),
                                      group_size=G)
        P.register_parametrization(layer, "scales", Learned((K // G, N)))
        P.register_parametrization(layer, "bias", Learned((N,)))
        return layer

    x = torch.randn(3, K, dtype=torch.float16)
    for g_idx in (None, act_order_g_idx()):
        src = make(random_gptq(), g_idx)
        with torch.no_grad():
            src.parametrizations.scales[0].log_alpha.normal_(0, 0.1)
            src.parametrizations.bias[0].log_alpha.normal_(0, 0.1)
        dst = make(random_gptq(), None)
        assert dst.load_state_dict(src.state_dict()) is not None
        assert torch.equal(dst(x), src(x))
        assert torch.equal(dst.scales, src.scales) and torch.equal(dst.bias, src.bias)
    plain = QuantLinear.from_gptq(**random_gptq(), bias=torch.zeros(N, dtype=torch.float16),
                                  group_size=G).state_dict()
    result = dst.load_state_dict(plain, strict=False)
    assert sorted(result.unexpected_keys) == ["bias", "scales"]
    assert {"parametrizations.bias.original", "parametrizations.scales.original"} <= set(
        result.missing_keys) and "scales" not in result.missing_keys


def test_save_quantized_refuses_float64_scales_of_model_double(tmp_path):
    """model.double() turns a QuantLinear's scales and bias float64, as every module's floats:
    save_quantized wrote them so, a folder that load_quantized then refused ("0.scales is F64
    [4, 128], expected F16/BF16/F32"). Refused by name before anything is written; the model
    converted back saves and loads."""
    torch.manual_seed(0)
    model = quantize_model(Tiny(), group_size=G).double()
    for fmt in ("gptq", "awq"):
        with pytest.raises(ValueError, match=re.escape(
                "save_quantized: up.scales (torch.float64), up.bias (torch.float64), "
                "down.scales (torch.float64)")):
            torch_ops.save_quantized(model, tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()
    model.float()
    torch_ops.save_quantized(model, tmp_path / "gptq", "gptq")
    loaded = torch_ops.load_quantized(Tiny(), tmp_path / "gptq")
    x = torch.randn(2, 128)
    torch.testing.assert_close(loaded.float()(x), model(x))


def test_messages_name_the_first_few():
    """Long lists in messages (layers left float, tensors left on meta...) name the first few and
    count the rest, in one helper."""
    from torch_ops import _ops
    assert _ops._first_few("abcdefg") == "a, b, c, d, e (and 2 more)"
    assert _ops._first_few(["x (Conv1D)", "y"], 4, "; ") == "x (Conv1D); y"
    assert _ops._first_few([]) == ""
