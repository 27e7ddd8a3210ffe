"""Checkpoint folders on disk: load_quantized, convert_checkpoint, inspect_checkpoint.

Checkpoints are written here with safetensors directly from torch_ops.reference tensors (not with
the code under test), and the loaded models are compared with float models holding the
reference-dequantized weights."""
import copy
import hashlib
import json
import os
import re
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import torch_ops
from torch_ops import QuantLinear, convert_checkpoint, inspect_checkpoint, load_quantized
from torch_ops import reference as ref
from torch_ops.checkpoint import CheckpointError, parse_quant_config

G = 64
QUANTIZED = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]


class Block(nn.Module):
    def __init__(self, hidden=128, inner=256):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab=48, hidden=128):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList([Block(hidden), Block(hidden)])
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def act_order_gptq(weight, zero_format, sym):
    """GPTQ tensors with act-order: groups formed over a random column order, rows kept in place."""
    N, K = weight.shape
    perm = torch.randperm(K)
    q = ref.quantize(weight[:, perm], 4, G, sym, "gptq", zero_format)
    rows = ref.unpack(q["qweight"], 4, dim=0)[torch.argsort(perm)]  # back to the original order
    q["qweight"] = ref.pack(rows, 4, dim=0)
    q["g_idx"] = (torch.argsort(perm) // G).to(torch.int32)
    return q


def make_checkpoint(folder, fmt="awq", zero_format="v1", act_order=False, sym=False, shards=1,
                    skip=(), config_extra=None, seed=0):
    """Write a TinyLM checkpoint; returns (float model, oracle model with dequantized weights)."""
    torch.manual_seed(seed)
    model = TinyLM()
    oracle = copy.deepcopy(model)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name in QUANTIZED:
        if name in skip:
            continue
        weight = tensors.pop(f"{name}.weight")
        if fmt == "awq":
            q = ref.quantize(weight, 4, G, sym, "awq")
        elif act_order:
            q = act_order_gptq(weight, zero_format, sym)
        else:
            q = ref.quantize(weight, 4, G, sym, "gptq", zero_format)
        tensors.update({f"{name}.{k}": v for k, v in q.items()})
        deq = ref.dequantize(q["qweight"], q["scales"].float(), q["qzeros"], fmt, 4, G,
                             q.get("g_idx"), zero_format)
        oracle.get_submodule(name).weight.data.copy_(deq)
    if fmt == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True,
              "version": "gemm", "modules_to_not_convert": list(skip) or None}
    else:
        qc = {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": act_order, "sym": sym,
              "checkpoint_format": "gptq_v2" if zero_format == "v2" else "gptq"}
        if skip:
            qc["modules_to_not_convert"] = list(skip)
    folder = Path(folder)
    folder.mkdir(parents=True)
    config = {"model_type": "tiny", "hidden_size": 128, "quantization_config": qc, **(config_extra or {})}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text('{"model": "none"}')
    write_shards(folder, tensors, shards)
    return model, oracle


def write_shards(folder, tensors, shards, assign=None):
    """Save ``tensors`` into ``shards`` files (contiguous runs of sorted keys, or ``assign``:
    key -> shard number), with an index when there is more than one."""
    keys = sorted(tensors)
    if assign is None:
        assign = {k: i * shards // len(keys) for i, k in enumerate(keys)}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    for i, name in enumerate(names):
        save_file({k: tensors[k] for k in keys if assign[k] == i}, str(folder / name),
                  metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {k: names[assign[k]] for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def tree_digest(folder):
    """{relative path: sha256} of every file under ``folder``."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def all_tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def check_logits(model, oracle, device="cpu"):
    ids = torch.randint(0, 48, (2, 7), device=device)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), oracle.to(device)(ids), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- load_quantized
@pytest.mark.parametrize("shards", [1, 3])
def test_load_awq(tmp_path, device, shards):
    _, oracle = make_checkpoint(tmp_path / "awq", "awq", shards=shards)
    model = TinyLM().to(device)
    assert load_quantized(model, tmp_path / "awq") is model
    for name in QUANTIZED:
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.loaded_from == "awq"
        assert layer.qweight.device.type == device
    assert type(model.lm_head) is nn.Linear  # stored as a float weight
    check_logits(model, oracle, device)


@pytest.mark.parametrize("zero_format,act_order,sym", [("v1", False, False), ("v2", False, True),
                                                       ("v1", True, False), ("v2", True, True)])
def test_load_gptq(tmp_path, zero_format, act_order, sym):
    _, oracle = make_checkpoint(tmp_path / "gptq", "gptq", zero_format, act_order, sym, shards=2)
    model = load_quantized(TinyLM(), tmp_path / "gptq")
    layer = model.blocks[1].down
    assert layer.act_order == act_order and layer.checkpoint_zero_format == zero_format
    check_logits(model, oracle)


def test_load_keeps_the_train_eval_mode(tmp_path):
    """A model put in eval() before loading held its new QuantLinears in training mode (a new
    module's default), as quantize_model did"""
    make_checkpoint(tmp_path / "c", "awq")
    for train in (False, True):
        model = load_quantized(TinyLM().train(train), tmp_path / "c")
        assert {m.training for m in model.modules()} == {train}


def test_load_honours_modules_to_not_convert(tmp_path):
    _, oracle = make_checkpoint(tmp_path / "c", "awq", skip=["blocks.1.up"])
    model = load_quantized(TinyLM(), tmp_path / "c")
    assert type(model.blocks[1].up) is nn.Linear and isinstance(model.blocks[0].up, QuantLinear)
    check_logits(model, oracle)


def test_load_layer_split_across_shards(tmp_path):
    folder = tmp_path / "split"
    _, oracle = make_checkpoint(folder, "gptq", shards=1)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    # blocks.0.up.qweight alone in the last shard, its qzeros and scales in the first
    assign = {k: (2 if k == "blocks.0.up.qweight" else 0 if k.startswith("blocks.0") else 1) for k in tensors}
    write_shards(folder, tensors, 3, assign)
    check_logits(load_quantized(TinyLM(), folder), oracle)
    convert_checkpoint(folder, tmp_path / "awq", to="awq", verify=True, progress=False)
    check_logits(load_quantized(TinyLM(), tmp_path / "awq"), oracle)


def test_load_autogptq_bias_on_a_layer_without_one(tmp_path):
    folder = tmp_path / "c"
    _, oracle = make_checkpoint(folder, "gptq")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["blocks.0.down.bias"] = torch.zeros(128, dtype=torch.float16)  # AutoGPTQ writes these
    save_file(tensors, str(folder / "model.safetensors"))
    model = load_quantized(TinyLM(), folder)
    assert torch.equal(model.blocks[0].down.bias, tensors["blocks.0.down.bias"])
    check_logits(model, oracle)


def test_load_autogptq_bias_into_a_held_quantlinear_without_one(tmp_path):
    """AutoGPTQ's zero bias on a layer without one loads into a QuantLinear the model holds
    already (built with bias=False, as for a Linear without one), as it does into a Linear; if
    the load fails, the layer is left without a bias again."""
    folder = tmp_path / "c"
    _, oracle = make_checkpoint(folder, "gptq")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["blocks.0.down.bias"] = torch.zeros(128, dtype=torch.float16)  # AutoGPTQ writes these
    save_file(tensors, str(folder / "model.safetensors"))
    model = torch_ops.quantize_model(TinyLM(), group_size=G)
    held = model.blocks[0].down
    assert held.bias is None
    load_quantized(model, folder)
    assert model.blocks[0].down is held and torch.equal(held.bias, tensors["blocks.0.down.bias"])
    check_logits(model, oracle)

    del tensors["blocks.1.norm.weight"]  # a failing load: the held layer as it was
    save_file(tensors, str(folder / "model.safetensors"))
    model = torch_ops.quantize_model(TinyLM(), group_size=G)
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_quantized(model, folder)
    assert model.blocks[0].down.bias is None and "blocks.0.down.bias" not in model.state_dict()


def test_load_into_held_act_order_layers_a_checkpoint_without_g_idx(tmp_path):
    """A model whose QuantLinear layers hold an act-order g_idx loads, in place, a checkpoint
    that has none (AWQ, or GPTQ without g_idx): g_idx is optional for a layer the model holds
    already as for one it builds, and the layers leave act-order."""
    make_checkpoint(tmp_path / "act-order", "gptq", act_order=True)
    _, oracle = make_checkpoint(tmp_path / "awq", "awq", seed=1)
    model = load_quantized(TinyLM(), tmp_path / "act-order")
    held = [model.get_submodule(name) for name in QUANTIZED]
    assert all(layer.act_order for layer in held)
    load_quantized(model, tmp_path / "awq")
    assert [model.get_submodule(name) for name in QUANTIZED] == held
    assert not any(layer.act_order for layer in held)
    check_logits(model, oracle)


def drop_g_idx(folder, names, qc_changes=None):
    """Remove the g_idx of layers ``names`` from a one-shard checkpoint; update its
    quantization_config with ``qc_changes``."""
    tensors = load_file(str(folder / "model.safetensors"))
    for name in names:
        del tensors[f"{name}.g_idx"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(qc_changes or {})
    (folder / "config.json").write_text(json.dumps(config))


def test_act_order_config_with_a_layer_without_g_idx_is_refused_by_name(tmp_path):
    """desc_act=true says the groups are g_idx's, not arange(K) // G: a layer without g_idx was
    read in plain group order (wrong weights, no word) and convert wrote desc_act=false."""
    src = tmp_path / "src"
    make_checkpoint(src, "gptq", act_order=True)
    drop_g_idx(src, ["blocks.1.down"])
    refused_everywhere(src, TinyLM(), r"blocks\.1\.down: .*desc_act=true.*no g_idx")


@pytest.mark.parametrize("qc_changes", [
    {"desc_act": True, "static_groups": True},
    {"desc_act": True, "dynamic": {r"+:blocks\.1\.": {"desc_act": False}}},
    {"desc_act": True, "group_size": -1}])
def test_a_layer_without_g_idx_loads_where_its_groups_are_in_order(tmp_path, qc_changes):
    """static_groups, a dynamic rule turning desc_act off for the layer, or one group: the plain
    order is the layer's, and a missing g_idx stays optional."""
    src = tmp_path / "src"
    if qc_changes.get("group_size") == -1:
        torch.manual_seed(0)
        model = TinyLM()
        tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
        oracle = copy.deepcopy(model)
        for name in QUANTIZED:
            weight = tensors.pop(f"{name}.weight")
            K = weight.shape[1]
            q = ref.quantize(weight, 4, K, False, "gptq", "v1")
            tensors.update({f"{name}.{k}": v for k, v in q.items()})
            oracle.get_submodule(name).weight.data.copy_(ref.dequantize(
                q["qweight"], q["scales"].float(), q["qzeros"], "gptq", 4, K, None, "v1"))
        src.mkdir()
        qc = {"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": True}
        (src / "config.json").write_text(json.dumps({"quantization_config": qc}))
        save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    else:
        _, oracle = make_checkpoint(src, "gptq")
    drop_g_idx(src, ["blocks.1.up", "blocks.1.down"], qc_changes)
    check_logits(load_quantized(TinyLM(), src), oracle)
    convert_checkpoint(src, tmp_path / "dst", to="gptq", verify=True, progress=False)


def test_load_reports_missing_and_unexpected_tensors(tmp_path):
    folder = tmp_path / "c"
    make_checkpoint(folder, "awq")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["blocks.1.down.qzeros"], tensors["blocks.0.norm.bias"]
    tensors["blocks.0.extra"] = torch.zeros(3)
    save_file(tensors, str(folder / "model.safetensors"))
    model = TinyLM()
    with pytest.raises(CheckpointError) as info:
        load_quantized(model, folder)
    msg = str(info.value)
    assert "missing tensors (2): blocks.0.norm.bias, blocks.1.down.qzeros" in msg
    assert "unexpected tensors (1): blocks.0.extra" in msg
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # the model is as it was


def test_load_ignores_rotary_inv_freq_that_older_transformers_saved(tmp_path):
    """Checkpoints of 2023 (transformers < 4.31, e.g. many GPTQ Llama uploads) hold each layer's
    rotary_emb.inv_freq, which later models compute and keep out of their state dict:
    transformers ignores them on load. They were refused as unexpected tensors. Other
    unexpected tensors still are."""
    folder = tmp_path / "c"
    _, oracle = make_checkpoint(folder, "gptq")
    tensors = load_file(str(folder / "model.safetensors"))
    for i in range(2):
        tensors[f"blocks.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(16)
    save_file(tensors, str(folder / "model.safetensors"))
    check_logits(load_quantized(TinyLM(), folder), oracle)
    with torch.device("meta"):
        meta = TinyLM()
    check_logits(load_quantized(meta, folder), oracle)  # (the assign path)
    tensors["blocks.0.rotary_emb.inv_freq_extra"] = torch.rand(16)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): "
                                              r"blocks\.0\.rotary_emb\.inv_freq_extra"):
        load_quantized(TinyLM(), folder)


@pytest.mark.parametrize("shard", ["../elsewhere/x.safetensors", "ABSOLUTE", ""])
def test_index_naming_a_shard_outside_the_folder_is_refused(tmp_path, shard):
    """An index whose weight_map names ../x or an absolute path: load_quantized and inspect read
    that file, wherever it was (convert refused it, and its message itself failed on an absolute
    path: "is not in the subpath of"); an empty name was reported as the folder "missing"."""
    src = tmp_path / "ckpt"
    make_checkpoint(src, "awq", shards=2)
    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    first = sorted(src.glob("model-*.safetensors"))[0]
    shutil.move(first, outside)
    shard = str(outside) if shard == "ABSOLUTE" else shard
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: (shard if v == first.name else v) for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    message = (re.escape(f"{src / 'model.safetensors.index.json'}: shard {shard!r} is not a file "
                         "inside the checkpoint folder"))
    for call in (lambda: load_quantized(TinyLM(), src), lambda: inspect_checkpoint(src),
                 lambda: convert_checkpoint(src, tmp_path / "dst", "gptq")):
        with pytest.raises(CheckpointError, match=message):
            call()
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("where", ["config.json", "model.safetensors.index.json", "header"])
def test_deeply_nested_json_is_a_checkpoint_error(tmp_path, where):
    """JSON nested past the parser's depth raised RecursionError, naming no file"""
    src = tmp_path / "ckpt"
    make_checkpoint(src, "awq", shards=2)
    deep = "[" * 100000 + "]" * 100000
    if where == "header":
        target = sorted(src.glob("model-*.safetensors"))[0]
        target.write_bytes(len(deep).to_bytes(8, "little") + deep.encode())
        message = rf"{re.escape(str(target))}: corrupt safetensors header \(maximum recursion"
    else:
        target = src / where
        target.write_text(deep)
        message = rf"{re.escape(str(target))}: cannot read JSON \(maximum recursion"
    for call in (lambda: load_quantized(TinyLM(), src), lambda: inspect_checkpoint(src)):
        with pytest.raises(CheckpointError, match=message):
            call()


def test_load_refuses_quantized_layers_that_must_stay_float(tmp_path):
    """quantize_model leaves float a Linear subclass with a forward of its own (a QuantLinear would
    drop what it adds) and nn.MultiheadAttention's out_proj (the attention reads its weight
    itself): a checkpoint that quantizes one is refused, naming it, before the model changes.
    load_quantized put a QuantLinear there (the subclass's forward silently gone; the attention
    failing at forward time on out_proj.weight)."""
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class Model(nn.Module):
        def __init__(self, first=nn.Linear):
            super().__init__()
            self.first = first(64, 64)
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

    torch.manual_seed(0)
    tensors = {k: v.detach().clone() for k, v in Model().state_dict().items()}
    for name in ("first", "attn.out_proj"):
        q = ref.quantize(tensors.pop(f"{name}.weight"), 4, 32, False, "gptq", "v1")
        tensors.update({f"{name}.{k}": v for k, v in q.items()})
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}
    for quantized in ("first", "attn.out_proj"):
        folder = tmp_path / quantized
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"quantization_config": qc}))
        other = "attn.out_proj" if quantized == "first" else "first"
        kept = {k: v for k, v in tensors.items() if not k.startswith(other + ".")}
        kept[f"{other}.weight"] = torch.zeros(64, 64)
        kept[f"{other}.bias"] = tensors[f"{other}.bias"]
        save_file(kept, str(folder / "model.safetensors"))
        model = Model(Scaled)
        before = copy.deepcopy(model.state_dict())
        why = "an nn.Linear subclass with a forward" if quantized == "first" else "out_proj"
        with pytest.raises(CheckpointError,
                           match=rf"^{re.escape(quantized)}: the checkpoint quantizes .*{why}"):
            load_quantized(model, folder)
        assert type(model.first) is Scaled and not isinstance(model.attn.out_proj, QuantLinear)
        after = model.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before)
    # a plain Linear in the subclass's place loads (only the layers that must stay float stop it)
    assert isinstance(load_quantized(Model(), tmp_path / "first").first, QuantLinear)
    # nn.TransformerEncoderLayer reads linear1's / linear2's weights itself (its fast path)
    encoder = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    tensors = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    q = ref.quantize(tensors.pop("linear1.weight"), 4, 32, False, "gptq", "v1")
    tensors.update({f"linear1.{k}": v for k, v in q.items()})
    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"quantization_config": qc}))
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"^linear1: the checkpoint quantizes this layer, but "
                       r"it is the linear1 of an nn.TransformerEncoderLayer"):
        load_quantized(encoder, folder)
    assert type(encoder.linear1) is nn.Linear


