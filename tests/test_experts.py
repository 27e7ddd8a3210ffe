"""MoE experts held fused, as transformers 5 holds them (3-D gate_up_proj and down_proj), quantized
and loaded as UnfusedExperts: one QuantLinear per expert and projection, under the per-expert
keys GPTQ and AWQ checkpoints hold."""
import warnings

import pytest
import torch
from torch import nn

import torch_ops
from torch_ops import QuantLinear, UnfusedExperts, load_quantized, quantize_model, save_quantized
from torch_ops import reference as ref
from torch_ops.checkpoint import CheckpointError
from torch_ops.module import EXPERT_NAMES, fused_experts_layout


def _default_apply_gate(self, gate_up_out):  # (transformers.integrations.moe's, by name)
    gate, up = gate_up_out.chunk(2, dim=-1)
    return self.act_fn(gate) * up


class Experts(nn.Module):
    """transformers 5's fused experts (MixtralExperts, Qwen2MoeExperts... as
    ``use_experts_implementation`` decorates them): its attributes, its eager forward
    (torch_ops.reference.fused_experts)."""
    _apply_gate = _default_apply_gate

    def __init__(self, E=4, H=64, I=96, transposed=False, dtype=torch.float32):
        super().__init__()
        self.num_experts = E
        self.has_gate, self.has_bias, self.is_concatenated = True, False, True
        self.has_post_expert_norm, self.is_transposed = False, transposed
        self.gate_up_proj = nn.Parameter(0.1 * (torch.randn(E, H, 2 * I, dtype=dtype) if transposed
                                                else torch.randn(E, 2 * I, H, dtype=dtype)))
        self.down_proj = nn.Parameter(0.1 * (torch.randn(E, I, H, dtype=dtype) if transposed
                                             else torch.randn(E, H, I, dtype=dtype)))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return ref.fused_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj,
                                 self.down_proj, self.act_fn, self.is_transposed)


def _dequantized_like(unfused: UnfusedExperts, fused: Experts) -> Experts:
    """A fused module holding the dequantized weights of ``unfused``: its float reference."""
    first = getattr(unfused[0], unfused[0].names[0])
    ref = Experts(len(unfused), first.in_features, first.out_features, fused.is_transposed)
    with torch.no_grad():
        for e in range(len(unfused)):
            names = unfused[e].names
            gate, up, down = (getattr(unfused[e], n).dequantize().float() for n in names)
            gate_up = torch.cat([gate, up])
            ref.gate_up_proj[e] = gate_up.t() if fused.is_transposed else gate_up
            ref.down_proj[e] = down.t() if fused.is_transposed else down
    return ref


class Block(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.q_proj = nn.Linear(64, 64)
        self.experts = Experts(**kw)

    def forward(self, x, index, weights):
        return self.experts(self.q_proj(x), index, weights)


def _close(got, want, tol):
    """Relative error in norm (the op rounds the dequantized weights to the scales' fp16)."""
    assert got.shape == want.shape and ((got.float() - want.float()).norm() / want.float().norm()) < tol


def _routing(T=10, E=4, k=2):
    return torch.randn(T, 64), torch.randint(0, E, (T, k)), torch.rand(T, k)


@pytest.mark.parametrize("transposed", [False, True])
def test_quantize_model_unfuses_fused_experts(transposed):
    """quantize_model left transformers 5's fused experts (most of an MoE's weights) float, with
    a warning. They become an UnfusedExperts of QuantLinear layers, per-expert keys, whose
    forward is the fused module's over the dequantized weights (every expert a token routes to,
    weighted; the padding index E skipped)."""
    fused = Experts(transposed=transposed)
    model = nn.ModuleDict({"experts": fused})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(model, group_size=32)
    unfused = model.experts
    assert type(unfused) is UnfusedExperts and len(unfused) == 4
    keys = list(model.state_dict())
    assert keys[:3] == ["experts.0.gate_proj.qweight", "experts.0.gate_proj.qzeros",
                        "experts.0.gate_proj.scales"]
    assert {k.rsplit(".", 1)[0] for k in keys} == {
        f"experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")}
    assert [unfused[0].gate_proj.in_features, unfused[0].gate_proj.out_features,
            unfused[0].down_proj.in_features, unfused[0].down_proj.out_features] == [64, 96, 96, 64]
    ref = _dequantized_like(unfused, fused)
    x, index, weights = _routing()
    index[0, 1] = 4  # transformers' padding index (E): no expert
    got, want = unfused(x, index, weights), ref(x, index, weights)
    _close(got, want, 2e-3)
    # the quantized weights are the fused ones, rounded (not another expert's, not gate for up)
    err = (got - fused(x, index, weights)).norm() / fused(x, index, weights).norm()
    assert err < 0.3
    # 3-D hidden states and their routing, bf16
    x3 = x.reshape(2, 5, 64).bfloat16()
    out = unfused(x3, index.reshape(2, 5, 2), weights.reshape(2, 5, 2).bfloat16())
    assert out.shape == x3.shape and out.dtype == torch.bfloat16
    _close(out.reshape(10, 64), want, 2e-2)