@pytest.mark.parametrize("defect", ["g_idx out of range", "float tensor of another shape"])
def test_load_failing_late_leaves_the_model_as_it_was(tmp_path, defect):
    """A defect found only while loading a later shard (a value check, a float tensor's shape)
    raises CheckpointError with every layer and parameter of the model as it was before."""
    folder = tmp_path / "c"
    make_checkpoint(folder, "gptq", act_order=True, shards=3)
    tensors = all_tensors(folder)
    if defect == "g_idx out of range":
        tensors["blocks.1.up.g_idx"][5] = 2  # 128 in_features: groups 0 and 1
    else:
        tensors["lm_head.weight"] = torch.zeros(48, 64)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "model.safetensors.index.json").unlink()
    write_shards(folder, tensors, 3)
    model = TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="g_idx|lm_head.weight"):
        load_quantized(model, folder)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_load_failing_puts_back_held_layers_zero_format(tmp_path):
    """load_quantized sets every quantized layer's checkpoint_zero_format to the checkpoint's
    before loading; a load that then fails (a g_idx out of range in a later shard) left a held
    QuantLinear with the failed checkpoint's format, so its next state_dict() wrote v2 zeros where
    it had written v1."""
    folder = tmp_path / "c"
    make_checkpoint(folder, "gptq", "v2", act_order=True, shards=3)
    tensors = all_tensors(folder)
    tensors["blocks.1.up.g_idx"][5] = 2  # 128 in_features: groups 0 and 1
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "model.safetensors.index.json").unlink()
    write_shards(folder, tensors, 3)
    model = torch_ops.quantize_model(TinyLM(), group_size=G)
    with pytest.raises(CheckpointError, match="g_idx"):
        load_quantized(model, folder)
    assert [model.get_submodule(n).checkpoint_zero_format for n in QUANTIZED] == ["v1"] * 4


def test_g_idx_wrapping_in_int32_is_refused_everywhere(tmp_path):
    """An int64 g_idx of trivial + 2**32 narrows to the trivial one: load, convert and inspect
    must refuse it as out of range, not read it as a plain (or act-order) layer."""
    folder = tmp_path / "c"
    make_checkpoint(folder, "gptq")
    tensors = all_tensors(folder)
    tensors["blocks.1.up.g_idx"] = tensors["blocks.1.up.g_idx"].long() + 2**32
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    before = tree_digest(folder)
    message = r"blocks\.1\.up.*g_idx values must lie in \[0, 2\)"
    with pytest.raises(CheckpointError, match=r"g_idx values must lie in \[0, 2\)"):
        load_quantized(TinyLM(), folder)  # (loaded layer by layer: the message has no prefix)
    for to in ("gptq", "awq"):
        with pytest.raises(CheckpointError, match=message):
            convert_checkpoint(folder, tmp_path / to, to=to, progress=False)
    with pytest.raises(CheckpointError, match=message):
        inspect_checkpoint(folder)
    assert tree_digest(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_load_refuses_unsupported_configs(tmp_path):
    for i, (qc_change, message) in enumerate([
            ({"bits": 8}, "only 4-bit"), ({"version": "gemv_fast"}, "AWQ version"),
            ({"quant_method": "bitsandbytes"}, "unsupported quant_method"),
            # (transformers reads llm-awq's layout whatever the version says)
            ({"backend": "llm-awq"}, "unsupported AWQ backend 'llm-awq'")]):
        folder = tmp_path / str(i)
        make_checkpoint(folder, "awq")
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"].update(qc_change)
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=message):
            load_quantized(TinyLM(), folder)


# The quantization_config GPTQModel 7.7 writes for AWQ with its default sym=True: "zero_point":
# false beside "version"/"format"/"checkpoint_format" "gemm"; its GEMM layers store qzeros (all 8)
GPTQMODEL_AWQ_SYM = {"bits": 4, "group_size": G, "desc_act": False, "lm_head": False,
                     "method": "awq", "quant_method": "awq", "format": "gemm",
                     "checkpoint_format": "gemm", "pack_dtype": "int32", "zero_point": False,
                     "version": "gemm", "meta": {"quantizer": ["gptqmodel:7.7.0"]}}


def test_gptqmodel_awq_without_zero_point_is_read(tmp_path):
    """GPTQModel's default AWQ checkpoint (sym=True: "zero_point": false, qzeros of 8 in the GEMM
    layout, which its kernels and vLLM's AWQ read as stored) was refused as "AWQ without zero
    points"; it loads, inspects and converts (both ways, verified) like any AWQ gemm checkpoint."""
    folder = tmp_path / "c"
    _, oracle = make_checkpoint(folder, "awq", sym=True)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = dict(GPTQMODEL_AWQ_SYM)
    (folder / "config.json").write_text(json.dumps(config))
    info = inspect_checkpoint(folder)
    assert (info["format"], info["group_size"], info["zero_format"]) == ("awq", G, "as-is")
    check_logits(load_quantized(TinyLM(), folder), oracle)
    for to, zero_format in (("gptq", "v1"), ("gptq", "v2"), ("awq", "v1")):
        dst = tmp_path / f"{to}-{zero_format}"
        convert_checkpoint(folder, dst, to=to, zero_format=zero_format, verify=True, progress=False)
        check_logits(load_quantized(TinyLM(), dst), oracle)
    qc = json.loads((tmp_path / "gptq-v1" / "config.json").read_text())["quantization_config"]
    assert qc["sym"] is True and qc["checkpoint_format"] == "gptq"


@pytest.mark.parametrize("change", [
    {"format": "gemv_fast"}, {"checkpoint_format": "llm-awq"}, {"version": "GEMV"},
    {"format": "marlin", "checkpoint_format": "marlin"}])
def test_awq_layouts_other_than_gemm_are_refused_whichever_key_names_them(tmp_path, change):
    """GPTQModel names an AWQ checkpoint's layout in "format" and "checkpoint_format" as well as
    "version": a config whose layout only "format" named (gemv_fast, llm-awq, marlin: other
    tensor layouts) was read as gemm."""
    folder = tmp_path / "c"
    make_checkpoint(folder, "awq")
    config = json.loads((folder / "config.json").read_text())
    qc = {k: v for k, v in config["quantization_config"].items() if k != "version"}
    config["quantization_config"] = {**qc, **change}
    (folder / "config.json").write_text(json.dumps(config))
    key = next(iter(change))
    message = rf"unsupported AWQ {key} {re.escape(repr(change[key]))}"
    refused_everywhere(folder, TinyLM(), message)


@pytest.mark.parametrize("side_file", [False, True])
def test_autogptq_marlin_format_is_refused(tmp_path, side_file):
    """AutoGPTQ 0.7.1 writes "is_marlin_format": true for its Marlin checkpoints (tensors B and s
    in Marlin's tiles, no qweight): inspect described one as a GPTQ checkpoint of 0 quantized
    layers, convert and load_quantized spoke of missing qweight / weight tensors."""
    folder = tmp_path / "c"
    folder.mkdir()
    qc = {"bits": 4, "group_size": G, "damp_percent": 0.01, "desc_act": False,
          "static_groups": False, "sym": True, "true_sequential": True,
          "model_name_or_path": None, "model_file_base_name": "model", "is_marlin_format": True,
          "quant_method": "gptq"}
    tensors = {k: v for k, v in TinyLM().state_dict().items()
               if not any(k.startswith(n + ".") for n in QUANTIZED)}
    for name in QUANTIZED:
        K, N = TinyLM().get_submodule(name).in_features, TinyLM().get_submodule(name).out_features
        tensors[f"{name}.B"] = torch.zeros(K // 16, N * 2, dtype=torch.int32)
        tensors[f"{name}.s"] = torch.ones(K // G, N, dtype=torch.float16)
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"model_type": "tiny"}
    if side_file:
        (folder / "quantize_config.json").write_text(json.dumps(qc))
    else:
        config["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(config))
    refused_everywhere(folder, TinyLM(), "is_marlin_format=true")
    # its "is_marlin_format": false, AutoGPTQ's usual GPTQ checkpoint, reads as before
    assert parse_quant_config({**qc, "is_marlin_format": False}).zero_format == "v1"


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_dynamic_per_layer_bits_or_group_size_is_refused_naming_the_rule(tmp_path, fmt):
    """GPTQModel's "dynamic" rules (first match from the name's start, "+:"/"-:" prefixes) may
    give a layer another group size or width; such a layer was refused only by a shape error
    about its qzeros. Rules that keep bits and group_size (sym, desc_act), negative rules and
    rules matching no quantized layer change nothing."""
    folder = tmp_path / "c"
    _, oracle = make_checkpoint(folder, fmt)
    tensors = load_file(str(folder / "model.safetensors"))
    w = torch.randn(128, 256)  # blocks.1.down with group_size 32, as the rule below says
    q = ref.quantize(w, 4, 32, False, fmt)
    if fmt == "awq":
        q.pop("g_idx", None)
    tensors.update({f"blocks.1.down.{k}": v for k, v in q.items()})
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    dynamic = {r"-:.*\.0\.up$": {}, r"+:.*\.up": {"sym": False, "desc_act": True, "bits": 4},
               r".*lm_head": {"bits": 8}, r"+:blocks\.1\.down": {"group_size": 32}}
    config["quantization_config"]["dynamic"] = dynamic
    (folder / "config.json").write_text(json.dumps(config))
    # (the rule as config.json spells it)
    down_rule, up_rule = json.dumps(r"+:blocks\.1\.down"), json.dumps(r"+:.*\.up")
    message = re.escape(f"blocks.1.down: the config's dynamic rule {down_rule} gives this layer "
                        f"group_size=32 (the config: bits=4, group_size={G}); per-layer")
    refused_everywhere(folder, TinyLM(), message)
    # the layer back at the config's group size, its rule one that keeps it: read as before
    make_checkpoint(tmp_path / "d", fmt)
    dynamic[r"+:blocks\.1\.down"] = {"group_size": G, "bits": "4", "damp_percent": 0.05}
    dynamic[r"+:.*\.up"]["bits"] = 8  # (first decided by the negative rule for blocks.0.up)
    dynamic[r"-:.*\.0\.up$"], dynamic[r"+:blocks\.0\.up"] = {}, {"group_size": 16}
    config["quantization_config"]["dynamic"] = dynamic
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(
            f"blocks.1.up: the config's dynamic rule {up_rule} gives this layer bits=8")):
        inspect_checkpoint(tmp_path / "d")
    dynamic[r"+:.*\.up"]["bits"] = 4
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    inspect_checkpoint(tmp_path / "d")
    check_logits(load_quantized(TinyLM(), tmp_path / "d"), oracle)


@pytest.mark.parametrize("pack_dtype", ["int16", "int8", "int64"])
def test_gptqmodel_pack_dtype_other_than_int32_is_refused_by_name(tmp_path, pack_dtype):
    """GPTQModel's "pack_dtype" packs qweight / qzeros in other words (int16: qweight [K/4, N]):
    such a checkpoint was refused as "qweight must be a 2-D int32 tensor", without naming the
    field; its "pack_dtype": "int32" (GPTQModel always writes it) reads as before."""
    folder = tmp_path / "c"
    make_checkpoint(folder, "gptq")
    tensors = load_file(str(folder / "model.safetensors"))
    words = {"int16": torch.int16, "int8": torch.int8, "int64": torch.int64}[pack_dtype]
    for name in QUANTIZED:  # (the int32 words reinterpreted: other dtypes and shapes, as there)
        for s in ("qweight", "qzeros"):
            t = tensors[f"{name}.{s}"]
            tensors[f"{name}.{s}"] = (t.view(words) if s == "qzeros" or words == torch.int64
                                      else t.t().contiguous().view(words).t().contiguous())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["pack_dtype"] = pack_dtype
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"unsupported pack_dtype '{pack_dtype}'"):
        inspect_checkpoint(folder)
    with pytest.raises(CheckpointError, match=f"unsupported pack_dtype '{pack_dtype}'"):
        load_quantized(TinyLM(), folder)
    assert parse_quant_config({"quant_method": "gptq", "bits": 4, "group_size": 128,
                               "pack_dtype": "int32"}).zero_format == "v1"


def test_gptqmodel_method_field_without_quant_method(tmp_path):
    """GPTQModel's canonical field is "method" ("quant_method" a deprecated alias it still writes
    beside it): its AWQ quantize_config.json without "quant_method" was read as GPTQ (the side
    file's default) and refused ("unsupported GPTQ checkpoint_format 'gemm'")."""
    folder = tmp_path / "c"
    _, oracle = make_checkpoint(folder, "awq", sym=True)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    qc = {k: v for k, v in GPTQMODEL_AWQ_SYM.items() if k != "quant_method"}
    (folder / "quantize_config.json").write_text(json.dumps(qc))
    assert inspect_checkpoint(folder)["format"] == "awq"
    check_logits(load_quantized(TinyLM(), folder), oracle)
    assert parse_quant_config({"method": "gptq", "bits": 4, "group_size": 128,
                               "format": "gptq_v2"}).zero_format == "v2"
    with pytest.raises(CheckpointError, match="unsupported quant_method 'fp8'"):
        parse_quant_config({"method": "fp8", "bits": 4, "group_size": 128})


def test_gptq_checkpoint_format_and_format_that_disagree_are_refused(tmp_path):
    """GPTQModel writes its format under both "format" and "checkpoint_format"; it reads "format"
    first (checkpoint_format is a legacy hint), transformers reads "checkpoint_format". A config
    whose two keys disagree (one edited by hand) was read by checkpoint_format alone, v1 zeros
    where GPTQModel reads v2: every weight off by one scale in one of them. Refused, naming both;
    the value's case does not matter (GPTQModel lowercases it)."""
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}
    for fields in ({"checkpoint_format": "gptq", "format": "gptq_v2"},
                   {"checkpoint_format": "gptq_v2", "format": "gptq"}):
        with pytest.raises(CheckpointError, match=re.escape(
                f"quantization_config: checkpoint_format {fields['checkpoint_format']!r} and "
                f"format {fields['format']!r} disagree")):
            parse_quant_config({**qc, **fields})
    assert parse_quant_config({**qc, "checkpoint_format": "GPTQ_V2",
                               "format": "gptq_v2"}).zero_format == "v2"
    assert parse_quant_config({**qc, "checkpoint_format": "GPTQ"}).zero_format == "v1"
    folder = tmp_path / "c"
    make_checkpoint(folder, "gptq", zero_format="v2", sym=True)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(checkpoint_format="gptq", format="gptq_v2")
    (folder / "config.json").write_text(json.dumps(config))
    refused_everywhere(folder, TinyLM(), "checkpoint_format 'gptq' and format 'gptq_v2' disagree")


def test_config_booleans_written_as_strings_or_integers(tmp_path):
    """bool("false") is True: "true"/"false" (any case) and 0/1 are read as what they say, None or
    a missing key as the default, anything else refused naming the key, the value and the file."""
    def inspect_with(fmt, key, value):
        folder = tmp_path / f"{fmt}-{key}-{value!r}"
        make_checkpoint(folder, fmt)
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"][key] = value
        (folder / "config.json").write_text(json.dumps(config))
        return folder, inspect_checkpoint(folder)

    for key in ("sym", "desc_act"):
        for value, read in [("false", False), ("False", False), (0, False), (False, False),
                            (None, False), ("TRUE", True), ("true", True), (1, True), (True, True)]:
            assert inspect_with("gptq", key, value)[1][key] is read, (key, value)
        for value in ("yes", "0", 2, 1.0, []):
            with pytest.raises(CheckpointError, match=rf"config\.json: quantization_config: {key} "
                                                      rf"must be true or false, got {re.escape(repr(value))}"):
                inspect_with("gptq", key, value)
    folder, _ = inspect_with("awq", "zero_point", "True")
    load_quantized(TinyLM(), folder)
    folder, _ = inspect_with("awq", "zero_point", "false")  # (qzeros read as stored)
    load_quantized(TinyLM(), folder)
    with pytest.raises(CheckpointError, match=r"zero_point must be true or false, got 'no'"):
        inspect_with("awq", "zero_point", "no")


def test_config_numbers_written_as_strings(tmp_path):
    """bits and group_size (AutoAWQ's w_bit and q_group_size too) written as strings of integers
    are read as those integers; any other string is refused naming the key and the value."""
    def inspect_with(fmt, change, legacy=False):
        folder = tmp_path / f"{fmt}-{legacy}-{sorted(change.items())}"
        make_checkpoint(folder, fmt)
        config = json.loads((folder / "config.json").read_text())
        qc = config.pop("quantization_config")
        if legacy:  # AutoAWQ's own names, in its quant_config.json
            qc = {"zero_point": True, "version": "GEMM", "w_bit": 4, "q_group_size": G}
            (folder / "quant_config.json").write_text(json.dumps({**qc, **change}))
        else:
            config["quantization_config"] = {**qc, **change}
        (folder / "config.json").write_text(json.dumps(config))
        return inspect_checkpoint(folder)

    for fmt in ("awq", "gptq"):
        info = inspect_with(fmt, {"bits": "4", "group_size": f" {G}"})
        assert (info["format"], info["bits"], info["group_size"]) == (fmt, 4, G)
    info = inspect_with("awq", {"w_bit": "4", "q_group_size": str(G)}, legacy=True)
    assert (info["format"], info["bits"], info["group_size"]) == ("awq", 4, G)
    assert parse_quant_config({"quant_method": "gptq", "bits": 4, "group_size": "-1"}).group_size == -1
    # whole numbers written as floats: bits 4.0 was read, group_size 128.0 refused
    qc = parse_quant_config({"quant_method": "gptq", "bits": 4.0, "group_size": 128.0})
    assert qc.group_size == 128 and type(qc.group_size) is int
    with pytest.raises(CheckpointError, match="group_size must be -1 or a positive integer, got 128.5"):
        parse_quant_config({"quant_method": "gptq", "bits": 4, "group_size": 128.5})
    with pytest.raises(CheckpointError, match="group_size must be -1 or a positive integer, got 0"):
        inspect_with("gptq", {"group_size": "0"})
    with pytest.raises(CheckpointError, match=r"unsupported bits=8 \(only 4-bit"):
        inspect_with("gptq", {"bits": "8"})
    for key, value in [("bits", "four"), ("bits", "4.0"), ("group_size", ""),
                       ("group_size", "128g"), ("q_group_size", "x")]:
        with pytest.raises(CheckpointError, match=rf"{key} must be an integer, "
                                                  rf"got {re.escape(repr(value))}"):
            inspect_with("awq", {key: value}, legacy=key == "q_group_size")


def test_load_gptq_tensors_with_awq_config_is_refused(tmp_path):
    folder = tmp_path / "c"
    make_checkpoint(folder, "gptq")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": G, "version": "gemm"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit the AWQ layout"):
        load_quantized(TinyLM(), folder)