def test_unfused_experts_empty_batch_one_expert_per_token_and_repr():
    """An empty batch (no -1 to infer k from: reshape raised), k = 1 with int32 indices and a
    negative padding index; the repr prints a run of alike experts once, as nn.ModuleList does
    (128 experts printed 640 lines per block)."""
    unfused = UnfusedExperts.quantize_fused(Experts(), group_size=32)
    out = unfused(torch.randn(0, 64), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, 64)
    x = torch.randn(3, 64)
    out = unfused(x, torch.tensor([[1], [-1], [2]], dtype=torch.int32), torch.ones(3, 1))
    assert torch.equal(out[1], torch.zeros(64))
    torch.testing.assert_close(out[2], unfused[2](x[2:], unfused.act_fn)[0], rtol=1e-6, atol=1e-6)
    text = repr(unfused)
    assert "(0-3): 4 x _Expert(" in text and text.count("QuantLinear(") == 3 and "(act_fn): SiLU()" in text
    unfused[2].gate_proj.bias = torch.zeros(96, dtype=torch.float16)
    assert "(0-1): 2 x _Expert(" in repr(unfused) and "  (2): _Expert(" in repr(unfused)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_unfused_experts_compile_with_fullgraph(backend):
    """torch.compile(fullgraph=True): the per-expert counts are sizes known only when the graph
    runs, and the forward branched on them ("Could not guard on data-dependent expression 64*u1
    + 64*u2 + ... <= 4194304": a quantized MoE model no longer compiled where the float one
    did). Compiled: every expert runs on its run of rows, however short; the same outputs
    (Inductor's bf16 rounds its fused pointwise products once, in fp32)"""
    unfused = UnfusedExperts.quantize_fused(Experts(), group_size=32)
    torch._dynamo.reset()
    f = torch.compile(lambda x, i, w: unfused(x, i, w), fullgraph=True, backend=backend)
    for T in (1, 5, 16, 0):
        for dtype in (torch.float32, torch.bfloat16):
            x, i, w = torch.randn(T, 64, dtype=dtype), torch.randint(0, 4, (T, 2)), torch.rand(T, 2)
            if T:
                i[0, 1] = 4  # (the padding index)
                i[-1] = 3  # (one expert twice)
            got, want = f(x, i, w), unfused(x, i, w)
            if backend == "aot_eager" or dtype == torch.float32:
                assert torch.equal(got, want), (T, dtype)
            else:
                torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()


def test_unfused_experts_refuse_weights_that_do_not_match_the_index():
    """top_k_weights wider than top_k_index: reshaped by its own width, weights of other tokens
    and slots were read at the index's flat positions (relative error 0.8, no error); refused.
    Leading shapes may differ ([B, S, k] beside [B * S, k])"""
    unfused = UnfusedExperts.quantize_fused(Experts(), group_size=32)
    x, index = torch.randn(5, 64), torch.randint(0, 4, (5, 2))
    with pytest.raises(ValueError, match=r"top_k_weights must hold a weight per entry of "
                                         r"top_k_index .* got shapes \[5, 3\] and \[5, 2\]"):
        unfused(x, index, torch.rand(5, 3))
    with pytest.raises(ValueError, match="got shapes \\[10\\] and \\[5, 2\\]"):
        unfused(x, index, torch.rand(10))
    w = torch.rand(5, 2)
    torch.testing.assert_close(unfused(x.view(1, 5, 64), index.view(1, 5, 2), w).view(5, 64),
                               unfused(x, index, w), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unfused_experts_on_device_and_grad_of_x(device, dtype):
    """On each device (moved there with .to()), fp32 and fp16 hidden states; and LoRA-style
    training over a quantized MoE: the gradient reaches the hidden states through every expert
    a token is routed to."""
    fused = Experts()
    unfused = UnfusedExperts.quantize_fused(fused, group_size=32).to(device)
    ref = _dequantized_like(unfused.cpu(), fused)
    unfused.to(device)
    x, index, weights = _routing(T=33, k=3)
    xa = x.to(device, dtype, copy=True).requires_grad_()
    xb = x.clone().requires_grad_()
    out = unfused(xa, index.to(device), weights.to(device, dtype))
    want = ref(xb, index, weights)
    assert out.device.type == device and out.dtype == dtype
    tol = 2e-3 if dtype == torch.float32 else 5e-3
    _close(out.cpu(), want, tol)
    out.float().square().sum().backward()
    want.square().sum().backward()
    _close(xa.grad.cpu(), xb.grad, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unfused_experts_batched_and_expert_by_expert_give_the_same_bits(device, dtype, monkeypatch):
    """Few routed rows are gathered and weighted in one piece, many expert by expert (bounded
    temporaries); both add in expert order, so the output is the same to the bit whichever the
    size picks (the gradient of x up to rounding: its k parts are added in another order);
    padding indices included, and on the CPU a token routed to one expert twice (on CUDA the
    two adds of such a token meet in one index_add_, in the order its atomics land: routers
    never pick an expert twice, and on CUDA the test's routing does not either)."""
    import torch_ops.module as module
    unfused = UnfusedExperts.quantize_fused(Experts(E=5), group_size=32).to(device)
    x, index, weights = _routing(T=41, E=5, k=3)
    if device == "cpu":
        index[0] = torch.tensor([2, 2, 4])
    else:
        index = torch.rand(41, 5).argsort(-1)[:, :3]
    index[1, 0] = -1
    index[2, 1] = 5  # (transformers' padding index: E)
    results = []
    # (the last: the batched path adding expert by expert, as on CUDA, here on any device)
    for limit, one_add in ((module._EXPERTS_BATCHED_ELEMENTS, ("cpu",)), (0, ("cpu",)),
                           (module._EXPERTS_BATCHED_ELEMENTS, ())):
        monkeypatch.setattr(module, "_EXPERTS_BATCHED_ELEMENTS", limit)
        monkeypatch.setattr(module, "_ONE_INDEX_ADD", one_add)
        xa = x.to(device, dtype, copy=True).requires_grad_()
        out = unfused(xa, index.to(device), weights.to(device, dtype))
        out.float().square().sum().backward()
        results.append((out, xa.grad))
    for out, grad in results[1:]:
        assert torch.equal(results[0][0], out)
        _close(results[0][1].cpu(), grad.cpu(), 1e-6 if dtype == torch.float32 else 2e-3)
    assert not torch.equal(results[0][0][0], torch.zeros_like(results[0][0][0]))


def test_fused_experts_it_cannot_take_stay_float_and_say_why():
    """gpt-oss's experts (biases, interleaved gate and up rows, a gate of its own) and modules
    that only look like experts are not computed by UnfusedExperts: quantize_model leaves them
    float and its warning says why; quantize_fused refuses them. So are experts with hooks of
    their own or a forward set on the instance (quantize_model replaced them, the hooks never
    ran again), as such Linears are."""
    def variant(change):
        m = Experts()
        change(m)
        return m

    biased = variant(lambda m: m.register_parameter("gate_up_proj_bias", nn.Parameter(torch.zeros(4, 192))))
    interleaved = variant(lambda m: setattr(m, "is_concatenated", False))
    gated = variant(lambda m: setattr(m, "_apply_gate", None))

    class OwnGate(Experts):
        def _apply_gate(self, gate_up_out):
            return gate_up_out[..., ::2].clamp(max=7) * gate_up_out[..., 1::2]

    class OtherForward(Experts):
        def forward(self, hidden_states, router_indices=None, routing_weights=None):
            return hidden_states

    cases = {"biased": (biased, "parameters besides gate_up_proj and down_proj: gate_up_proj_bias"),
             "interleaved": (interleaved, "is_concatenated=False"),
             "own_gate": (OwnGate(), "a gating function of its own"),
             "other_forward": (OtherForward(), "a forward other than forward(hidden_states, "
                                               "top_k_index, top_k_weights)")}
    hooked = variant(lambda m: m.register_forward_hook(lambda *a: None))
    replaced = variant(lambda m: setattr(m, "forward", lambda *a: a[0]))  # (accelerate's dispatch)
    cases.update({"hooked": (hooked, "a module with forward hooks, which UnfusedExperts would "
                                     "drop"),
                  "instance_forward": (replaced, "a module whose forward is replaced on the "
                                                 "instance")})
    assert isinstance(fused_experts_layout(gated), tuple)  # (an instance attribute: the class's)
    assert fused_experts_layout(nn.Linear(8, 8)) is None
    for name, (m, why) in cases.items():
        assert fused_experts_layout(m).startswith(why), name
        with pytest.raises(ValueError, match="not a fused experts module UnfusedExperts can take"):
            UnfusedExperts.quantize_fused(m, group_size=32)
        model = nn.ModuleDict({"q_proj": nn.Linear(64, 64), "experts": m})
        with pytest.warns(UserWarning, match=rf"1 module\(s\) holding weight matrices .*experts "
                          rf"\({type(m).__name__}: gate_up_proj, down_proj.*; {why[:20]}"):
            quantize_model(model, group_size=32)
        assert model.experts is m and type(model.q_proj) is QuantLinear


def test_unfused_experts_is_a_sequence_of_experts():
    """len, indexing from either end, iteration and `in`, as nn.ModuleList's: __getitem__ raised
    KeyError past the end, so list(experts), a for loop and `in` failed"""
    unfused = UnfusedExperts.quantize_fused(Experts(), group_size=32)
    experts = list(unfused)
    assert len(experts) == len(unfused) == 4 and experts[1] is unfused[1] is unfused[-3]
    assert [e for e in unfused] == experts and unfused[3] in unfused and nn.ReLU() not in unfused
    for i in (4, -5):
        with pytest.raises(IndexError, match=f"expert index {i} is out of range for 4 experts"):
            unfused[i]


def test_load_refuses_per_expert_checkpoint_for_hooked_fused_experts(tmp_path):
    """A checkpoint quantizing experts one by one, loaded into a model whose fused experts have
    a hook of their own: refused by name (the UnfusedExperts put in their place dropped the hook
    silently), the model left as it was"""
    source = Block()
    quantize_model(source, group_size=32)
    save_quantized(source, tmp_path / "c", "gptq")
    model = Block()
    calls = []
    model.experts.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(CheckpointError, match=r"experts: the checkpoint quantizes this MoE block's "
                       r"experts one by one .*a module with forward hooks"):
        load_quantized(model, tmp_path / "c")
    assert type(model.experts) is Experts and type(model.q_proj) is nn.Linear
    model(*_routing())
    assert calls == [1]


def test_quantize_model_checks_experts_before_changing_anything():
    """Experts whose intermediate size is no multiple of the group, or on meta, are named among
    the layers quantize_model cannot quantize, before any layer is replaced; skip= leaves them."""
    model = nn.ModuleDict({"q_proj": nn.Linear(64, 64), "experts": Experts(I=40)})
    with pytest.raises(ValueError, match=r"cannot quantize these layers .*experts \(down "
                       r"projections\).*in_features=40"):
        quantize_model(model, group_size=32)
    assert type(model.q_proj) is nn.Linear and type(model.experts) is Experts
    with torch.device("meta"):
        meta = nn.ModuleDict({"experts": Experts()})
    with pytest.raises(ValueError, match="experts: the weights are on the meta device"):
        quantize_model(meta, group_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(model, group_size=32, skip=["experts"])
    assert type(model.experts) is Experts and type(model.q_proj) is QuantLinear


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_fused_experts_round_trip_through_a_checkpoint(tmp_path, fmt):
    """A quantized fused-experts model saved (per-expert keys) loads back into a float skeleton
    of the same model, materialised or on meta: its experts become UnfusedExperts, bit-equal."""
    model = nn.ModuleList([Block(), Block(transposed=True)])
    quantize_model(model, group_size=32)
    x, index, weights = _routing()
    want = [b(x, index, weights) for b in model]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (GPTQ sym=false: serving engines warned of)
        save_quantized(model, tmp_path / "c", fmt)
    for device in ("cpu", "meta"):
        with torch.device(device):
            fresh = nn.ModuleList([Block(), Block(transposed=True)])
        load_quantized(fresh, tmp_path / "c")
        assert [type(b.experts) for b in fresh] == [UnfusedExperts] * 2
        for b, w in zip(fresh, want):
            assert torch.equal(b(x, index, weights), w)


def test_per_expert_checkpoint_loads_into_fused_experts(tmp_path):
    """What GPTQ and AWQ tools write (experts one by one: Mixtral's w1 / w3 / w2, with AutoGPTQ's
    zero biases) loads into a model whose experts are fused: each expert computes as the
    per-expert model's (down(act(w1 x) * w3 x)), weighted by the routing."""
    class PerExpert(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(64, 64)
            self.experts = nn.ModuleList(nn.ModuleDict({
                "w1": nn.Linear(64, 96), "w3": nn.Linear(64, 96), "w2": nn.Linear(96, 64)})
                for _ in range(4))

    source = PerExpert()
    quantize_model(source, group_size=32)
    save_quantized(source, tmp_path / "c", "awq")
    model = Block()
    load_quantized(model, tmp_path / "c")
    assert type(model.experts) is UnfusedExperts and model.experts[0].names == ("w1", "w3", "w2")
    assert model.experts[2].w2 is not None and model.experts[2].w2.bias is not None
    x, index, weights = _routing()
    h = source.q_proj(x)
    want = torch.zeros_like(h)
    for t in range(10):
        for k in range(2):
            e = source.experts[int(index[t, k])]
            want[t] += weights[t, k] * e["w2"](nn.functional.silu(e["w1"](h[t])) * e["w3"](h[t]))
    _close(model(x, index, weights), want, 1e-5)


def test_mixtral_checkpoint_block_sparse_moe_loads_into_mlp(tmp_path):
    """Mixtral's GPTQ and AWQ checkpoints hold layers.<i>.block_sparse_moe.{gate, experts.<e>.w1}:
    transformers 5 calls that module mlp (and fuses the experts). Keys under a module the model
    has under the newer name only are read under it; a model that still has block_sparse_moe
    reads them as they are."""
    class OldMoe(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(64, 4, bias=False)
            self.experts = nn.ModuleList(nn.ModuleDict({
                "w1": nn.Linear(64, 96, bias=False), "w3": nn.Linear(64, 96, bias=False),
                "w2": nn.Linear(96, 64, bias=False)}) for _ in range(4))

    class OldLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(64, 64)
            self.block_sparse_moe = OldMoe()

    class NewMoe(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(64, 4, bias=False)
            self.experts = Experts()

    class NewLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(64, 64)
            self.mlp = NewMoe()

    source = nn.ModuleDict({"layers": nn.ModuleList([OldLayer(), OldLayer()])})
    quantize_model(source, group_size=32)
    assert type(source.layers[0].block_sparse_moe.gate) is nn.Linear  # (a router: float)
    save_quantized(source, tmp_path / "c", "awq")
    model = nn.ModuleDict({"layers": nn.ModuleList([NewLayer(), NewLayer()])})
    load_quantized(model, tmp_path / "c")
    for old, new in zip(source.layers, model.layers):
        assert torch.equal(new.mlp.gate.weight, old.block_sparse_moe.gate.weight)
        assert type(new.mlp.experts) is UnfusedExperts
        for e in range(4):
            for p in ("w1", "w3", "w2"):
                assert torch.equal(getattr(new.mlp.experts[e], p).qweight,
                                   old.block_sparse_moe.experts[e][p].qweight)
    again = nn.ModuleDict({"layers": nn.ModuleList([OldLayer(), OldLayer()])})
    load_quantized(again, tmp_path / "c")  # (its own names: nothing renamed)
    assert type(again.layers[1].block_sparse_moe.experts[3]["w2"]) is QuantLinear


def test_expert_names_follow_transformers_conversion_mapping(monkeypatch):
    """A transformers model's experts are named as its checkpoints name them: the per-expert
    weights transformers' conversion mapping fuses for its model_type (w1 / w3 / w2 for Mixtral
    and its kin, gate_proj / up_proj / down_proj for Qwen-MoE's); the common names without
    transformers, for an unknown model type, or for a mapping of another form. (A stand-in for
    transformers.conversion_mapping: CI has no transformers.)"""
    import sys
    import types

    from torch_ops.module import checkpoint_expert_names

    class Convert:
        def __init__(self, sources, target):
            self.source_patterns, self.target_patterns = sources, [target]

    mappings = {
        "mixtral": [Convert([".block_sparse_moe."], ".mlp."),
                    Convert([".experts.*.w1.weight", ".experts.*.w3.weight"], ".experts.gate_up_proj"),
                    Convert([r"\.experts.*.w2.weight"], ".experts.down_proj")],
        "qwen2_moe": [Convert(["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
                              "mlp.experts.gate_up_proj"),
                      Convert(["mlp.experts.*.down_proj.weight"], "mlp.experts.down_proj")],
        "odd": [Convert([".experts.*.wi.weight"], ".experts.gate_up_proj")]}
    conversion = types.ModuleType("transformers.conversion_mapping")
    conversion.get_checkpoint_conversion_mapping = mappings.get
    monkeypatch.setitem(sys.modules, "transformers", types.ModuleType("transformers"))
    monkeypatch.setitem(sys.modules, "transformers.conversion_mapping", conversion)

    def model_of(model_type):
        model = nn.ModuleDict({"layers": nn.ModuleList([Block()])})
        model.config = types.SimpleNamespace(model_type=model_type)
        return model

    for model_type, names in (("mixtral", ("w1", "w3", "w2")), ("qwen2_moe", EXPERT_NAMES[0]),
                              ("odd", EXPERT_NAMES[0]), ("llama", EXPERT_NAMES[0])):
        assert checkpoint_expert_names(model_of(model_type)) == names, model_type
    model = model_of("mixtral")
    quantize_model(model, group_size=32)
    assert model.layers[0].experts[3].names == ("w1", "w3", "w2")
    assert "layers.0.experts.3.w2.qweight" in model.state_dict()
    monkeypatch.delitem(sys.modules, "transformers")
    assert checkpoint_expert_names(model_of("mixtral")) == EXPERT_NAMES[0]


def test_per_expert_checkpoint_that_does_not_fit_leaves_the_model_as_it_was(tmp_path):
    """A checkpoint missing an expert, or of other sizes, is refused by name, and the model keeps
    its fused module (the same object); an experts module UnfusedExperts cannot take is named
    with the reason."""
    source = nn.ModuleList([Block()])
    quantize_model(source, group_size=32)
    save_quantized(source, tmp_path / "c", "awq")
    fewer = nn.ModuleList([Block(E=3)])
    fused = fewer[0].experts
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(\d+\): 0\.experts\.3\.down_proj"):
        load_quantized(fewer, tmp_path / "c")
    assert fewer[0].experts is fused and type(fewer[0].q_proj) is nn.Linear
    wider = nn.ModuleList([Block(I=128)])
    fused = wider[0].experts
    with pytest.raises(CheckpointError, match=r"0\.experts\.0\.gate_proj: the checkpoint holds a "
                       r"64->96 layer, the model a 64->128 one"):
        load_quantized(wider, tmp_path / "c")
    assert wider[0].experts is fused
    # the second of two blocks' experts cannot be unfused: the first is put back too
    source = nn.ModuleList([Block(), Block()])
    quantize_model(source, group_size=32)
    save_quantized(source, tmp_path / "two", "awq")
    two = nn.ModuleList([Block(), Block()])
    two[1].experts.register_parameter("down_proj_bias", nn.Parameter(torch.zeros(4, 64)))
    fused = [b.experts for b in two]
    with pytest.raises(CheckpointError, match=r"1\.experts: the checkpoint quantizes this MoE "
                       r"block's experts one by one \(down_proj, gate_proj, up_proj\).*UnfusedExperts "
                       r"cannot take its place: parameters besides gate_up_proj and down_proj"):
        load_quantized(two, tmp_path / "two")
    assert [b.experts for b in two] == fused


@pytest.mark.parametrize("kind", ["qwen2_moe", "mixtral"])
def test_transformers_moe_models_quantize_save_and_load(tmp_path, kind):
    """Real transformers 5 MoE models (where transformers is installed; CI has none): quantized,
    saved by save_quantized and by save_pretrained, loaded into a fresh model, the same logits.
    Mixtral's experts are named w1 / w3 / w2, as its checkpoints name them (transformers'
    conversion mapping), and save_pretrained and save_quantized write them under
    block_sparse_moe, as AutoGPTQ's Mixtral checkpoints hold them and vLLM reads them
    (save_quantized wrote the names transformers 5 holds in memory, mlp: vLLM refuses them)."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 5 (fused experts) not installed")
    common = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    if kind == "mixtral":
        cfg, cls = transformers.MixtralConfig(num_local_experts=4, **common), \
            transformers.MixtralForCausalLM
    else:
        cfg, cls = transformers.Qwen2MoeConfig(
            moe_intermediate_size=128, shared_expert_intermediate_size=128, num_experts=4,
            num_experts_per_tok=2, **common), transformers.Qwen2MoeForCausalLM
    model = cls(cfg).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    quantize_model(model, group_size=64)
    experts = model.model.layers[0].mlp.experts
    assert type(experts) is UnfusedExperts
    assert experts[0].names == (("w1", "w3", "w2") if kind == "mixtral" else
                                ("gate_proj", "up_proj", "down_proj"))
    assert not isinstance(model.model.layers[0].mlp.gate, QuantLinear)  # (the router: float)
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - ref).norm() / ref.norm() < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_quantized(model, tmp_path / "ours", "awq")
        model.save_pretrained(tmp_path / "theirs")
    from safetensors import safe_open
    keys = {}
    for folder in ("ours", "theirs"):
        with safe_open(str(tmp_path / folder / "model.safetensors"), "pt") as f:
            keys[folder] = set(f.keys())
    assert keys["ours"] == keys["theirs"]  # (AWQ: no g_idx)
    assert (f"model.layers.0.{'block_sparse_moe' if kind == 'mixtral' else 'mlp'}.experts.0."
            f"{experts[0].names[0]}.qweight") in keys["ours"]
    for folder in ("ours", "theirs"):
        fresh = cls(cfg).eval()
        load_quantized(fresh, tmp_path / folder)
        with torch.no_grad():
            assert torch.equal(fresh(ids).logits, logits), folder