# ---------------------------------------------------------------- convert_checkpoint
@pytest.mark.parametrize("shards", [1, 2])
def test_awq_gptq_awq_round_trip_is_bit_exact(tmp_path, shards):
    src = tmp_path / "awq"
    _, oracle = make_checkpoint(src, "awq", shards=shards)
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("kept")
    before = tree_digest(src)
    info = convert_checkpoint(src, tmp_path / "gptq", to="gptq", progress=False)
    assert info["layers"] == 4 and info["shards"] == shards
    assert tree_digest(src) == before

    gptq = all_tensors(tmp_path / "gptq")
    awq = all_tensors(src)
    for name in QUANTIZED:
        qweight, qzeros = ref.awq_to_gptq(awq[f"{name}.qweight"], awq[f"{name}.qzeros"], "v1")
        assert torch.equal(gptq[f"{name}.qweight"], qweight)
        assert torch.equal(gptq[f"{name}.qzeros"], qzeros)
        assert torch.equal(gptq[f"{name}.g_idx"], (torch.arange(gptq[f"{name}.g_idx"].numel()) // G).int())
    for key, t in awq.items():  # everything else byte for byte
        if not key.endswith((".qweight", ".qzeros")):
            assert gptq[key].dtype == t.dtype and torch.equal(gptq[key], t), key
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert qc["model_type"] == "tiny"
    assert qc["quantization_config"] == {"quant_method": "gptq", "bits": 4, "group_size": G,
                                         "desc_act": False, "sym": False, "checkpoint_format": "gptq"}
    assert (tmp_path / "gptq" / "extra" / "notes.txt").read_text() == "kept"
    assert (tmp_path / "gptq" / "tokenizer.json").is_file()
    if shards > 1:
        index = json.loads((tmp_path / "gptq" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(gptq)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in gptq.values())
        for key, shard in index["weight_map"].items():
            assert key in load_file(str(tmp_path / "gptq" / shard))
    check_logits(load_quantized(TinyLM(), tmp_path / "gptq"), oracle)

    convert_checkpoint(tmp_path / "gptq", tmp_path / "back", to="awq", verify=True, progress=False)
    back = tree_digest(tmp_path / "back")
    for name, digest in before.items():  # shards and every other file identical to the source's
        if not name.endswith(".json") or name == "tokenizer.json":
            assert back[name] == digest, name
    assert set(back) == set(before)
    if shards > 1:  # same index (rewritten, so compared as JSON)
        name = "model.safetensors.index.json"
        assert json.loads((src / name).read_text()) == json.loads((tmp_path / "back" / name).read_text())


def test_convert_gptq_zero_formats_and_act_order(tmp_path):
    src = tmp_path / "v1"
    _, oracle = make_checkpoint(src, "gptq", "v1", act_order=True, shards=2)
    convert_checkpoint(src, tmp_path / "v2", to="gptq", zero_format="v2", verify=True, progress=False)
    a, b = all_tensors(src), all_tensors(tmp_path / "v2")
    for name in QUANTIZED:
        assert torch.equal(b[f"{name}.qzeros"], ref.convert_gptq_zeros(a[f"{name}.qzeros"], 4, "v1", "v2"))
        assert torch.equal(b[f"{name}.g_idx"], a[f"{name}.g_idx"])
        assert torch.equal(b[f"{name}.qweight"], a[f"{name}.qweight"])
    qc = json.loads((tmp_path / "v2" / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2" and qc["desc_act"] is True
    check_logits(load_quantized(TinyLM(), tmp_path / "v2"), oracle)
    # act-order cannot become AWQ: refused before anything is written
    before = tree_digest(src)
    with pytest.raises(CheckpointError, match="act-order"):
        convert_checkpoint(src, tmp_path / "awq", to="awq", progress=False)
    assert not (tmp_path / "awq").exists() and tree_digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1", "v2"]


def test_convert_to_awq_writes_no_shard_that_held_only_g_idx(tmp_path):
    """GPTQ -> AWQ drops g_idx: a shard that held only g_idx tensors was still written, empty and
    not in the new index (a stray file every later convert copied on), and the summary counted it."""
    src = tmp_path / "gptq"
    _, oracle = make_checkpoint(src, "gptq")
    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    write_shards(src, tensors, 2, assign={k: int(k.endswith(".g_idx")) for k in tensors})
    info = convert_checkpoint(src, tmp_path / "awq", to="awq", verify=True, progress=False)
    index = json.loads((tmp_path / "awq" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "awq").glob("*.safetensors"))
    assert files == sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors"]
    assert info["shards"] == 1 == inspect_checkpoint(tmp_path / "awq")["shards"]
    check_logits(load_quantized(TinyLM(), tmp_path / "awq"), oracle)
    convert_checkpoint(tmp_path / "awq", tmp_path / "back", to="gptq", progress=False)
    assert sorted(p.name for p in (tmp_path / "back").glob("*.safetensors")) == files


def test_convert_refuses_bad_tensor_shape(tmp_path):
    folder = tmp_path / "src"
    make_checkpoint(folder, "gptq", shards=2)
    bad = folder / "model-00002-of-00002.safetensors"
    tensors = load_file(str(bad))
    key = next(k for k in tensors if k.endswith(".qzeros"))
    tensors[key] = tensors[key][:, :3].contiguous()
    save_file(tensors, str(bad), metadata={"format": "pt"})
    before = tree_digest(folder)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + r" is I32 \[4, 3\], expected"):
        convert_checkpoint(folder, tmp_path / "dst", to="awq", progress=False)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_quantized(TinyLM(), folder)
    assert tree_digest(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_error_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    folder = tmp_path / "src"
    make_checkpoint(folder, "awq", shards=2)
    before = tree_digest(folder)
    written = []

    def save_file_then_fail(tensors, filename, metadata=None):  # the disk fills up on shard 2
        if written:
            raise OSError(28, "No space left on device")
        written.append(filename)
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file_then_fail)
    with pytest.raises(CheckpointError, match="No space left on device") as e:
        convert_checkpoint(folder, tmp_path / "out" / "dst", to="gptq", progress=False)
    # the error names DST and the shard, not the hidden partial folder it removed
    assert str(e.value).startswith(f"cannot write {tmp_path / 'out' / 'dst'} "
                                   "(model-00002-of-00002.safetensors: "), e.value
    assert ".partial-" not in str(e.value)
    assert len(written) == 1  # the first shard had been written, beside DST
    assert Path(written[0]).parent.parent == tmp_path / "out"
    assert tree_digest(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DST, no temp, no new parent


def test_convert_verify_catches_a_wrong_repack(tmp_path, monkeypatch):
    import torch_ops.checkpoint as ckpt_module

    src = tmp_path / "src"
    make_checkpoint(src, "awq")
    real = ckpt_module._convert_layer

    def off_by_one_bit(tensors, *args):
        out = real(tensors, *args)
        out["qweight"] = out["qweight"] ^ 1  # one nibble of each word off by one
        return out

    monkeypatch.setattr(ckpt_module, "_convert_layer", off_by_one_bit)
    with pytest.raises(CheckpointError, match="verify: blocks.0.down dequantizes differently"):
        convert_checkpoint(src, tmp_path / "dst", to="gptq", verify=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_verify_passes_layers_with_nan_or_inf_scales(tmp_path, monkeypatch):
    """A scale of inf (an fp16 overflow) or NaN dequantizes to NaN on both sides of a lossless
    conversion, and NaN != NaN: verify compares NaN with NaN as equal, and still catches a wrong
    repack of such a layer."""
    src = tmp_path / "src"
    make_checkpoint(src, "awq")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["blocks.0.up.scales"][0, 3] = float("inf")
    tensors["blocks.0.up.scales"][1, 5] = float("nan")
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    convert_checkpoint(src, tmp_path / "gptq", to="gptq", verify=True, progress=False)
    convert_checkpoint(tmp_path / "gptq", tmp_path / "awq", to="awq", verify=True, progress=False)
    assert load_file(str(tmp_path / "awq" / "model.safetensors"))["blocks.0.up.qweight"].equal(
        tensors["blocks.0.up.qweight"])
    import torch_ops.checkpoint as ckpt_module
    real = ckpt_module._convert_layer

    def wrong_for_that_layer(tensors, src_qc, to, zero_format, prefix):
        out = real(tensors, src_qc, to, zero_format, prefix)
        if prefix == "blocks.0.up":
            out["qweight"] = out["qweight"] ^ 1
        return out

    monkeypatch.setattr(ckpt_module, "_convert_layer", wrong_for_that_layer)
    with pytest.raises(CheckpointError, match="verify: blocks.0.up dequantizes differently"):
        convert_checkpoint(src, tmp_path / "bad", to="gptq", verify=True, progress=False)


def test_convert_refuses_truncated_shard(tmp_path):
    folder = tmp_path / "src"
    make_checkpoint(folder, "awq", shards=2)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = tree_digest(folder)
    with pytest.raises(CheckpointError, match="truncated"):
        convert_checkpoint(folder, tmp_path / "dst", to="gptq", progress=False)
    with pytest.raises(CheckpointError, match="truncated"):
        load_quantized(TinyLM(), folder)
    assert tree_digest(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_refuses_destination_inside_source(tmp_path):
    src = tmp_path / "src"
    make_checkpoint(src, "awq")
    for dst in [src, src / "sub", tmp_path / "src" / ".." / "src"]:
        with pytest.raises(CheckpointError, match="source folder"):
            convert_checkpoint(src, dst, to="gptq", progress=False)
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(src, tmp_path / "taken", to="gptq", progress=False)
    assert not (src / "sub").exists()



@pytest.mark.parametrize("kw,match", [
    ({"to": None}, "convert_checkpoint: to must be one of ('gptq', 'awq'), got None"),
    ({"to": "marlin"}, "convert_checkpoint: to must be one of ('gptq', 'awq'), got 'marlin'"),
    ({"zero_format": "v3"}, "convert_checkpoint: zero_format must be one of ('v1', 'v2'), got 'v3'")],
    ids=["to=None", "to=marlin", "zero_format=v3"])
def test_convert_refuses_a_bad_target_by_name(tmp_path, kw, match):
    """to=None said "unsupported target format None" (zero_format="v3": "unsupported zero format
    'v3'"), naming neither function nor argument. Refused before anything is read (SRC does not
    exist) or written."""
    with pytest.raises(CheckpointError, match=re.escape(match)):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst", **{"to": "gptq", **kw},
                           progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("path", [None, 5], ids=["None", "int"])
def test_a_path_that_is_not_a_path_is_refused_by_name(tmp_path, path):
    """None (or 5) for a path raised Path()'s TypeError "expected str, bytes or os.PathLike
    object, not NoneType", naming neither function nor argument."""
    src = tmp_path / "src"
    make_checkpoint(src, "awq")
    got = type(path).__name__
    for call, what in [(lambda: load_quantized(TinyLM(), path), "load_quantized: path"),
                       (lambda: inspect_checkpoint(path), "inspect_checkpoint: path"),
                       (lambda: convert_checkpoint(path, tmp_path / "dst", progress=False),
                        "convert_checkpoint: src"),
                       (lambda: convert_checkpoint(src, path, progress=False),
                        "convert_checkpoint: dst"),
                       (lambda: torch_ops.save_quantized(load_quantized(TinyLM(), src), path),
                        "save_quantized: path"),
                       (lambda: torch_ops.checkpoint.read_quant_config(path),
                        "read_quant_config: folder")]:
        with pytest.raises(TypeError, match=re.escape(
                f"{what} must be a str or os.PathLike, got {got}")):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_refuses_an_index_beside_a_model_safetensors_it_does_not_list(tmp_path):
    """transformers loads model.safetensors before model.safetensors.index.json; convert converted
    the index's shards and copied model.safetensors in the old format beside them, so that
    transformers read old-format tensors against the new config."""
    src = tmp_path / "src"
    make_checkpoint(src, "awq", shards=2)
    save_file(all_tensors(src), str(src / "model.safetensors"), metadata={"format": "pt"})
    before = tree_digest(src)
    with pytest.raises(CheckpointError, match=r"holds both model\.safetensors\.index\.json and a "
                                              r"model\.safetensors it does not list"):
        convert_checkpoint(src, tmp_path / "gptq", to="gptq", progress=False)
    assert tree_digest(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    index = json.loads((src / "model.safetensors.index.json").read_text())  # one that lists it: fine
    index["weight_map"] = {k: "model.safetensors" for k in all_tensors(src)}
    for p in src.glob("model-*.safetensors"):
        p.unlink()
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    convert_checkpoint(src, tmp_path / "gptq", to="gptq", verify=True, progress=False)


def refused_everywhere(src, model, match):
    """inspect, convert and load_quantized of the folder src all raise CheckpointError matching
    match, and convert leaves nothing beside src"""
    with pytest.raises(CheckpointError, match=match):
        inspect_checkpoint(src)
    with pytest.raises(CheckpointError, match=match):
        convert_checkpoint(src, src.parent / "dst", to="gptq", progress=False)
    with pytest.raises(CheckpointError, match=match):
        load_quantized(model, src)
    assert sorted(p.name for p in src.parent.iterdir()) == [src.name]


def test_a_folder_that_is_no_quantized_checkpoint_is_told_what_it_lacks(tmp_path):
    """convert and load_quantized said "config.json has no quantization_config" of a folder
    without config.json, and convert "not a checkpoint folder" of a path that does not exist"""
    def refused(src, match):
        with pytest.raises(CheckpointError, match=match):
            convert_checkpoint(src, tmp_path / "dst", to="gptq", progress=False)
        with pytest.raises(CheckpointError, match=match):
            load_quantized(TinyLM(), src)
        assert not (tmp_path / "dst").exists()

    refused(tmp_path / "nothing", r"nothing: no such file or folder$")
    (tmp_path / "file").write_text("")
    refused(tmp_path / "file", r"file: not a folder$")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", r"empty: no config.json \(nor quantize_config.json, "
                                r"quant_config.json\): not a quantized checkpoint$")
    (tmp_path / "float").mkdir()
    (tmp_path / "float" / "config.json").write_text('{"model_type": "tiny"}')
    refused(tmp_path / "float", r"float: config.json has no quantization_config \(not quantized\)$")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "model-00002-of-00002.safetensors"])
def test_a_dangling_link_in_the_checkpoint_is_named(tmp_path, name):
    """A Hugging Face cache snapshot copied without its blobs holds links to nothing. is_file() is
    False for them: a dangling config.json read as "no quantization_config", a model.safetensors
    as "no *.safetensors files" (or the folder's other .safetensors taken for the checkpoint), and
    one shard of a folder without an index was left out: inspect and convert went on without it."""
    src = tmp_path / "src"
    make_checkpoint(src, "awq")
    if name.startswith("model-"):  # two files, no index: every *.safetensors is the checkpoint
        (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    if name == "model.safetensors":  # (Mistral's file beside it was taken for the checkpoint)
        (src / "model.safetensors").rename(src / "consolidated.safetensors")
    (src / name).unlink(missing_ok=True)
    os.symlink("../../blobs/0123abcd", src / name)
    match = rf"{re.escape(str(src / name))}: a link to \.\./\.\./blobs/0123abcd, which does not exist"
    refused_everywhere(src, TinyLM(), match)
    with pytest.raises(CheckpointError, match=match):
        inspect_checkpoint(src / name)


def test_an_index_that_maps_a_tensor_to_the_wrong_shard_names_the_folder(tmp_path):
    """The index's errors name its file in the folder; "maps X to Y, but that file does not hold
    it" named the bare index name, leaving the user to find which checkpoint it was."""
    src = tmp_path / "src"
    make_checkpoint(src, "awq", shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    key = next(k for k, v in index["weight_map"].items() if v == "model-00001-of-00002.safetensors")
    index["weight_map"][key] = "model-00002-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    refused_everywhere(src, TinyLM(), re.escape(
        f"{src / 'model.safetensors.index.json'}: maps {key} to "
        "model-00002-of-00002.safetensors, but that file does not hold it"))


def test_awq_layer_with_k_not_a_multiple_of_8_is_refused_by_inspect_too(tmp_path):
    """An AWQ layer of K = 100 (group -1): inspect called it fine, convert and load_quantized
    refused it (GPTQ's qweight packs 8 rows of K a word)"""
    src = tmp_path / "src"
    src.mkdir()
    K, N = 100, 64
    save_file({"l.qweight": torch.zeros(K, N // 8, dtype=torch.int32),
               "l.qzeros": torch.zeros(1, N // 8, dtype=torch.int32),
               "l.scales": torch.ones(1, N, dtype=torch.float16)},
              str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": -1, "zero_point": True,
        "version": "gemm"}}))
    match = r"l: K = 100 input features, not a multiple of 8"
    refused_everywhere(src, nn.Sequential(OrderedDict(l=nn.Linear(K, N, bias=False))), match)


def test_folder_without_index_reads_model_safetensors_only(tmp_path):
    """Mistral repos ship consolidated.safetensors (the same tensors, other names elsewhere) beside
    model.safetensors: with no index, as transformers does, model.safetensors is the checkpoint
    and other .safetensors files are side files, copied as they are by convert."""
    src = tmp_path / "src"
    model, oracle = make_checkpoint(src, "gptq")
    stray = (src / "model.safetensors").read_bytes()
    (src / "consolidated.safetensors").write_bytes(stray)
    check_logits(load_quantized(model, src), oracle)
    assert inspect_checkpoint(src)["shards"] == 1
    convert_checkpoint(src, tmp_path / "awq", to="awq", verify=True, progress=False)
    assert (tmp_path / "awq" / "consolidated.safetensors").read_bytes() == stray
    # without model.safetensors every file is read: a tensor in two of them is still an error
    (src / "model.safetensors").rename(src / "other.safetensors")
    with pytest.raises(CheckpointError,
                       match=re.escape(f"{src}: tensor ") + r".* is in both consolidated\.safetensors "
                             r"and other\.safetensors"):
        load_quantized(TinyLM(), src)

# ---------------------------------------------------------------- inspect_checkpoint
def test_inspect(tmp_path):
    make_checkpoint(tmp_path / "awq", "awq", shards=2)
    info = inspect_checkpoint(tmp_path / "awq")
    files = [p for p in (tmp_path / "awq").rglob("*") if p.is_file()]
    assert info["format"] == "awq" and info["bits"] == 4 and info["group_size"] == G
    assert info["quantized_layers"] == 4 and info["shards"] == 2 and info["act_order"] is False
    assert info["zero_format"] == "as-is" and info["scales_dtype"] == "F16"
    assert info["total_bytes"] == sum(p.stat().st_size for p in files)

    make_checkpoint(tmp_path / "gptq", "gptq", "v2", act_order=True)
    info = inspect_checkpoint(tmp_path / "gptq")
    assert (info["format"], info["zero_format"], info["act_order"]) == ("gptq", "v2", True)
    single = tmp_path / "gptq" / "model.safetensors"
    info = inspect_checkpoint(single)  # no config: read from the shapes
    assert (info["format"], info["group_size"], info["act_order"]) == ("gptq", G, True)
    assert info["total_bytes"] == single.stat().st_size
    info = inspect_checkpoint(tmp_path / "awq" / "model-00001-of-00002.safetensors")
    assert info["format"] == "awq" and info["group_size"] == G



def test_inspect_checks_every_layer(tmp_path):
    """A folder is the whole checkpoint: a layer missing a tensor is an error, as for convert and
    load_quantized; in a single file (a shard may hold part of a layer) it is left out. Every
    whole layer's shapes are checked, with or without g_idx."""
    def damaged(name, fmt, change):
        folder = tmp_path / name
        make_checkpoint(folder, fmt)
        tensors = load_file(str(folder / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(folder / "model.safetensors"))
        return folder

    folder = damaged("no-scales", "gptq", lambda t: t.pop("blocks.1.up.scales"))
    with pytest.raises(CheckpointError, match=r"no-scales: missing tensors: blocks\.1\.up\.scales$"):
        inspect_checkpoint(folder)
    assert inspect_checkpoint(folder / "model.safetensors")["format"] == "gptq"

    def narrow_qzeros(t):
        t["blocks.1.up.qzeros"] = t["blocks.1.up.qzeros"][:, :3].contiguous()
    for fmt in ("awq", "gptq"):
        folder = damaged(f"qzeros-{fmt}", fmt, narrow_qzeros)
        if fmt == "gptq":  # without g_idx, checked only by its shapes
            folder = damaged("qzeros-gptq-no-g_idx", fmt, lambda t: [
                narrow_qzeros(t), *(t.pop(k) for k in list(t) if k.endswith("g_idx"))])
        for path in (folder, folder / "model.safetensors"):
            with pytest.raises(CheckpointError, match=r"blocks\.1\.up\.qzeros is I32 \[2, 3\], "
                                                      r"expected I32 \[2, 32\]"):
                inspect_checkpoint(path)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_gptq_layers_of_other_widths_are_refused_naming_their_bits(tmp_path, bits):
    """Checkpoints are 4-bit only, and a b-bit GPTQ layer's qweight [K*b/32, N] and scales look
    like a 4-bit layer's with another K: qzeros' ceil(N*b/32) columns tell the width, with a
    config (K=256 read as K=512 otherwise) and without (read as 4-bit with group size 256)."""
    torch.manual_seed(0)
    cols = {2: 4, 3: 6, 8: 16}[bits]
    message = (rf"model\.l0: qzeros has {cols} columns for N = 64: an? {bits}-bit GPTQ layer "
               r"\(4-bit has 8\); checkpoints are 4-bit only")
    q = ref.quantize(torch.randn(64, 256), bits, 128, False, "gptq", "v1")
    for with_g_idx in (False, True):
        folder = tmp_path / f"g_idx-{with_g_idx}"
        folder.mkdir()
        save_file({f"model.l0.{k}": v for k, v in q.items() if with_g_idx or k != "g_idx"},
                  str(folder / "model.safetensors"))
        with pytest.raises(CheckpointError, match=message):  # no config: the shapes are read
            inspect_checkpoint(folder / "model.safetensors")
        qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
        (folder / "config.json").write_text(json.dumps({"quantization_config": qc}))
        with pytest.raises(CheckpointError, match=message):
            convert_checkpoint(folder, tmp_path / "out", progress=False)


def test_inspect_infers_4bit_layouts_and_refuses_unknown_qzeros(tmp_path):
    torch.manual_seed(0)
    for fmt in ("awq", "gptq"):
        q = ref.quantize(torch.randn(64, 256), 4, 128, False, fmt, "v1")
        save_file({f"model.l0.{k}": v for k, v in q.items()}, str(tmp_path / f"{fmt}.safetensors"))
        info = inspect_checkpoint(tmp_path / f"{fmt}.safetensors")
        assert (info["format"], info["bits"], info["group_size"]) == (fmt, 4, 128)
    q["qzeros"] = q["qzeros"][:, :5].contiguous()  # 5 words a row: no width's qzeros for N = 64
    save_file({f"model.l0.{k}": v for k, v in q.items() if k != "g_idx"},
              str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.l0: qzeros has 5 columns for N = 64: not a "
                                              r"4-bit layer; checkpoints are 4-bit only"):
        inspect_checkpoint(tmp_path / "odd.safetensors")
    q["scales"] = q["scales"].flatten()
    save_file({f"model.l0.{k}": v for k, v in q.items()}, str(tmp_path / "flat.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.l0\.scales must be 2-D, got shape \[128\]"):
        inspect_checkpoint(tmp_path / "flat.safetensors")


@pytest.mark.parametrize("rows", [0, 3, 256])
def test_inspect_single_file_refuses_scales_rows_that_do_not_divide_k(tmp_path, rows):
    """A file has no config: the group size is K / (scales' rows). 0 rows, or more rows than K,
    ended inspect with a ZeroDivisionError (the CLI: "error: integer modulo by zero", no tensor
    named); 3 rows for K = 128 named a group_size of 42 that no file holds."""
    q = ref.quantize(torch.randn(64, 128), 4, 64, False, "gptq", "v1")
    save_file({"model.l0.qweight": q["qweight"],
               "model.l0.qzeros": torch.zeros(rows, 8, dtype=torch.int32),
               "model.l0.scales": torch.ones(rows, 64, dtype=torch.float16)},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=rf"model\.l0\.scales has {rows} rows \(groups\) for "
                                              r"K = 128 .*the rows must divide K"):
        inspect_checkpoint(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("zero_format,act_order,sym,expected_sym", [
    ("v1", False, True, True), ("v1", True, False, False),
    ("v2", True, True, None)])  # v2's symmetric words would be zeros of 9 in v1: unknown
def test_inspect_single_file_reads_sym_and_desc_act_from_the_tensors(
        tmp_path, zero_format, act_order, sym, expected_sym):
    """A .safetensors file has no config: sym and desc_act come from the tensors (every zero
    point 8 in the zero format assumed; any act-order layer), not from a placeholder's defaults."""
    make_checkpoint(tmp_path / "c", "gptq", zero_format, act_order=act_order, sym=sym)
    info = inspect_checkpoint(tmp_path / "c" / "model.safetensors")
    assert (info["sym"], info["desc_act"], info["act_order"]) == (expected_sym, act_order, act_order)

@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("field", ["absent", None])
def test_inspect_reads_sym_a_gptq_config_does_not_set_from_the_zero_points(tmp_path, sym, field):
    """A GPTQ config without sym (AutoGPTQ, GPTQModel and transformers then assume true) was
    reported as sym false whatever the zeros: the zero points decide, in the config's zero
    format; a sym the config sets is reported as it is."""
    make_checkpoint(tmp_path / "c", "gptq", "v2", sym=sym)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    if field == "absent":
        del config["quantization_config"]["sym"]
    else:
        config["quantization_config"]["sym"] = field
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    assert inspect_checkpoint(tmp_path / "c")["sym"] is sym
    config["quantization_config"]["sym"] = not sym
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    assert inspect_checkpoint(tmp_path / "c")["sym"] is (not sym)


def set_checkpoint_format(folder, fmt):
    """Relabel a GPTQ checkpoint's zero format in config.json, its tensors untouched."""
    config = json.loads((Path(folder) / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = fmt
    (Path(folder) / "config.json").write_text(json.dumps(config))


def v2_zeros_warnings(read, path):
    """The warnings of v2 zeros under a v1 label that ``read(path)`` emits."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read(path)
    return [str(w.message) for w in caught if "0x88888888" in str(w.message)]


READERS = {"load_quantized": lambda path: load_quantized(TinyLM(), path),
           "convert": lambda path: convert_checkpoint(path, path.parent / f"{path.name}-out",
                                                      progress=False),
           "inspect": inspect_checkpoint}


@pytest.mark.parametrize("reader", list(READERS))
def test_v2_zeros_under_a_v1_label_are_warned_of(tmp_path, reader):
    """transformers/optimum and GPTQModel convert v1 qzeros to v2 in memory, and a model re-saved
    from there can hold v2's symmetric zeros (every word 0x88888888) under a config that says
    checkpoint_format "gptq" (v1): read as v1 those are zero points of 9, every weight off by one
    scale, silently. load_quantized, convert and inspect warn once, naming the folder, the number
    of such layers and the first, and the config key to fix; nothing is corrected. Not warned of:
    v1's own symmetric zeros (0x77777777), the same words under gptq_v2, asymmetric v1 zeros."""
    read = READERS[reader]
    src = tmp_path / "relabelled"
    _, oracle = make_checkpoint(src, "gptq", "v2", sym=True, shards=3)  # (a layer split by shards)
    set_checkpoint_format(src, "gptq")
    found = v2_zeros_warnings(read, src)
    assert len(found) == 1, found  # (load_quantized: not once more per layer, by load_state_dict)
    assert found[0].startswith(f"{reader}: {src}: 4 of 4 quantized layers (the first: "
                               "blocks.0.down)")
    for part in ("0x77777777", "v2 zeros (z = 8) saved under a v1 label",
                 "transformers/optimum or GPTQModel", "off by one scale",
                 "set \"checkpoint_format\": \"gptq_v2\" in config.json's quantization_config"):
        assert part in found[0], part
    if reader == "load_quantized":  # read as the config says (v1: zero points of 9)
        with pytest.warns(UserWarning, match="0x88888888"):
            model = load_quantized(TinyLM(), src)
        tensors = all_tensors(src)
        for name in QUANTIZED:
            t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "scales", "qzeros")}
            expected = ref.dequantize(t["qweight"], t["scales"], t["qzeros"], "gptq", 4, G, None, "v1")
            assert torch.equal(model.get_submodule(name).dequantize(), expected)
    set_checkpoint_format(src, "gptq_v2")  # the fix the warning names: the zeros' own label
    shutil.rmtree(tmp_path / "relabelled-out", ignore_errors=True)
    assert v2_zeros_warnings(read, src) == []
    if reader == "load_quantized":
        check_logits(load_quantized(TinyLM(), src), oracle)
    for name, zero_format, sym in [("v1-sym", "v1", True), ("v1-asym", "v1", False)]:
        make_checkpoint(tmp_path / name, "gptq", zero_format, sym=sym)
        assert v2_zeros_warnings(read, tmp_path / name) == [], name


def test_save_quantized_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch_ops.quantize_model(TinyLM(), group_size=G)
    ids = torch.randint(0, 48, (2, 5))
    expected = model(ids)
    torch_ops.checkpoint.save_quantized(model, tmp_path / "awq", "awq", max_shard_bytes=100_000)
    assert (tmp_path / "awq" / "model.safetensors.index.json").is_file()
    loaded = load_quantized(TinyLM(), tmp_path / "awq")
    assert torch.equal(loaded(ids), expected)


@pytest.mark.parametrize("rows", [136, 128])
def test_save_quantized_refuses_a_row_shard(tmp_path, rows):
    """A row shard of an act-order layer (QuantLinear num_groups=) holds its rows of qweight and
    the whole layer's scales: save_quantized(format="gptq") wrote them, a folder that
    load_quantized, convert and inspect then refused (K=136 not a multiple of group_size; 128
    rows with scales of 3 groups). Refused by name before anything is written, as gptq and awq."""
    torch.manual_seed(0)
    whole = torch_ops.quantize(torch.randn(128, 384), group_size=128, format="gptq")
    g_idx = (torch.argsort(torch.randperm(384)) // 128).to(torch.int32)
    model = nn.Sequential(OrderedDict(
        shard=QuantLinear.from_gptq(whole["qweight"][:rows // 8], whole["qzeros"],
                                    whole["scales"], g_idx=g_idx[:rows], group_size=128),
        out=nn.Linear(128, 64)))
    assert model.shard.row_shard
    for fmt in ("gptq", "awq"):
        with pytest.raises(ValueError, match=re.escape(
                f"save_quantized: shard (in_features={rows}, num_groups=3): row shard(s) of an "
                "act-order layer; a checkpoint holds whole layers")):
            torch_ops.save_quantized(model, tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()


def test_save_quantized_as_awq_names_an_act_order_layer(tmp_path):
    """AWQ has no g_idx: an act-order layer is refused with to_awq's reason under save_quantized's
    name and the layer's (it named neither), before anything is written; GPTQ keeps it."""
    torch.manual_seed(0)
    q = torch_ops.quantize(torch.randn(64, 256), group_size=32, format="gptq")
    g_idx = (torch.argsort(torch.randperm(256)) // 32).to(torch.int32)
    model = nn.Sequential(OrderedDict(first=nn.Linear(64, 256), proj=QuantLinear.from_gptq(
        q["qweight"], q["qzeros"], q["scales"], g_idx=g_idx, group_size=32)))
    with pytest.raises(ValueError, match=re.escape(
            "save_quantized: proj: to_awq: this layer (256->64) uses act-order")) as e:
        torch_ops.save_quantized(model, tmp_path / "awq", "awq")
    assert "format='gptq'" in str(e.value) and not (tmp_path / "awq").exists()
    torch_ops.save_quantized(model, tmp_path / "gptq", "gptq")
    assert (tmp_path / "gptq" / "model.safetensors").is_file()


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
@pytest.mark.parametrize("zero_format", ["v3", None])
def test_save_quantized_refuses_a_bad_zero_format_by_name(tmp_path, fmt, zero_format):
    """A zero_format other than v1 / v2 is refused before anything is written: as AWQ it was
    ignored without a word, and as GPTQ refused by to_gptq under a layer's name, with the hint
    for an act-order layer ("save_quantized(..., format='gptq') keeps act-order")."""
    model = torch_ops.quantize_model(TinyLM(), group_size=G)
    with pytest.raises(ValueError, match=re.escape(
            f"save_quantized: zero_format must be one of ('v1', 'v2'), got {zero_format!r}")) as e:
        torch_ops.save_quantized(model, tmp_path / "c", fmt, zero_format=zero_format)
    assert "act-order" not in str(e.value) and not (tmp_path / "c").exists()


@pytest.mark.parametrize("max_shard_bytes,error,match", [
    ("5GB", TypeError, "save_quantized: max_shard_bytes must be an int, got '5GB'"),
    (1.5, TypeError, "save_quantized: max_shard_bytes must be an int, got 1.5"),
    (-5, ValueError, "save_quantized: max_shard_bytes must be a positive number of bytes (or "
                     "None: one file), got -5")])
def test_save_quantized_refuses_a_bad_max_shard_bytes_by_name(tmp_path, max_shard_bytes, error,
                                                              match):
    """transformers' max_shard_size takes "5GB": here a str raised TypeError "'>' not supported
    between instances of 'int' and 'str'" naming nothing, and a negative or fractional size wrote
    every tensor into a shard of its own. Refused before anything is written."""
    model = torch_ops.quantize_model(TinyLM(), group_size=G)
    with pytest.raises(error, match=re.escape(match)):
        torch_ops.save_quantized(model, tmp_path / "c", "awq", max_shard_bytes=max_shard_bytes)
    assert not (tmp_path / "c").exists()


def test_save_and_load_when_a_float_layers_name_ends_a_quantized_ones(tmp_path):
    """save_quantized lists the float Linear "1" in modules_to_not_convert; read as a run of name
    components it also matches the quantized "0.1", which then stayed float and the load failed
    (missing 0.1.weight). The tensors decide which layers are quantized."""
    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), nn.Linear(64, 64))
    model = make()
    model.load_state_dict(make().state_dict())
    torch_ops.quantize_model(model[0], group_size=32)
    x = torch.randn(3, 64)
    expected = model(x)
    torch_ops.checkpoint.save_quantized(model, tmp_path / "c", "gptq")
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["1"]
    loaded = load_quantized(make(), tmp_path / "c")
    assert isinstance(loaded[0][1], QuantLinear) and type(loaded[1]) is nn.Linear
    assert torch.equal(loaded(x), expected)
    # a CheckpointError from the key check names the folder once
    tensors = load_file(str(tmp_path / "c" / "model.safetensors"))
    del tensors["1.bias"]
    save_file(tensors, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_quantized(make(), tmp_path / "c")
    assert str(e.value).count(str(tmp_path / "c")) == 1, str(e.value)


def make_tied_checkpoint(folder):
    """A checkpoint of a model whose lm_head shares the embedding: it holds only embed.weight.
    Returns its tensors."""
    make_checkpoint(folder, "awq")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    return tensors


def test_load_tied_lm_head_stays_float(tmp_path):
    folder = tmp_path / "c"
    tensors = make_tied_checkpoint(folder)
    model = TinyLM()
    model.lm_head.weight = model.embed.weight
    load_quantized(model, folder)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, tensors["embed.weight"])
    assert isinstance(model.blocks[0].up, QuantLinear)
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): lm_head\.weight"):
        load_quantized(TinyLM(), folder)  # not tied: its weight is missing



def test_load_refuses_different_values_under_two_names_of_a_tied_tensor(tmp_path):
    """A checkpoint holding both lm_head.weight and embed.weight, tied in the model, loads both into
    the one tensor: with different values the last one read won, silently. Refused, naming both
    (the model as it was); equal values (also in another dtype) load. The same for a layer shared
    by two names whose quantized tensors differ."""
    folder = tmp_path / "c"
    make_checkpoint(folder, "awq")
    tensors = load_file(str(folder / "model.safetensors"))
    for meta in (False, True):
        with torch.device("meta" if meta else "cpu"):
            model = TinyLM()
        model.lm_head.weight = model.embed.weight
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(CheckpointError, match=r"embed\.weight and lm_head\.weight are one tied "
                                                  r"tensor in the model, but the checkpoint holds "
                                                  r"different values"):
            load_quantized(model, folder)
        assert not any(isinstance(m, QuantLinear) for m in model.modules())
        assert model.lm_head.weight is model.embed.weight
        if not meta:
            assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    tensors["lm_head.weight"] = tensors["embed.weight"].double()  # equal values: fine
    save_file(tensors, str(folder / "model.safetensors"))
    model = TinyLM()
    model.lm_head.weight = model.embed.weight
    load_quantized(model, folder)
    assert model.lm_head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, tensors["embed.weight"])

    torch.manual_seed(0)  # a shared quantized layer stored under both names, differently
    saved = torch_ops.quantize_model(TinyLM(), group_size=G)
    torch_ops.checkpoint.save_quantized(saved, tmp_path / "shared", "gptq")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.up\.qweight and blocks\.1\.up\.qweight "
                                              r"are one tied tensor"):
        load_quantized(shared_tiny_lm(), tmp_path / "shared")


def test_load_into_meta_model_restores_ties_and_casts_to_the_model_dtype(tmp_path):
    """A model built on the meta device loads with assign=True, which puts a new Parameter under
    the key the checkpoint holds only: the lm_head tied to it must get that same Parameter (not
    stay on meta), and float tensors take the dtype the model's parameters had (fp16 -> bf16)."""
    folder = tmp_path / "c"
    tensors = make_tied_checkpoint(folder)
    with torch.device("meta"):
        model = TinyLM()
    model.lm_head.weight = model.embed.weight
    model.to(torch.bfloat16)
    load_quantized(model, folder)
    assert model.lm_head.weight is model.embed.weight
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model.embed.weight.dtype == model.blocks[0].norm.weight.dtype == torch.bfloat16
    assert torch.equal(model.embed.weight, tensors["embed.weight"].to(torch.bfloat16))
    assert isinstance(model.blocks[0].up, QuantLinear)

def test_load_into_meta_model_holds_no_view_of_the_checkpoint_files(tmp_path):
    """safetensors hands out tensors that map the file; a meta model loads them with assign=True,
    so its parameters and its layers' scales were views of the checkpoint: a file rewritten in
    place (safetensors.save_file to the same path truncates it) changed the model, or ended the
    process with SIGBUS. (Overwritten here, not truncated, so that a failure is an assertion.)"""
    for fmt in ("awq", "gptq"):
        folder = tmp_path / fmt
        make_checkpoint(folder, fmt)
        with torch.device("meta"):
            model = TinyLM()
        load_quantized(model, folder)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        path = folder / "model.safetensors"
        data = bytearray(path.read_bytes())
        start = 8 + int.from_bytes(data[:8], "little")
        with open(path, "r+b") as f:  # every tensor's bytes, in place
            f.seek(start)
            f.write(b"\x7f" * (len(data) - start))
        after = model.state_dict()
        assert [k for k in before if not torch.equal(before[k], after[k])] == []


def shared_tiny_lm():
    model = TinyLM()
    model.blocks[1].up = model.blocks[0].up  # one Linear under two names
    return model


def test_shared_layer_saved_once_and_loaded_shared(tmp_path):
    torch.manual_seed(0)
    model = torch_ops.quantize_model(shared_tiny_lm(), group_size=G)
    assert model.blocks[1].up is model.blocks[0].up
    ids = torch.randint(0, 48, (2, 5))
    expected = model(ids)
    torch_ops.checkpoint.save_quantized(model, tmp_path / "gptq", "gptq")
    keys = set(all_tensors(tmp_path / "gptq"))
    assert {"blocks.0.up.qweight", "blocks.0.up.g_idx"} <= keys  # once, as tied tensors are
    assert not any(k.startswith("blocks.1.up.") for k in keys)
    assert inspect_checkpoint(tmp_path / "gptq")["quantized_layers"] == 3
    loaded = load_quantized(shared_tiny_lm(), tmp_path / "gptq")
    assert isinstance(loaded.blocks[0].up, QuantLinear) and loaded.blocks[1].up is loaded.blocks[0].up
    assert torch.equal(loaded(ids), expected)
    convert_checkpoint(tmp_path / "gptq", tmp_path / "awq", to="awq", verify=True, progress=False)
    assert torch.equal(load_quantized(shared_tiny_lm(), tmp_path / "awq")(ids), expected)


def test_save_quantized_again_replaces_the_old_weight_files(tmp_path):
    folder = tmp_path / "out"
    ids = torch.randint(0, 48, (2, 5))
    for seed, max_shard_bytes in [(0, 100_000), (1, None), (2, 100_000)]:
        torch.manual_seed(seed)
        model = torch_ops.quantize_model(TinyLM(), group_size=G)
        torch_ops.checkpoint.save_quantized(model, folder, "awq", max_shard_bytes=max_shard_bytes)
        (folder / "tokenizer.json").write_text("{}")  # a file of the user's, kept
        names = sorted(p.name for p in folder.iterdir())
        if max_shard_bytes:
            assert "model.safetensors" not in names and "model.safetensors.index.json" in names
        else:
            assert names == ["config.json", "model.safetensors", "tokenizer.json"]
        assert torch.equal(load_quantized(TinyLM(), folder)(ids), model(ids))


@pytest.mark.parametrize("sym", [False, True])
def test_save_quantized_records_sym(tmp_path, sym):
    model = torch_ops.quantize_model(TinyLM(), group_size=G, sym=sym)
    torch_ops.checkpoint.save_quantized(model, tmp_path / "c", "gptq")
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["sym"] is sym


@pytest.mark.parametrize("fmt,zero_format", [("awq", "v1"), ("gptq", "v1"), ("gptq", "v2")])
@pytest.mark.parametrize("sym", [False, True])
def test_convert_to_gptq_records_sym_from_the_zero_points(tmp_path, monkeypatch, fmt, zero_format,
                                                          sym):
    """sym is true where every zero point is 8, as save_quantized records it: AWQ has no sym field,
    and a GPTQ config's may be wrong (here: always false). Found on the tensors read for the
    conversion: each layer's qzeros is read once."""
    make_checkpoint(tmp_path / "src", fmt, zero_format, sym=sym)
    if fmt == "gptq":
        config = json.loads((tmp_path / "src" / "config.json").read_text())
        config["quantization_config"]["sym"] = False
        (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    reads = []
    tensor = torch_ops.checkpoint.Checkpoint.tensor
    monkeypatch.setattr(torch_ops.checkpoint.Checkpoint, "tensor",
                        lambda self, key: (reads.append(key), tensor(self, key))[1])
    convert_checkpoint(tmp_path / "src", tmp_path / "dst", to="gptq", zero_format="v2",
                       progress=False)
    qc = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]
    assert qc["sym"] is sym
    qzeros = [k for k in reads if k.endswith(".qzeros")]
    assert qzeros and len(qzeros) == len(set(qzeros))


def test_convert_to_awq_lists_the_float_layers_in_modules_to_not_convert(tmp_path):
    """AutoAWQ and transformers' AWQ loader quantize every Linear that modules_to_not_convert
    does not name; GPTQ configs rarely have the list, so a float layer (a MoE router) is listed
    from the tensors: a 2-D weight and no qweight. Names the source list covers are not repeated."""
    src = tmp_path / "gptq"
    make_checkpoint(src, "gptq", skip=("blocks.1.up",))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = ["lm_head"]
    (src / "config.json").write_text(json.dumps(config))
    convert_checkpoint(src, tmp_path / "awq", to="awq", progress=False)
    qc = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["blocks.1.up", "embed", "lm_head"]
    assert type(load_quantized(TinyLM(), tmp_path / "awq").blocks[1].up) is nn.Linear


def test_convert_to_awq_warns_of_skip_entries_inside_quantized_names(tmp_path):
    """Loaders that match modules_to_not_convert as substrings (older transformers, AutoAWQ)
    would leave "0.gate_up" unquantized for the float "0.gate": convert says so"""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.gate_up = nn.Linear(64, 8), nn.Linear(64, 64)

        def forward(self, x):
            return self.gate_up(x) + self.gate(x).sum(-1, keepdim=True)
    model = torch_ops.quantize_model(nn.Sequential(Block()), group_size=32, skip=("gate",))
    torch_ops.checkpoint.save_quantized(model, tmp_path / "gptq", "gptq")
    with pytest.warns(UserWarning, match=r"'0\.gate' in '0\.gate_up'"):
        convert_checkpoint(tmp_path / "gptq", tmp_path / "awq", to="awq", progress=False)
    qc = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["0.gate"]
    # saving as AWQ writes the same list: the same warning
    with pytest.warns(UserWarning, match=r"save_quantized as AWQ.*'0\.gate' in '0\.gate_up'"):
        torch_ops.checkpoint.save_quantized(model, tmp_path / "saved", "awq")


def test_convert_to_awq_warns_of_a_quantized_lm_head(tmp_path):
    """transformers' AWQ loader keeps lm_head float whatever modules_to_not_convert says (and
    AutoAWQ quantizes only the decoder layers): a GPTQModel checkpoint with a quantized lm_head,
    converted to AWQ, would load there without lm_head's weight. Convert (and save_quantized as
    AWQ) say so; the checkpoint is still written, and loads here. No warning for a float lm_head."""
    torch.manual_seed(0)
    model = torch_ops.quantize_model(TinyLM(vocab=64), group_size=G, skip=())
    assert isinstance(model.lm_head, QuantLinear)
    torch_ops.checkpoint.save_quantized(model, tmp_path / "gptq", "gptq")
    with pytest.warns(UserWarning, match=r"convert to AWQ: lm_head quantized, but transformers' "
                                         r"AWQ loader keeps lm_head float"):
        convert_checkpoint(tmp_path / "gptq", tmp_path / "awq", to="awq", progress=False)
    ids = torch.randint(0, 64, (2, 5))
    assert torch.equal(load_quantized(TinyLM(vocab=64), tmp_path / "awq")(ids), model(ids))
    with pytest.warns(UserWarning, match=r"save_quantized as AWQ: lm_head quantized"):
        torch_ops.checkpoint.save_quantized(model, tmp_path / "saved", "awq")
    make_checkpoint(tmp_path / "float-head", "gptq")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_checkpoint(tmp_path / "float-head", tmp_path / "float-head-awq", to="awq",
                           progress=False)


def test_convert_keeps_the_config_fields_it_does_not_change(tmp_path):
    extra = {"damp_percent": 0.01, "true_sequential": True, "lm_head": False, "format": "gptq",
             "meta": {"quantizer": ["gptqmodel:1.0"]}}
    src = tmp_path / "v1"
    make_checkpoint(src, "gptq", "v1")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"].update(extra)
    (src / "config.json").write_text(json.dumps(config))
    convert_checkpoint(src, tmp_path / "v2", to="gptq", zero_format="v2", progress=False)
    qc = json.loads((tmp_path / "v2" / "config.json").read_text())["quantization_config"]
    assert qc == {**config["quantization_config"], "checkpoint_format": "gptq_v2", "format": "gptq_v2"}
    # another method: the source method's own fields do not carry over
    make_checkpoint(tmp_path / "awq", "awq")
    convert_checkpoint(tmp_path / "awq", tmp_path / "gptq", to="gptq", progress=False)
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert "zero_point" not in qc and "version" not in qc and qc["quant_method"] == "gptq"


def test_convert_destination_name_near_the_limit_and_shared_parents(tmp_path, monkeypatch):
    import torch_ops.checkpoint as ckpt_module

    src = tmp_path / "src"
    make_checkpoint(src, "awq")
    long_name = "L" * 250  # a valid name; a temporary name built on all of it would not be
    convert_checkpoint(src, tmp_path / "new" / long_name, to="gptq", progress=False)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [long_name]
    # a failing conversion removes the parents it made only while they are empty: here another
    # conversion finished into the same new parent meanwhile, and its output stays
    real_verify = ckpt_module._verify

    def other_conversion_then_fail(*args):
        real_verify(*args)
        convert_checkpoint(src, tmp_path / "shared" / "b", to="gptq", progress=False)
        raise CheckpointError("verify failed")

    monkeypatch.setattr(ckpt_module, "_verify", other_conversion_then_fail)
    with pytest.raises(CheckpointError, match="verify failed"):
        convert_checkpoint(src, tmp_path / "shared" / "a", to="gptq", verify=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["b"]


_SIDE_DTYPES = [getattr(torch, n) for n in ("complex64", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                              "float8_e8m0fnu") if hasattr(torch, n)]


@pytest.mark.parametrize("dtype", _SIDE_DTYPES, ids=str)
def test_float_tensors_of_every_dtype_safetensors_writes_are_read(tmp_path, dtype):
    """A float tensor in a dtype safetensors writes and reads (C64, the FNUZ float8s, F8_E8M0)
    is part of a valid checkpoint: inspect, convert (copied byte for byte) and load_quantized
    read it, where the header check called the file corrupt."""
    src = tmp_path / "src"
    make_checkpoint(src, "awq")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["extra"] = torch.arange(12, dtype=torch.float32).reshape(4, 3).to(dtype)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert inspect_checkpoint(src)["tensors"] == len(tensors)
    convert_checkpoint(src, tmp_path / "gptq", to="gptq", verify=True, progress=False)
    out = load_file(str(tmp_path / "gptq" / "model.safetensors"))["extra"]
    assert out.dtype == dtype and torch.equal(out.view(torch.uint8), tensors["extra"].view(torch.uint8))
    model = TinyLM()
    model.register_buffer("extra", torch.zeros(4, 3, dtype=dtype))
    load_quantized(model, tmp_path / "gptq")
    assert torch.equal(model.extra.view(torch.uint8), tensors["extra"].view(torch.uint8))


def test_bad_configs_indexes_and_headers_get_checkpoint_errors(tmp_path):
    def fresh(name, shards=1, fmt="awq"):
        folder = tmp_path / name
        make_checkpoint(folder, fmt, shards=shards)
        return folder

    folder = fresh("skip")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="modules_to_not_convert must be a list"):
        load_quantized(TinyLM(), folder)

    folder = fresh("index", shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["embed.weight"] = 5
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="weight_map values must be file names, got 5"):
        inspect_checkpoint(folder)
    index["weight_map"]["embed.weight"] = None  # (null: was taken for "none bad", a TypeError)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="weight_map values must be file names, got None"):
        inspect_checkpoint(folder)

    folder = fresh("index_metadata", shards=2)  # convert rewrites it: was a TypeError there
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["metadata"] = "x"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index.json: metadata must be a JSON object, got 'x'"):
        convert_checkpoint(folder, tmp_path / "index_metadata_out", to="gptq", progress=False)
    assert not (tmp_path / "index_metadata_out").exists()

    folder = fresh("nested", shards=2)  # shards in subfolders: read, but not converted
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / "sub").mkdir()
    for shard in set(index["weight_map"].values()):
        (folder / shard).rename(folder / "sub" / shard)
    index["weight_map"] = {k: f"sub/{v}" for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert inspect_checkpoint(folder)["quantized_layers"] == 4
    with pytest.raises(CheckpointError, match="is not a file of the folder itself"):
        convert_checkpoint(folder, tmp_path / "nested_out", to="gptq", progress=False)

    folder = fresh("narrow", fmt="gptq")  # N = 12: qzeros [K/G, 2] (ceil) look right; N % 8 does not
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.update({"blocks.0.up.qweight": torch.zeros(128 // 8, 12, dtype=torch.int32),
                    "blocks.0.up.qzeros": torch.zeros(128 // G, 2, dtype=torch.int32),
                    "blocks.0.up.scales": torch.ones(128 // G, 12, dtype=torch.float16)})
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="N = 12 output features, not a multiple of 8"):
        convert_checkpoint(folder, tmp_path / "narrow_out", to="awq", progress=False)

    folder = fresh("trailing")  # bytes after the last tensor: safetensors refuses to read it
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match="8 bytes after the last tensor"):
        inspect_checkpoint(folder)


def test_save_quantized_failing_leaves_the_earlier_checkpoint_whole(tmp_path, monkeypatch):
    import safetensors.torch

    from torch_ops.checkpoint import save_quantized

    ids = torch.randint(0, 48, (2, 5))
    torch.manual_seed(0)
    old = torch_ops.quantize_model(TinyLM(), group_size=64)
    save_quantized(old, tmp_path / "c", "awq", max_shard_bytes=100_000)
    before = tree_digest(tmp_path / "c")
    torch.manual_seed(1)
    new = torch_ops.quantize_model(TinyLM(), group_size=64)
    real, calls = safetensors.torch.save_file, []

    def disk_full_on_the_second_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # (safetensors' own error type, naming no file)
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left "
                                              "on device (os error 28)")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_on_the_second_shard)
    shard = re.escape(str(tmp_path / "c" / "model-00002-of-"))
    with pytest.raises(OSError, match=f"save_quantized: cannot write {shard}.*No space"):
        save_quantized(new, tmp_path / "c", "awq", max_shard_bytes=100_000)
    assert tree_digest(tmp_path / "c") == before  # (and no staging folder left)
    with torch.no_grad():
        assert torch.equal(load_quantized(TinyLM(), tmp_path / "c")(ids), old(ids))


def test_save_quantized_failing_removes_the_folders_it_made(tmp_path, monkeypatch):
    """A save into a new folder that fails (a full disk) leaves no empty (or half-written)
    checkpoint folder behind, nor the parents it made; folders that existed before stay."""
    import safetensors.torch

    from torch_ops.checkpoint import save_quantized

    model = torch_ops.quantize_model(TinyLM(), group_size=64)
    real = safetensors.torch.save_file

    def disk_full_on_the_second_shard(tensors, filename, metadata=None):
        if "model-00002-of-" in filename:
            raise OSError(28, "No space left on device")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_on_the_second_shard)
    (tmp_path / "kept").mkdir()
    for target in (tmp_path / "new" / "deeper" / "c", tmp_path / "kept" / "c"):
        with pytest.raises(OSError, match="No space"):
            save_quantized(model, target, "awq", max_shard_bytes=100_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert list((tmp_path / "kept").iterdir()) == []
    # a move into the new folder failing once some files are in: those go too
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    real_replace = os.replace

    def fail_on_the_config(src, dst):
        if str(dst).endswith("config.json"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_the_config)
    with pytest.raises(OSError, match="No space"):
        save_quantized(model, tmp_path / "new" / "c", "awq", max_shard_bytes=100_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


def test_save_quantized_is_exported_beside_load_quantized():
    """``from torch_ops import save_quantized`` raised ImportError: only quantize_model and
    load_quantized were exported, so the save half of the journey lived in torch_ops.checkpoint."""
    assert torch_ops.save_quantized is torch_ops.checkpoint.save_quantized
    assert "save_quantized" in torch_ops.__all__
    # (what they raise, for a loader to catch: the docstrings named it, torch_ops had no such name)
    assert torch_ops.CheckpointError is CheckpointError and "CheckpointError" in torch_ops.__all__



class _HFStyleConfig:
    """What a transformers PretrainedConfig offers save_quantized: to_dict(), not a mapping."""

    def __init__(self, **fields):
        self.fields = fields

    def to_dict(self):
        return dict(self.fields)


def test_save_quantized_takes_a_config_object_and_defaults_to_the_models_config(tmp_path):
    """A transformers model carries its config as ``model.config`` (to_dict(), not a mapping):
    ``config=model.config`` raised "TypeError: 'LlamaConfig' object is not a mapping", and a save
    without ``config`` wrote a config.json holding only quantization_config, which
    transformers' AutoConfig refuses ("Should have a `model_type` key")."""
    torch.manual_seed(0)
    model = torch_ops.quantize_model(TinyLM(), group_size=G)
    model.config = _HFStyleConfig(model_type="llama", hidden_size=128,
                                  quantization_config={"quant_method": "stale"})
    ids = torch.randint(0, 48, (2, 5))
    for name, config in (("object", model.config), ("default", None), ("dict", {"a": 1})):
        torch_ops.save_quantized(model, tmp_path / name, "gptq", config=config)
        written = json.loads((tmp_path / name / "config.json").read_text())
        expected = {"a": 1} if name == "dict" else {"model_type": "llama", "hidden_size": 128}
        assert {k: v for k, v in written.items() if k != "quantization_config"} == expected
        assert written["quantization_config"]["quant_method"] == "gptq"
        assert torch.equal(load_quantized(TinyLM(), tmp_path / name)(ids), model(ids))
    with pytest.raises(TypeError, match="config must be a dict or have to_dict"):
        torch_ops.save_quantized(model, tmp_path / "bad", "gptq", config=["model_type"])


class _TiedLM(TinyLM):
    """A transformers-style model whose lm_head shares the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.lm_head.weight = self.embed.weight

    def get_output_embeddings(self):
        return self.lm_head


@pytest.mark.parametrize("head", ["quantized", "float"])
def test_a_quantized_tied_lm_head_is_untied_in_the_configs(tmp_path, head):
    """quantize_model(skip=()) quantizes a tied lm_head while the embedding stays float, but the
    configs kept tie_word_embeddings true: a loader that ties (transformers' tie_weights, vLLM)
    would put the float embedding in lm_head's place or find no weight to tie. The model's
    config (so save_pretrained's), load_quantized's and save_quantized's now say false, at the
    top and in text_config; a float lm_head keeps the tie. save_quantized also wrote "dtype":
    null for a model made from a config, where save_pretrained writes the model's."""
    def config():
        return {"model_type": "tiny", "tie_word_embeddings": True, "dtype": None,
                "text_config": {"tie_word_embeddings": True}}

    torch.manual_seed(0)
    model = _TiedLM().half()
    model.config = _Config(**config())
    torch_ops.quantize_model(model, group_size=G, skip=() if head == "quantized" else "lm_head")
    tied = head == "float"
    assert isinstance(model.lm_head, QuantLinear) != tied
    assert model.config.tie_word_embeddings is tied
    assert model.config.text_config["tie_word_embeddings"] is tied
    given = config()
    torch_ops.save_quantized(model, tmp_path / "ckpt", "gptq", config=given)
    assert given == config()  # the caller's dict is not changed
    written = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert written["tie_word_embeddings"] is tied
    assert written["text_config"] == {"tie_word_embeddings": tied}
    assert written["dtype"] == "float16"
    assert written["quantization_config"].get("lm_head", False) is not tied
    loaded = _TiedLM().half()
    loaded.config = _Config(**config())
    load_quantized(loaded, tmp_path / "ckpt")
    assert loaded.config.tie_word_embeddings is tied
    ids = torch.randint(0, 48, (2, 5))
    assert torch.equal(loaded(ids), model(ids))
    # another tool's checkpoint whose config still ties its quantized lm_head: convert unties it
    written.update(tie_word_embeddings=True, text_config={"tie_word_embeddings": True})
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(written))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (lm_head in AWQ, serving engines: warned of)
        convert_checkpoint(tmp_path / "ckpt", tmp_path / "awq", to="awq", progress=False)
    converted = json.loads((tmp_path / "awq" / "config.json").read_text())
    assert converted["tie_word_embeddings"] is tied
    assert converted["text_config"] == {"tie_word_embeddings": tied}


class _Rotary(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, dim, 2) / dim),
                             persistent=False)


def test_load_into_meta_model_warns_of_tensors_left_on_meta(tmp_path):
    """A model built under torch.device("meta") (transformers' from_config there) holds derived
    non-persistent buffers (rotary inv_freq) that no checkpoint has: they stayed on meta without
    a word, and the first forward failed with "Cannot copy out of meta tensor; no data!"."""
    torch.manual_seed(0)
    torch_ops.save_quantized(torch_ops.quantize_model(TinyLM(), group_size=G), tmp_path / "c", "awq")
    with torch.device("meta"):
        model = TinyLM()
        model.rotary = _Rotary()
    with pytest.warns(UserWarning, match=r"still on the meta device.*rotary\.inv_freq"):
        load_quantized(model, tmp_path / "c")
    assert not any(t.is_meta for t in model.state_dict().values())
    with warnings.catch_warnings():  # a model built on the CPU: nothing to say
        warnings.simplefilter("error")
        cpu = TinyLM()
        cpu.rotary = _Rotary()
        load_quantized(cpu, tmp_path / "c")


def test_missing_tied_weight_on_meta_hints_at_tie_weights(tmp_path):
    """accelerate's init_empty_weights unties transformers' lm_head from the embedding (its
    register_parameter makes a new meta Parameter): a checkpoint that stores the tied weight once
    then misses lm_head.weight. The error says so and names model.tie_weights()."""
    torch.manual_seed(0)
    model = torch_ops.quantize_model(TinyLM(), group_size=G)
    model.lm_head.weight = model.embed.weight
    torch_ops.save_quantized(model, tmp_path / "c", "gptq")

    class Skeleton(TinyLM):
        def tie_weights(self):
            self.lm_head.weight = self.embed.weight

    with torch.device("meta"):
        skeleton = Skeleton()
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): lm_head\.weight.*"
                       r"tie_weights\(\)"):
        load_quantized(skeleton, tmp_path / "c")
    skeleton.tie_weights()
    load_quantized(skeleton, tmp_path / "c")
    assert skeleton.lm_head.weight is skeleton.embed.weight and not skeleton.embed.weight.is_meta


def test_awq_configs_say_sym_false_and_read_back(tmp_path):
    """transformers' AwqConfig defaults sym to true (it inherits GPTQConfig's), so an AWQ config
    without "sym" became sym=True there, and its save_pretrained wrote "sym": true after
    "zero_point": true, which GPTQModel reads as a symmetric checkpoint (the later key wins).
    AWQ's zero points are stored and used: its configs now say "sym": false."""
    torch.manual_seed(0)
    model = torch_ops.quantize_model(TinyLM(), group_size=G)
    torch_ops.save_quantized(model, tmp_path / "saved", "awq")
    make_checkpoint(tmp_path / "gptq", "gptq")
    convert_checkpoint(tmp_path / "gptq", tmp_path / "converted", to="awq", progress=False)
    ids = torch.randint(0, 48, (2, 5))
    for name in ("saved", "converted"):
        qc = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
        assert qc["sym"] is False and qc["zero_point"] is True and qc["quant_method"] == "awq"
        assert parse_quant_config(qc).method == "awq"
    assert torch.equal(load_quantized(TinyLM(), tmp_path / "saved")(ids), model(ids))


class _GatedBlock(Block):
    def __init__(self, hidden=128, inner=256):
        super().__init__(hidden, inner)
        self.gate = nn.Linear(hidden, 8)  # a router: stays float, inside the block


class _GatedLM(TinyLM):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_GatedBlock(), _GatedBlock()])


def _gptq_loader_quantizes(qc, name):
    """Whether GPTQ loaders would make ``name`` (a Linear inside a block) a quantized layer, by
    the rules they document: transformers/optimum keep a block Linear quantized when its name ends
    with an entry of modules_in_block_to_quantize (all of them without the field); GPTQModel and
    vLLM skip one that a "-:" dynamic pattern matches from its start."""
    keep = qc.get("modules_in_block_to_quantize")
    by_suffix = keep is None or any(name.endswith(k) for k in sum(keep, []))
    skipped = any(p.startswith("-:") and re.match(p[2:], name) for p in qc.get("dynamic") or {})
    return by_suffix, not skipped


def test_gptq_configs_name_float_linears_inside_blocks_for_gptq_loaders(tmp_path):
    """transformers loads GPTQ through optimum, which makes every Linear of the decoder blocks a
    quantized layer unless modules_in_block_to_quantize lists the quantized ones (it ignores
    modules_to_not_convert); GPTQModel's loader reads negative "dynamic" entries. A float router
    inside a block ("blocks.0.gate") was listed in modules_to_not_convert only: those loaders
    would have made it quantized and found no qweight. save_quantized and convert (to GPTQ) now
    write both fields where a block holds a float Linear, and nothing where none does."""
    torch.manual_seed(0)
    model = torch_ops.quantize_model(_GatedLM(), group_size=G, skip=("lm_head", "gate"))
    torch_ops.save_quantized(model, tmp_path / "gptq", "gptq")
    torch_ops.save_quantized(model, tmp_path / "awq", "awq")
    convert_checkpoint(tmp_path / "awq", tmp_path / "converted", to="gptq", zero_format="v2",
                       progress=False)
    ids = torch.randint(0, 48, (2, 5))
    for name in ("gptq", "converted"):
        qc = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
        assert qc["modules_in_block_to_quantize"] == [["down", "up"]]
        for layer in QUANTIZED:
            assert _gptq_loader_quantizes(qc, layer) == (True, True), (name, layer)
        for layer in ("blocks.0.gate", "blocks.1.gate"):
            assert _gptq_loader_quantizes(qc, layer) == (False, False), (name, layer)
        assert torch.equal(load_quantized(_GatedLM(), tmp_path / name)(ids), model(ids))
    # a source config's own dynamic entries are kept, after ours
    qc = json.loads((tmp_path / "converted" / "config.json").read_text())
    qc["quantization_config"]["dynamic"] = {r"+:.*\.up$": {"bits": 4}}
    (tmp_path / "converted" / "config.json").write_text(json.dumps(qc))
    convert_checkpoint(tmp_path / "converted", tmp_path / "again", to="gptq", progress=False)
    dynamic = json.loads((tmp_path / "again" / "config.json").read_text())[
        "quantization_config"]["dynamic"]
    assert list(dynamic) == [r"-:^blocks\.0\.gate$", r"-:^blocks\.1\.gate$", r"+:.*\.up$"]
    # no float Linear inside a block: no such fields (lm_head is outside the blocks)
    plain = torch_ops.quantize_model(TinyLM(), group_size=G)
    torch_ops.save_quantized(plain, tmp_path / "plain", "gptq")
    qc = json.loads((tmp_path / "plain" / "config.json").read_text())["quantization_config"]
    assert "modules_in_block_to_quantize" not in qc and "dynamic" not in qc


def test_float_linear_a_quantized_names_suffix_still_matches_warns(tmp_path):
    """optimum matches modules_in_block_to_quantize as plain suffixes: a float "blocks.0.setup"
    ends with the quantized "up" and would still be loaded as quantized there. Warned of."""
    torch.manual_seed(0)
    model = _GatedLM()
    model.blocks[0].setup = nn.Linear(128, 8)
    model = torch_ops.quantize_model(model, group_size=G, skip=("lm_head", "gate", "setup"))
    with pytest.warns(UserWarning, match=r"would load as quantized: blocks\.0\.setup"):
        torch_ops.save_quantized(model, tmp_path / "gptq", "gptq")


class _Config:
    """A transformers-style config: attributes, to_dict()."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def to_dict(self):
        return dict(self.__dict__)


def _save_pretrained_like(model, folder):
    """What transformers' save_pretrained writes: config.to_dict() and the state dict."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("fmt", ["awq", "gptq-v2"])
def test_quantize_and_load_set_the_models_quantization_config(tmp_path, fmt):
    """transformers sets config.quantization_config when it loads a quantized model; after
    load_quantized (or quantize_model) a model's config had none, so its save_pretrained wrote a
    folder that load_quantized refused ("no quantization_config") and transformers would load as
    float. Both now set a plain dict describing the model's state dict (GPTQ layout, the layers'
    zero format), which reads back to the same model."""
    torch.manual_seed(0)
    model = _GatedLM()
    model.config = _Config(model_type="tiny")
    torch_ops.quantize_model(model, group_size=G, skip=("lm_head", "gate"))
    qc = model.config.quantization_config
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert qc["group_size"] == G and qc["sym"] is False and qc["desc_act"] is False
    assert qc["modules_in_block_to_quantize"] == [["down", "up"]]
    ids = torch.randint(0, 48, (2, 5))
    _save_pretrained_like(model, tmp_path / "pretrained")
    assert torch.equal(load_quantized(_GatedLM(), tmp_path / "pretrained")(ids), model(ids))

    if fmt == "awq":
        torch_ops.save_quantized(model, tmp_path / "ckpt", "awq")
    else:
        torch_ops.save_quantized(model, tmp_path / "ckpt", "gptq", zero_format="v2")
        cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
        cfg["quantization_config"]["meta"] = {"quantizer": ["someone:1.0"]}
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    loaded = _GatedLM()
    loaded.config = _Config(model_type="tiny")
    load_quantized(loaded, tmp_path / "ckpt")
    qc = loaded.config.quantization_config
    assert qc["quant_method"] == "gptq"  # what its state dict holds, AWQ checkpoint or not
    assert qc["checkpoint_format"] == ("gptq" if fmt == "awq" else "gptq_v2")
    assert ("meta" in qc) == (fmt != "awq")  # a GPTQ checkpoint's other fields are kept
    _save_pretrained_like(loaded, tmp_path / "again")
    assert torch.equal(load_quantized(_GatedLM(), tmp_path / "again")(ids), model(ids))


def test_models_without_a_config_object_are_left_alone(tmp_path):
    """Only a config object with to_dict() gets quantization_config: a dict ``config`` or none at
    all is not touched."""
    torch.manual_seed(0)
    model = TinyLM()
    model.config = {"model_type": "tiny"}
    torch_ops.quantize_model(model, group_size=G)
    assert model.config == {"model_type": "tiny"}
    bare = torch_ops.quantize_model(TinyLM(), group_size=G)
    assert not hasattr(bare, "config")


# ---------------------------------------------------------------------- serving engines' configs
def test_config_declares_a_quantized_lm_head(tmp_path):
    """vLLM and SGLang quantize the output embedding only where quantization_config says
    "lm_head": true (GPTQModel's field); without it vLLM refused the checkpoint (no parameter
    lm_head.qweight) and SGLang skipped the tensors and served an uninitialised lm_head.weight.
    Saved and converted configs say it where lm_head is quantized, and only there."""
    torch.manual_seed(0)
    model = torch_ops.quantize_model(TinyLM(vocab=64), group_size=G, sym=True, skip=())
    torch_ops.checkpoint.save_quantized(model, tmp_path / "gptq", "gptq")
    with pytest.warns(UserWarning, match="lm_head quantized"):
        torch_ops.checkpoint.save_quantized(model, tmp_path / "awq", "awq")
    with pytest.warns(UserWarning, match="lm_head quantized"):
        convert_checkpoint(tmp_path / "gptq", tmp_path / "conv-awq", to="awq", progress=False)
    convert_checkpoint(tmp_path / "conv-awq", tmp_path / "conv-gptq", to="gptq", progress=False)
    for name in ("gptq", "awq", "conv-awq", "conv-gptq"):
        qc = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
        assert qc.get("lm_head") is True, name
    ids = torch.randint(0, 64, (2, 5))
    assert torch.equal(load_quantized(TinyLM(vocab=64), tmp_path / "conv-gptq")(ids), model(ids))
    # a float lm_head: no field (nor in a converted GPTQModel config saying false)
    make_checkpoint(tmp_path / "float-head", "gptq", sym=True, config_extra=None)
    convert_checkpoint(tmp_path / "float-head", tmp_path / "float-head-awq", to="awq",
                       progress=False)
    qc = json.loads((tmp_path / "float-head-awq" / "config.json").read_text())
    assert "lm_head" not in qc["quantization_config"]


def test_gptq_config_names_float_layers_in_dynamic(tmp_path):
    """SGLang's GPTQ loader quantizes every Linear but those a GPTQModel `dynamic` "-:" rule
    names (modules_to_not_convert is not read): a float layer inside the quantized blocks got
    GPTQ parameters that no tensor filled (its .weight skipped with a warning), silently. GPTQ
    configs name such layers there, as anchored regexes; lm_head (vLLM and SGLang quantize it
    only by the lm_head field) and embeddings are left out; a source's own rules are kept."""
    torch.manual_seed(0)
    model = torch_ops.quantize_model(TinyLM(), group_size=G, sym=True,
                                     skip=("lm_head", "blocks.0.down"))
    torch_ops.checkpoint.save_quantized(model, tmp_path / "gptq", "gptq")
    torch_ops.checkpoint.save_quantized(model, tmp_path / "awq", "awq")
    convert_checkpoint(tmp_path / "awq", tmp_path / "conv", to="gptq", progress=False)
    for name in ("gptq", "conv"):
        qc = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
        rules = [p[2:] for p in qc["dynamic"] if p.startswith("-:")]
        assert [n for n in ["blocks.0.down", "blocks.1.down", "blocks.0.up", "lm_head", "embed",
                            "xblocks.0.down", "blocks.0.down2"]
                if any(re.match(r, n) for r in rules)] == ["blocks.0.down"], (name, rules)
        assert qc["dynamic"] == {f"-:{rules[0]}": {}}
        ids = torch.randint(0, 48, (2, 5))
        assert torch.equal(load_quantized(TinyLM(), tmp_path / name)(ids), model(ids))
    qc = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert "dynamic" not in qc  # (AWQ loaders read modules_to_not_convert)
    # a GPTQModel source's rules are kept, after ours (ours name layers that are float here)
    src = tmp_path / "gptqmodel"
    make_checkpoint(src, "gptq", sym=True, skip=("blocks.1.down",),
                    config_extra=None)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["dynamic"] = {r"+:.*\.up": {"group_size": G}}
    (src / "config.json").write_text(json.dumps(cfg))
    convert_checkpoint(src, tmp_path / "gptqmodel-v2", to="gptq", zero_format="v2", progress=False)
    qc = json.loads((tmp_path / "gptqmodel-v2" / "config.json").read_text())["quantization_config"]
    assert list(qc["dynamic"]) == [r"-:^blocks\.1\.down$", r"+:.*\.up"]
    # no float layer inside: no field
    make_checkpoint(tmp_path / "plain", "awq", sym=True)
    convert_checkpoint(tmp_path / "plain", tmp_path / "plain-gptq", to="gptq", progress=False)
    qc = json.loads((tmp_path / "plain-gptq" / "config.json").read_text())["quantization_config"]
    assert "dynamic" not in qc


@pytest.mark.parametrize("case", ["asym", "act_order", "group"])
def test_gptq_output_warns_of_what_vllm_and_sglang_refuse(tmp_path, case):
    """vLLM's GPTQ (Marlin) path takes sym=true only and refuses desc_act=true with groups;
    SGLang runs asymmetric GPTQ with no CUDA kernel; Marlin takes group sizes -1/32/64/128.
    save_quantized and convert to GPTQ say so (the checkpoint is written all the same); a
    symmetric, plain GPTQ output says nothing."""
    torch.manual_seed(0)
    group = 256 if case == "group" else G
    model = torch_ops.quantize_model(TinyLM(hidden=256), group_size=group, sym=case != "asym")
    if case == "act_order":
        layer = model.blocks[0].up
        g = layer.to_gptq("v1")
        g_idx = (torch.argsort(torch.randperm(layer.in_features)) // G).to(torch.int32)
        model.blocks[0].up = QuantLinear.from_gptq(g["qweight"], g["qzeros"], g["scales"],
                                                   g_idx=g_idx, bias=g["bias"], group_size=G)
    expected = {"asym": r"sym=false.*vLLM", "act_order": r"desc_act=true.*vLLM",
                "group": r"group_size=256.*Marlin"}[case]
    with pytest.warns(UserWarning, match=expected):
        torch_ops.checkpoint.save_quantized(model, tmp_path / "gptq", "gptq")
    with pytest.warns(UserWarning, match=expected):
        convert_checkpoint(tmp_path / "gptq", tmp_path / "v2", to="gptq", zero_format="v2",
                           progress=False)
    assert (tmp_path / "v2" / "config.json").is_file()
    plain = torch_ops.quantize_model(TinyLM(), group_size=G, sym=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch_ops.checkpoint.save_quantized(plain, tmp_path / "plain", "gptq")
        convert_checkpoint(tmp_path / "plain", tmp_path / "plain2", to="gptq", progress=False)


def test_quantize_model_with_a_second_group_size_drops_the_stale_config(tmp_path):
    """A second quantize_model with another group size left the first's quantization_config on
    model.config (no one config describes two group sizes, so nothing was recorded): it named
    the newly quantized layers as float (modules_to_not_convert, "-:" dynamic rules), and
    save_pretrained wrote that. It is removed now, with a warning."""
    torch.manual_seed(0)
    model = TinyLM()
    model.config = _Config(model_type="tiny")
    torch_ops.quantize_model(model, group_size=64, skip=("lm_head", "blocks.1"))
    assert "blocks.1.up" in model.config.quantization_config["modules_to_not_convert"]
    with pytest.warns(UserWarning, match="quantization_config removed.*several group sizes"):
        torch_ops.quantize_model(model, group_size=128, skip=("lm_head",))
    assert not hasattr(model.config, "quantization_config")
    with warnings.catch_warnings():  # nothing stale to remove: nothing to say
        warnings.simplefilter("error")
        torch_ops.quantize_model(model, group_size=32, skip=("blocks",))


def test_quantize_model_records_no_config_for_a_row_shard():
    """A model holding a row shard of an act-order layer (QuantLinear num_groups=) fits no
    checkpoint (save_quantized refuses it): quantize_model described it as a GPTQ checkpoint,
    which a transformers save_pretrained wrote and load_quantized refused. No config is recorded;
    one left from before is removed with a warning that names the shards."""
    torch.manual_seed(0)
    whole = torch_ops.quantize(torch.randn(128, 384), group_size=128, format="gptq")
    g_idx = (torch.argsort(torch.randperm(384)) // 128).to(torch.int32)

    def model_with_a_shard():
        model = nn.Sequential(OrderedDict(
            shard=QuantLinear.from_gptq(whole["qweight"][:17], whole["qzeros"], whole["scales"],
                                        g_idx=g_idx[:136], group_size=128),
            out=nn.Linear(128, 256)))
        model.config = _Config(model_type="tiny")
        return model

    model = model_with_a_shard()
    assert torch_ops.checkpoint.model_quant_config(model) is None
    with warnings.catch_warnings():  # nothing recorded before: nothing to say
        warnings.simplefilter("error")
        torch_ops.quantize_model(model, group_size=128)
    assert isinstance(model.out, QuantLinear) and not hasattr(model.config, "quantization_config")
    model = model_with_a_shard()
    model.config.quantization_config = {"quant_method": "gptq"}  # (a stale one)
    with pytest.warns(UserWarning, match=r"quantization_config removed: .* row shards"):
        torch_ops.quantize_model(model, group_size=128)
    assert not hasattr(model.config, "quantization_config")


def test_a_config_refusing_quantization_config_with_value_error_is_left_alone():
    """A validating config (pydantic-style) refuses an attribute with ValueError: only
    AttributeError and TypeError were caught, so quantize_model raised after quantizing."""

    class Strict(_Config):
        def __setattr__(self, name, value):
            if name == "quantization_config":
                raise ValueError("quantization_config: not a field of this config")
            super().__setattr__(name, value)

    model = TinyLM()
    model.config = Strict(model_type="tiny")
    assert torch_ops.quantize_model(model, group_size=G) is model
    assert not hasattr(model.config, "quantization_config")
    assert isinstance(model.blocks[0].up, QuantLinear)


def test_save_quantized_still_takes_any_mapping_as_config(tmp_path):
    """Before config objects were taken, ``{**config}`` took any mapping (a MappingProxyType, an
    OmegaConf-like Mapping); the new check took dict only and raised TypeError for them."""
    from types import MappingProxyType

    torch.manual_seed(0)
    model = torch_ops.quantize_model(TinyLM(), group_size=G)
    torch_ops.save_quantized(model, tmp_path / "c", "gptq",
                             config=MappingProxyType({"model_type": "tiny"}))
    written = json.loads((tmp_path / "c" / "config.json").read_text())
    assert written["model_type"] == "tiny" and written["quantization_config"]["quant_method"] == "gptq"


@pytest.mark.parametrize("old_shards", [None, 60000])
@pytest.mark.parametrize("step", range(6))
def test_save_interrupted_while_moving_files_in_leaves_the_earlier_checkpoint(
        tmp_path, monkeypatch, old_shards, step):
    """A save interrupted (Ctrl-C, or SIGTERM a handler raises) between moving its files in left a
    new model.safetensors beside the earlier config.json, or a new config beside the earlier
    index and shards: a folder no loader reads. The earlier checkpoint is put back as it was."""
    from torch_ops import checkpoint

    torch.manual_seed(0)
    folder = tmp_path / "c"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoint.save_quantized(torch_ops.quantize_model(TinyLM(), group_size=G), folder, "awq",
                                  max_shard_bytes=old_shards)
    before = tree_digest(folder)
    real, calls = os.replace, []

    def replace(*args):
        calls.append(args)
        if len(calls) == step + 1:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    model = torch_ops.quantize_model(TinyLM(), group_size=G)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            checkpoint.save_quantized(model, folder, "gptq")
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
    monkeypatch.undo()
    if interrupted:
        assert tree_digest(folder) == before
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            p for p in os.listdir(folder) if not p.startswith("."))
        assert inspect_checkpoint(folder)["format"] == "awq"
    else:
        assert inspect_checkpoint(folder)["format"] == "gptq"
    load_quantized(TinyLM(), folder)


def test_load_into_fused_experts_says_the_layouts_differ(tmp_path):
    """A checkpoint with an MoE's experts one by one (experts.<i>.gate_proj.qweight, as GPTQ and
    AWQ tools write them, and as transformers 5's save_pretrained writes even its own fused
    experts back) loaded into a transformers 5 model, whose experts are 3-D parameters
    (experts.gate_up_proj), raised only "missing tensors ... unexpected tensors ...": two long
    lists, with nothing saying why. The error now says so. (Experts UnfusedExperts computes load:
    tests/test_experts.py; these lack transformers' act_fn and forward.)"""
    class Experts(nn.Module):  # 3-D parameters as transformers 5's MixtralExperts holds them
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(2, 64, 32))
            self.down_proj = nn.Parameter(torch.zeros(2, 32, 32))

    class Block(nn.Module):
        def __init__(self, fused):
            super().__init__()
            self.q_proj = nn.Linear(32, 32)
            self.experts = Experts() if fused else nn.ModuleList(
                nn.ModuleDict({"gate_proj": nn.Linear(32, 32, bias=False),
                               "up_proj": nn.Linear(32, 32, bias=False),
                               "down_proj": nn.Linear(32, 32, bias=False)}) for _ in range(2))

    per_expert = nn.ModuleDict({"layers": nn.ModuleList([Block(False)])})
    torch_ops.quantize_model(per_expert, group_size=32)
    torch_ops.save_quantized(per_expert, tmp_path / "c", "awq")
    fused = nn.ModuleDict({"layers": nn.ModuleList([Block(True)])})
    experts = fused.layers[0].experts
    with pytest.raises(CheckpointError, match=re.escape(
            "layers.0.experts: the checkpoint quantizes this MoE block's experts one by one "
            "(down_proj, gate_proj, up_proj), which the model fuses into 3-D parameters (Experts), "
            "and UnfusedExperts cannot take its place: no act_fn")):
        load_quantized(fused, tmp_path / "c")
    assert type(fused.layers[0].q_proj) is nn.Linear  # (the model as it was)
    assert fused.layers[0].experts is experts
    # float experts one by one (skip=): the keys differ, and the error says why
    per_expert = nn.ModuleDict({"layers": nn.ModuleList([Block(False)])})
    torch_ops.quantize_model(per_expert, group_size=32, skip=["experts"])
    torch_ops.save_quantized(per_expert, tmp_path / "f", "awq")
    with pytest.raises(CheckpointError, match=re.escape(
            "unexpected tensors (6): layers.0.experts.0.down_proj.weight") + ".*" + re.escape(
            "(the checkpoint holds the experts of layers.0.experts one by one, "
            "experts.<i>.<proj>, where the model fuses them into 3-D parameters")):
        load_quantized(fused, tmp_path / "f")
    # other mismatches say nothing of experts
    other = nn.ModuleDict({"layers": nn.ModuleList([Block(False)])})
    del other.layers[0].experts[1]
    with pytest.raises(CheckpointError, match="unexpected tensors") as e:
        load_quantized(other, tmp_path / "c")
    assert "fuses" not in str(e.value)


def test_keys_renamed_as_transformers_renames_them(tmp_path, monkeypatch):
    """transformers 5 moved the language model of its vision-language models under
    model.language_model and the vision tower under model.visual (Qwen2-VL, Llava, Gemma 3...):
    AWQ / GPTQ checkpoints of those models (model.layers.0..., visual...), and what transformers'
    own save_pretrained writes, failed with every tensor missing. load_quantized renames the keys
    as transformers' from_pretrained does (its conversion mapping's renamings, here a stand-in:
    CI has no transformers), where the new name reaches deeper into the model; a model of the
    old layout reads them as they are."""
    import re as re_
    import sys
    import types

    class WeightTransform:
        def __init__(self, source, target):
            self.source, self.target = source, target

        def rename_source_key(self, key):
            new = re_.sub(self.source, self.target, key, count=1)
            return new, (self.source if new != key else None)

    class WeightRenaming(WeightTransform):
        pass

    class WeightConverter(WeightTransform):  # (fuses tensors: not a renaming, never applied)
        pass

    mapping = [WeightRenaming(r"^visual", "model.visual"),
               WeightRenaming(r"^model(?!\.(language_model|visual))", "model.language_model"),
               WeightConverter(r"\.up\.", ".gate_up.")]
    conversion = types.ModuleType("transformers.conversion_mapping")
    conversion.get_model_conversion_mapping = lambda model: mapping
    loading = types.ModuleType("transformers.core_model_loading")
    loading.WeightRenaming = WeightRenaming
    monkeypatch.setitem(sys.modules, "transformers", types.ModuleType("transformers"))
    monkeypatch.setitem(sys.modules, "transformers.conversion_mapping", conversion)
    monkeypatch.setitem(sys.modules, "transformers.core_model_loading", loading)

    def vlm(old):
        language = nn.ModuleDict({"embed": nn.Embedding(48, 64),
                                  "layers": nn.ModuleList([Block(64), Block(64)])})
        visual = nn.ModuleDict({"proj": nn.Linear(64, 64)})
        model = nn.ModuleDict({"model": language, "visual": visual} if old else
                              {"model": nn.ModuleDict({"language_model": language,
                                                       "visual": visual})})
        model.add_module("lm_head", nn.Linear(64, 48, bias=False))
        model.config = _Config(model_type="vlm")
        return model

    old = vlm(old=True)
    torch_ops.quantize_model(old, group_size=32, skip=["lm_head", "visual"])
    torch_ops.save_quantized(old, tmp_path / "old", "awq")
    new = vlm(old=False)
    load_quantized(new, tmp_path / "old")
    layer = new.model.language_model.layers[1].up
    assert isinstance(layer, QuantLinear) and torch.equal(layer.qweight, old.model.layers[1].up.qweight)
    assert torch.equal(new.model.visual.proj.weight, old.visual.proj.weight)
    assert torch.equal(new.lm_head.weight, old.lm_head.weight)
    again = vlm(old=True)  # (its own layout: nothing renamed)
    load_quantized(again, tmp_path / "old")
    assert torch.equal(again.model.layers[0].up.qweight, old.model.layers[0].up.qweight)
    # without transformers, only the built-in block_sparse_moe -> mlp stays: refused by name
    monkeypatch.delitem(sys.modules, "transformers")
    with pytest.raises(CheckpointError, match=r"missing tensors .*model\.language_model\.embed"):
        load_quantized(vlm(old=False), tmp_path / "old")


def test_transformers_vlm_checkpoint_of_the_old_layout_loads(tmp_path):
    """Where transformers is installed (CI has none): a quantized Qwen2.5-VL saved by
    save_pretrained, which writes the old layout (model.layers..., visual...) as AWQ checkpoints
    of it hold, loads into a fresh transformers 5 model with the same logits."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration") or int(
            transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 5 with Qwen2.5-VL not installed")
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=256, hidden_size=256, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=256))
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    torch_ops.quantize_model(model, group_size=32, skip=["lm_head", "visual"])
    ids = torch.randint(0, 200, (1, 10))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "c")
    keys = set(load_file(tmp_path / "c" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.qweight" in keys and "visual.patch_embed.proj.weight" in keys
    fresh = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    load_quantized(fresh, tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, want)
