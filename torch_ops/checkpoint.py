"""Hugging Face style quantized checkpoints: load into a model, convert AWQ <-> GPTQ, inspect.

A checkpoint is a folder with ``config.json`` (its ``quantization_config``, FORMATS.md section 7)
and its weights: the shards ``model.safetensors.index.json`` lists, else ``model.safetensors``,
else every ``*.safetensors`` file. Per
quantized Linear: ``<prefix>.qweight``, ``.qzeros``, ``.scales`` (``.g_idx`` for GPTQ), ``.bias``.

Every error a user can cause (bad or unsupported config, truncated or corrupt file, missing tensor,
act-order to AWQ) is a :class:`CheckpointError` with a one-line message.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
from collections import Counter
from collections.abc import Mapping
import shutil
import stat
import socket
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import _ops
from .reference import group_len
from .module import (_FLOAT_DTYPES, EXPERT_NAMES, QuantLinear, UnfusedExperts, _check_model,
                     _check_zero_format, _v2_zeros_warning, check_dims, checked_g_idx,
                     fused_experts_layout, must_stay_float, name_matches, replace_module,
                     trivial_g_idx, v2_zeros_read_as_v1, weights_read_by_parents,
                     zero_points_all_eight)

__all__ = ["CheckpointError", "QuantConfig", "load_quantized", "convert_checkpoint",
           "inspect_checkpoint", "save_quantized", "read_quant_config"]

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"  # the one weight file of a checkpoint without an index
CONFIG_NAME = "config.json"
# older side files holding the same quantization config (AutoGPTQ, AutoAWQ)
LEGACY_CONFIGS = {"quantize_config.json": "gptq", "quant_config.json": "awq"}
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_REQUIRED = ("qweight", "qzeros", "scales")
_MAX_HEADER = 100 * 1024 * 1024
# the weight files save_quantized writes (and removes when a new save leaves them stale)
_WEIGHTS_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
# Derived buffers that older transformers saved and later ones compute (Llama's rotary inverse
# frequencies, in checkpoints of 2023): transformers ignores them on load, and so do we where
# the model does not hold them, rather than refuse a real checkpoint as "unexpected tensors"
_IGNORED_ON_LOAD = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# every whole-byte dtype safetensors writes and reads back for torch (an unknown one makes the
# header check call a valid file corrupt)
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1,
                "F8_E5M2FNUZ": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4,
                "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, converted or loaded; the message is meant for the user."""


# ---------------------------------------------------------------------- config
@dataclass
class QuantConfig:
    method: str  # "awq" or "gptq"
    bits: int
    group_size: int
    zero_format: str  # GPTQ: "v1" or "v2"; AWQ: "as-is" (zeros stored without offset)
    desc_act: bool = False
    sym: bool | None = False  # GPTQ's sym, AWQ's not zero_point; None: the config does not say
    modules_to_not_convert: list = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    @property
    def loader_zero_format(self) -> str:
        return self.zero_format if self.method == "gptq" else "v1"


def _umask() -> int:
    """The process's umask: from /proc where Linux shows it (setting it to read it, the fallback,
    changes it for a moment for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


_STAGING_PREFIX = ".torch_ops-save-"  # save_quantized's folder inside the checkpoint's, while it writes


def _chmod_ordinary(path: Path) -> None:
    """safetensors' save_file makes private (0600) files: give a written weight file the mode any
    other file gets (0666 less the umask), so that another user's server can read it."""
    os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def _naming_the_file(op: str, path: Path):
    """An error while writing ``path`` (through a staging file) raised as an OSError that names
    it: safetensors raises its own error type with no path, and a full disk's OSError from a
    write names no file either."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:  # (not a programming error's TypeError...)
        message = f"{op}: cannot write {path} ({getattr(e, 'strerror', None) or e})"
        code = getattr(e, "errno", None)
        raise (OSError(code, message) if code else OSError(message)) from None


def _rmtree(path: Path) -> None:
    """Remove a folder we wrote, also where a copied read-only folder (a source's 0555
    tokenizer/) holds files: such folders are made writable and the removal tried again. Only folders
    inside ``path`` are: its parent is not ours (a ``path`` already gone, as a convert's partial
    folder renamed to DST when SIGTERM came, or a save's staging folder another removed, made the
    parent 0700)."""
    def retry(func, p, exc):
        if isinstance(exc[1] if isinstance(exc, tuple) else exc, FileNotFoundError):
            return  # (gone already)
        try:
            if os.path.normpath(p) != os.path.normpath(path):
                os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)
    if path.exists():  # a folder emptied only once its parent was writable: one more pass
        shutil.rmtree(path, ignore_errors=True)


def _partial_prefix(name: str) -> str:
    """the start of the hidden folder convert writes DST ``name`` into, beside it, then renames
    (a short name: DST's own may be near the file system's limit)"""
    return f".{name[:32]}.partial-"


def _pid_space() -> str:
    """this host and pid namespace (containers on one host may share a name and a file system,
    not their pids), as 8 hex digits"""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return f"{zlib.crc32(f'{socket.gethostname()}:{ns}'.encode()):08x}"


# convert's partial folders' and save_quantized's staging folders' names hold _PID_SPACE and the
# writer's pid: one killed by SIGKILL (the OOM killer) could not remove its folder, and one of a
# dead pid here is removed by the next writer beside it; one of a live pid (still writing), or
# of another host or container sharing the file system, is left alone
_PID_SPACE = _pid_space()


def _remove_dead_writers(parent: Path, prefix: str) -> None:
    """remove the folders in ``parent`` named ``{prefix}{pid}-...`` (prefix ending in this
    _PID_SPACE) whose pid is dead: convert's partial folders, save_quantized's staging folders"""
    try:
        entries = list(parent.iterdir())
    except OSError:  # a parent we may write into but not list (0733, a drop box): nothing to do
        return
    for p in entries:
        pid = p.name[len(prefix):].partition("-")[0]
        # (ASCII digits only: str.isdigit takes "²", which int() refuses, and "١٢", which it reads)
        if not (p.name.startswith(prefix) and pid.isascii() and pid.isdigit() and p.is_dir()) or (
                p.is_symlink()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _rmtree(p)
        except (OSError, OverflowError):  # alive under another user (EPERM), or not a pid
            pass


def _writer_folder(parent: Path, prefix: str) -> Path:
    """a new folder ``{prefix}{_PID_SPACE}-{pid}-...`` in ``parent`` for this writer to fill, after
    removing the ones of dead writers with that prefix (convert's partial folders, save_quantized's
    staging folders)"""
    _remove_dead_writers(parent, f"{prefix}{_PID_SPACE}-")
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{_PID_SPACE}-{os.getpid()}-", dir=parent))


def _checked_path(where: str, arg: str, path) -> Path:
    """``path`` as a Path; TypeError naming the function and the argument unless it is a str or an
    os.PathLike: None raised Path()'s own "expected str, bytes or os.PathLike object, not
    NoneType", naming neither."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: {arg} must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _is_file(path: Path) -> bool:
    """path.is_file(), but CheckpointError for a link to nothing: is_file() is False there, and a
    checkpoint's file that was a dangling link (a Hugging Face cache snapshot copied without its
    blobs) was taken for absent: "no quantization_config", "no *.safetensors files", or a
    checkpoint of the other files (a shard left out, converted without it)."""
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"{path}: a link to {os.readlink(path)}, which does not exist")
    return path.is_file()


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # (nesting past the parser's depth)
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _config_bool(qc: dict, key: str, default: bool, where) -> bool:
    """A boolean field: true/false (None or missing: ``default``), and also the strings "true" /
    "false" (any case) and the integers 0 / 1 that hand-written configs hold. bool("false") is
    True, so anything else is refused rather than read as true."""
    value = qc.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise CheckpointError(f"{where}: {key} must be true or false, got {value!r}")


def _config_int(qc: dict, keys: tuple, where):
    """An integer field under the first of ``keys`` (its AutoAWQ name second) that is set, as
    it is (the caller checks its range), but a string of an integer ("4", "-1"), which
    hand-written configs hold, read as that integer; any other string is refused. None where
    no key is set."""
    key = next((k for k in keys if qc.get(k) is not None), keys[0])
    value = qc.get(key)
    if isinstance(value, float) and value.is_integer():  # (128.0: bits 4.0 passed, this did not)
        return int(value)
    if not isinstance(value, str):
        return value
    if re.fullmatch(r"\s*[-+]?[0-9]+\s*", value):
        return int(value)
    raise CheckpointError(f"{where}: {key} must be an integer, got {value!r}")


def parse_quant_config(qc: dict, where: str = "quantization_config") -> QuantConfig:
    """Normalise an AWQ or GPTQ ``quantization_config`` (CheckpointError if unsupported)."""
    # GPTQModel's own name is "method" ("quant_method" its deprecated alias, written beside it)
    method = str(qc.get("quant_method") or qc.get("method") or "").lower()
    if not method:
        method = "awq" if ("w_bit" in qc or "version" in qc or "zero_point" in qc) else (
            "gptq" if ("desc_act" in qc or "checkpoint_format" in qc) else "")
    if method not in ("awq", "gptq"):
        raise CheckpointError(f"{where}: unsupported quant_method "
                              f"{qc.get('quant_method') or qc.get('method')!r} "
                              "(supported: awq, gptq)")
    bits = _config_int(qc, ("bits", "w_bit"), where)
    if bits != 4:
        raise CheckpointError(f"{where}: unsupported bits={bits!r} (only 4-bit is supported)")
    group_size = _config_int(qc, ("group_size", "q_group_size"), where)
    if (not isinstance(group_size, int) or isinstance(group_size, bool)
            or not (group_size == -1 or group_size > 0)):
        raise CheckpointError(f"{where}: group_size must be -1 or a positive integer, "
                              f"got {group_size!r}")
    skip = qc.get("modules_to_not_convert") or []
    if isinstance(skip, str):
        skip = [skip]
    if not isinstance(skip, list) or not all(isinstance(n, str) for n in skip):
        raise CheckpointError(f"{where}: modules_to_not_convert must be a list of module names, "
                              f"got {qc.get('modules_to_not_convert')!r}")
    pack_dtype = qc.get("pack_dtype")
    if pack_dtype is not None and str(pack_dtype).lower().removeprefix("torch.") != "int32":
        # GPTQModel's pack_dtype: qweight / qzeros packed in words of that type (int16: [K/4, N])
        raise CheckpointError(f"{where}: unsupported pack_dtype {pack_dtype!r} (qweight and "
                              "qzeros packed in int32 words only)")
    if method == "awq":
        # the tensor layout: AutoAWQ and transformers name it "version", GPTQModel also "format"
        # and "checkpoint_format" (same value); a layout only "format" names (gemv_fast,
        # llm-awq, marlin) was read as gemm
        if str(qc.get("backend") or "").lower() == "llm-awq":
            # transformers' AwqConfig reads backend "llm-awq" as llm-awq's layout (int16
            # qweight, scaled_zeros), whatever the version says
            raise CheckpointError(f"{where}: unsupported AWQ backend 'llm-awq' (llm-awq's "
                                  "tensor layout; only AutoAWQ's 'gemm' is supported)")
        for key in ("version", "format", "checkpoint_format"):
            if qc.get(key) is not None and str(qc[key]).lower() != "gemm":
                raise CheckpointError(f"{where}: unsupported AWQ {key} {qc[key]!r} "
                                      "(only 'gemm' is supported: other AWQ versions keep "
                                      "their tensors in other layouts)")
        # zero_point=false (GPTQModel's AWQ with sym=True, its default): a GEMM layer still
        # stores qzeros (all 8), which its kernels read as stored; so do we. (AutoAWQ writes
        # zero_point=false only with version "marlin", refused above.)
        sym = not _config_bool(qc, "zero_point", True, where)
        return QuantConfig("awq", 4, group_size, "as-is", False, sym, list(skip), dict(qc))
    if _config_bool(qc, "is_marlin_format", False, where):
        # AutoGPTQ's Marlin checkpoints: tensors B and s in Marlin's tiled layout, no qweight
        raise CheckpointError(f"{where}: is_marlin_format=true (AutoGPTQ's Marlin layout, "
                              "tensors B and s) is not supported; only the GPTQ layout is")
    # GPTQModel writes both names and reads "format" first, transformers reads
    # "checkpoint_format": where they disagree the loaders read different zeros (v1 or v2).
    # Their case does not matter (GPTQModel lowercases them)
    named = {k: str(qc[k]).lower() for k in ("checkpoint_format", "format") if qc.get(k)}
    if len(set(named.values())) > 1:
        raise CheckpointError(f"{where}: checkpoint_format {qc['checkpoint_format']!r} and "
                              f"format {qc['format']!r} disagree (loaders read one or the "
                              "other); set both to the format of the qzeros")
    fmt = next(iter(named.values()), "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{where}: unsupported GPTQ checkpoint_format {fmt!r} "
                              "(supported: gptq, gptq_v2)")
    return QuantConfig("gptq", 4, group_size, "v2" if fmt == "gptq_v2" else "v1",
                       _config_bool(qc, "desc_act", False, where),
                       _config_bool(qc, "sym", None, where), list(skip),
                       dict(qc))


def _quantized_folder(folder: Path) -> tuple[dict, QuantConfig]:
    """read_quant_config of a folder that must hold a quantized checkpoint; CheckpointError
    saying what is missing (a folder without config.json was said to have one "with no
    quantization_config")."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: " + ("not a folder" if folder.exists() else
                                               "no such file or folder"))
    config, qc = read_quant_config(folder)
    if qc is None:
        if not _is_file(folder / CONFIG_NAME):
            raise CheckpointError(f"{folder}: no {CONFIG_NAME} (nor {', '.join(LEGACY_CONFIGS)}): "
                                  "not a quantized checkpoint")
        raise CheckpointError(f"{folder}: {CONFIG_NAME} has no quantization_config (not "
                              "quantized)")
    return config, qc


def read_quant_config(folder) -> tuple[dict, QuantConfig | None]:
    """(config.json contents, its QuantConfig), falling back to quantize_config.json (AutoGPTQ)
    or quant_config.json (AutoAWQ); QuantConfig is None for a checkpoint that is not quantized."""
    folder = _checked_path("read_quant_config", "folder", folder)
    config = _load_json(folder / CONFIG_NAME) if _is_file(folder / CONFIG_NAME) else {}
    qc = config.get("quantization_config")
    where = f"{folder / CONFIG_NAME}: quantization_config"
    if qc is None:
        for name, method in LEGACY_CONFIGS.items():
            if _is_file(folder / name):
                qc, where = _load_json(folder / name), folder / name
                if not (qc.get("quant_method") or qc.get("method")):
                    qc = {"quant_method": method, **qc}
                break
    if qc is None:
        return config, None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    return config, parse_quant_config(qc, where)


def quant_config_dict(method: str, group_size: int, zero_format: str = "v1", desc_act: bool = False,
                      sym: bool = False, modules_to_not_convert=None) -> dict:
    """The ``quantization_config`` entry this project writes for AWQ ("gemm") or GPTQ.

    AWQ's says ``"sym": false`` (its zero points are stored and used): transformers' AwqConfig
    defaults sym to true, and writes that true back beside ``zero_point`` on save_pretrained,
    which GPTQModel then reads as symmetric (the later key wins there)."""
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                "sym": False, "version": "gemm",
                "modules_to_not_convert": modules_to_not_convert or None}
    qc = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act,
          "sym": sym, "checkpoint_format": "gptq_v2" if zero_format == "v2" else "gptq"}
    if modules_to_not_convert:
        qc["modules_to_not_convert"] = modules_to_not_convert
    return qc


_BLOCK_NAME = re.compile(r"^(.+?\.\d+)\.(.+)$")  # "<blocks>.<i>.<name in the block>"


def _loader_fields(qc: dict, quantized, float_layers, what: str, stacklevel: int,
                   dynamic=None) -> dict:
    """``qc`` with the fields loaders other than ours need to tell quantized layers from float
    ones (``quantized``: the quantized layers' names; ``float_layers``: the float Linears',
    embeddings allowed). Read from transformers 5.25 (through optimum), GPTQModel 7.7, vLLM 0.34
    and SGLang 0.5.23:
    - ``"lm_head": true`` where lm_head is quantized: vLLM and SGLang quantize the output layer
      only by that field (without it vLLM refused the checkpoint, SGLang served an
      uninitialised lm_head.weight);
    - GPTQ: a negative ``dynamic`` rule ("-:" and the anchored full name) per float layer but
      lm_head and embeddings, ahead of ``dynamic`` (a source config's own rules, kept):
      GPTQModel, vLLM and SGLang skip what such a rule matches, and SGLang's GPTQ loader reads
      no modules_to_not_convert (a float layer got GPTQ parameters no tensor filled);
    - GPTQ with float Linears inside decoder blocks (``<blocks>.<i>.<name>``, an MoE router):
      ``modules_in_block_to_quantize``, the quantized layers' names in a block, without which
      transformers quantizes every Linear of the blocks (it ignores modules_to_not_convert and
      matches these names as suffixes: a float layer a listed name still ends is warned of)."""
    if any(name_matches(p, "lm_head") for p in quantized):
        qc["lm_head"] = True
    if qc.get("quant_method") != "gptq":
        return qc
    rules = {f"-:^{re.escape(n)}$": {} for n in sorted(set(float_layers))
             if not name_matches(n, "lm_head") and "embed" not in n.rpartition(".")[2]}
    if isinstance(dynamic, dict):
        rules.update({k: v for k, v in dynamic.items() if k not in rules})
    if rules:
        qc["dynamic"] = rules
    in_block = sorted(n for n in set(float_layers) if _BLOCK_NAME.match(n))
    if in_block:
        keep = sorted({m.group(2) for m in map(_BLOCK_NAME.match, quantized) if m})
        caught = [n for n in in_block if any(n.endswith(k) for k in keep)]
        if caught:
            warnings.warn(f"{what}: float layers inside decoder blocks whose names end with the "
                          "name of a quantized one, which transformers' GPTQ loader (optimum's "
                          "modules_in_block_to_quantize, matched as name suffixes) would load as "
                          "quantized: " + _ops._first_few(caught),
                          stacklevel=stacklevel)
        qc["modules_in_block_to_quantize"] = [keep]
    return qc


def _over_source(base: dict, qc: dict) -> dict:
    """``qc`` (a config this project made) over the other fields of ``base``, the source's config
    of the same method (GPTQModel's meta, damp_percent...), less its
    ``modules_in_block_to_quantize`` (ours is recomputed, or none is needed); a GPTQ source's
    ``format`` (newer GPTQModel's name for checkpoint_format) follows ours."""
    out = {**{k: v for k, v in base.items() if k != "modules_in_block_to_quantize"}, **qc}
    if "format" in base and out.get("quant_method") == "gptq":
        out["format"] = out["checkpoint_format"]
    return out


def model_quant_config(model: nn.Module, dynamic=None) -> dict | None:
    """The GPTQ ``quantization_config`` of what ``model.state_dict()`` holds: its QuantLinear layers
    in the GPTQ layout, qzeros in their ``checkpoint_zero_format``, as ``save_quantized(model,
    format="gptq")`` would describe them (sym and desc_act from the layers, the float Linears in
    ``modules_to_not_convert``). None where the model has no QuantLinear, layers of several
    group sizes or zero formats (no one config describes them), or a row shard of an act-order
    layer (no checkpoint holds one: save_quantized refuses it). ``dynamic``: a config's own
    GPTQModel entries, kept."""
    layers = {id(m): m for m in model.modules() if isinstance(m, QuantLinear)}.values()
    sizes = {m.group_size for m in layers}
    formats = {m.checkpoint_zero_format for m in layers}
    if len(sizes) != 1 or len(formats) != 1 or any(m.row_shard for m in layers):
        return None
    quantized = {id(m) for m in layers}
    names = [n for n, m in model.named_modules(remove_duplicate=False) if id(m) in quantized]
    skip = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    qc = quant_config_dict("gptq", sizes.pop(), formats.pop(), any(m.act_order for m in layers),
                           all(m.symmetric for m in layers), skip)
    with warnings.catch_warnings():  # (save_quantized warns; a description need not)
        warnings.simplefilter("ignore")
        return _loader_fields(qc, names, skip, "", 1, dynamic)


def _output_embedding_quantized(model: nn.Module) -> bool:
    """Whether the model's output embedding (transformers' ``get_output_embeddings()``, else
    Linears named lm_head) is a QuantLinear."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        out = get() if callable(get) else None
    except Exception:  # (a model whose method needs what it lacks: fall back to the name)
        out = None
    if isinstance(out, nn.Module):
        return isinstance(out, QuantLinear)
    return any(isinstance(m, QuantLinear) and name_matches(n, "lm_head")
               for n, m in model.named_modules())


def _untie_quantized_head(model: nn.Module, config) -> None:
    """_untie(config) where the model's output embedding is quantized."""
    if _output_embedding_quantized(model):
        _untie(config)


def _untie(config) -> None:
    """Set ``tie_word_embeddings`` false in ``config`` (a dict or a config object) and in its
    ``text_config``, where they say true, for a quantized output embedding: the float embedding
    no longer is lm_head's weight, and a loader that ties them (transformers' ``tie_weights``,
    vLLM) would put the float embedding in lm_head's place or find no weight to tie to the
    quantized one. A dict's text_config is replaced by a copy (a caller's nested dict stays as
    it was)."""
    if isinstance(config, dict):
        text = config.get("text_config")
        if isinstance(text, Mapping):
            config["text_config"] = text = dict(text)
    else:
        text = getattr(config, "text_config", None)
    for c in (config, text):
        if isinstance(c, dict):
            if c.get("tie_word_embeddings"):
                c["tie_word_embeddings"] = False
        elif getattr(c, "tie_word_embeddings", False):
            try:
                c.tie_word_embeddings = False
            except Exception:  # (a config refusing the attribute: left as it is)
                pass


def _record_quant_config(model: nn.Module, base: dict | None = None) -> None:
    """Set ``model.config.quantization_config`` (a plain dict) to :func:`model_quant_config`, as
    transformers does on loading a quantized model, where the model has a config object with
    ``to_dict()`` (a transformers PretrainedConfig): its ``save_pretrained`` then writes a folder
    that load_quantized and GPTQ loaders read as quantized, not as float. ``base``: a GPTQ
    checkpoint's own config, whose other fields (GPTQModel's meta, lm_head...) are kept. Nothing
    is changed where the config refuses the attribute (whatever it raises); where no one config
    describes the model (layers of several group sizes or zero formats), a quantization_config
    it had (describing it before) is removed, with a warning."""
    config = getattr(model, "config", None)
    if isinstance(config, dict) or not callable(getattr(config, "to_dict", None)):
        return
    qc = model_quant_config(model, (base or {}).get("dynamic"))
    if qc is None:
        # (a stale config, kept, was written by save_pretrained: e.g. a second quantize_model
        # with another group size left the first's, naming the new QuantLinears as float)
        if getattr(config, "quantization_config", None) is not None:
            try:
                del config.quantization_config
            except Exception:
                pass
            why = ("hold row shards of act-order layers (num_groups=), which no checkpoint "
                   "holds" if any(isinstance(m, QuantLinear) and m.row_shard
                                  for m in model.modules()) else
                   "have several group sizes or zero formats, which no one quantization_config "
                   "describes")
            warnings.warn(f"model.config.quantization_config removed: the model's QuantLinear "
                          f"layers {why}", stacklevel=3)
        return
    if base:
        qc = _over_source(base, qc)
    _untie_quantized_head(model, config)
    try:
        config.quantization_config = qc
    except Exception:  # (a validating config refuses with ValueError: the load itself succeeded)
        pass


# ---------------------------------------------------------------------- safetensors files
def read_safetensors_header(path: Path) -> tuple[dict, dict]:
    """({name: (dtype, shape, nbytes)}, __metadata__) of a safetensors file, checking that every
    tensor's bytes lie inside the file (a truncated or corrupt file raises CheckpointError)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file "
                                      f"({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(claims {n} bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("__metadata__ must map names to strings")
        data_len = size - 8 - n
        tensors, spans = {}, []
        for name, info in header.items():
            dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            if not all(type(v) is int and v >= 0 for v in (*shape, start, end)):
                raise ValueError(f"bad shape or offsets for {name}")
            numel = 1
            for d in shape:
                numel *= d
            if dtype not in _DTYPE_BYTES or end - start != numel * _DTYPE_BYTES[dtype]:
                raise ValueError(f"bad entry for {name}")
            if not start <= end <= data_len:
                raise CheckpointError(f"{path}: truncated: tensor {name} needs bytes up to {end} "
                                      f"of the data section, the file holds {data_len}")
            tensors[name] = (dtype, shape, end - start)
            spans.append((start, end))
        # as safetensors itself requires: the tensors tile the data section, no gap, no overlap
        covered = 0
        for start, end in sorted(spans):
            if start != covered:
                raise ValueError(f"tensor data {'overlaps' if start < covered else 'has a gap'} "
                                 f"at byte {min(start, covered)}")
            covered = end
        if covered != data_len:
            raise ValueError(f"{data_len - covered} bytes after the last tensor")
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    return tensors, meta


class Checkpoint:
    """The safetensors side of a checkpoint folder (or a single file): which tensor lives in which
    shard, shapes and dtypes from the headers, and tensors read on demand."""

    def __init__(self, path):
        path = Path(path)
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointError(f"{str(path)!r}: the path is not valid UTF-8, which safetensors "
                                  "cannot open; rename it") from None
        self.path = path
        self.index = None
        if _is_file(path):
            self.folder, shards = path.parent, [path]
        elif path.is_dir():
            self.folder = path
            if (path / INDEX_NAME).is_file():  # (one to nothing: the files below, as transformers)
                self.index = _load_json(path / INDEX_NAME)
                weight_map = self.index.get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise CheckpointError(f"{path / INDEX_NAME}: no weight_map")
                bad = [v for v in weight_map.values() if not isinstance(v, str)]
                if bad:  # (a list: a bad value may be None itself)
                    raise CheckpointError(f"{path / INDEX_NAME}: weight_map values must be file "
                                          f"names, got {bad[0]!r}")
                metadata = self.index.get("metadata")
                if metadata is not None and not isinstance(metadata, dict):
                    raise CheckpointError(f"{path / INDEX_NAME}: metadata must be a JSON object, "
                                          f"got {metadata!r}")
                # (an absolute name or ../ led load and inspect out of the folder, to whatever
                # file it named; convert refused it. Names, not resolved paths: a Hugging Face
                # cache snapshot's shards are links into ../../blobs)
                outside = [s for s in weight_map.values() if os.path.isabs(s) or
                           os.path.normpath(s).split(os.sep)[0] in ("..", ".")]
                if outside:
                    raise CheckpointError(f"{path / INDEX_NAME}: shard {outside[0]!r} is not a "
                                          "file inside the checkpoint folder")
                shards = [path / s for s in dict.fromkeys(weight_map.values())]
            elif _is_file(path / WEIGHTS_NAME):
                # as transformers reads it: other .safetensors files are side files (Mistral
                # repos ship consolidated.safetensors, the same tensors in their own names)
                shards = [path / WEIGHTS_NAME]
            else:
                shards = sorted(p for p in path.glob("*.safetensors") if _is_file(p))
            if not shards:
                raise CheckpointError(f"{path}: no *.safetensors files")
        else:
            raise CheckpointError(f"{path}: no such file or folder")
        self.shards = shards
        self.headers, self.metadata, self.shard_of = {}, {}, {}
        for shard in shards:
            if not _is_file(shard):
                raise CheckpointError(f"{shard}: listed in {INDEX_NAME} but missing")
            self.headers[shard], self.metadata[shard] = read_safetensors_header(shard)
            for key in self.headers[shard]:
                if key in self.shard_of:
                    raise CheckpointError(f"{self.folder}: tensor {key} is in both "
                                          f"{self.shard_of[key].name} "
                                          f"and {shard.name}")
                self.shard_of[key] = shard
        if self.index is not None:
            for key, shard in self.index["weight_map"].items():
                if self.shard_of.get(key) != self.folder / shard:
                    raise CheckpointError(f"{self.folder / INDEX_NAME}: maps {key} to {shard}, "
                                          "but that file does not hold it")
        self._open = {}
        self._file_key = {}  # renamed key -> its key in the file (rename)

    def keys(self):
        return self.shard_of.keys()

    def rename(self, renamed: dict) -> None:
        """Hold the tensors of ``renamed`` ({key in the files: name to use}) under their new
        names (the files unchanged: reads go to the old key)."""
        for shard in {self.shard_of[old] for old in renamed}:
            self.headers[shard] = {renamed.get(k, k): v for k, v in self.headers[shard].items()}
        for old, new in renamed.items():
            self.shard_of[new] = self.shard_of.pop(old)
            self._file_key[new] = self._file_key.pop(old, old)

    def shape(self, key) -> list:
        return self.headers[self.shard_of[key]][key][1]

    def nbytes(self) -> int:
        return sum(h[2] for hdr in self.headers.values() for h in hdr.values())

    def tensor(self, key) -> torch.Tensor:
        from safetensors import safe_open  # imported here: only file I/O paths need it

        shard = self.shard_of[key]
        try:
            if shard not in self._open:
                self._open[shard] = safe_open(str(shard), framework="pt", device="cpu")
            return self._open[shard].get_tensor(self._file_key.get(key, key))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{shard}: cannot read tensor {key} ({e})") from None

    def close(self):
        self._open.clear()

    def quantized_prefixes(self) -> list:
        return [k[: -len(".qweight")] for k in self.keys() if k.endswith(".qweight")]

    def layer(self, prefix) -> dict:
        """{suffix: tensor} of one layer's quantized tensors (qweight, qzeros, scales, g_idx)."""
        missing = [f"{prefix}.{s}" for s in _REQUIRED if f"{prefix}.{s}" not in self.shard_of]
        if missing:
            raise CheckpointError(f"missing tensors: {', '.join(missing)}")
        return {s: self.tensor(f"{prefix}.{s}") for s in QUANT_SUFFIXES
                if f"{prefix}.{s}" in self.shard_of}


def _missing_layer_tensors(ckpt: Checkpoint, prefixes) -> list:
    return [f"{p}.{s}" for p in prefixes for s in _REQUIRED if f"{p}.{s}" not in ckpt.shard_of]


def _gptq_zeros_bits(zeros_cols: int, N: int) -> int | None:
    """The width whose GPTQ qzeros have ``zeros_cols`` words a row for N output features
    (ceil(N*b/32)), 4 where widths tie; None for none. A GPTQ layer of another width has the
    qweight [ceil(K*b/32), N] and scales [K/G, N] of a 4-bit layer with another K: only qzeros
    tells the widths apart."""
    return next((b for b in (4, 2, 3, 8) if zeros_cols == -(-N * b // 32)), None)


def _not_4bit(prefix: str, zeros_cols: int, N: int, bits: int | None) -> CheckpointError:
    what = (f"a{'n' if bits == 8 else ''} {bits}-bit GPTQ layer (4-bit has {N // 8})"
            if bits is not None else "not a 4-bit layer")
    return CheckpointError(f"{prefix}: qzeros has {zeros_cols} columns for N = {N}: {what}; "
                           "checkpoints are 4-bit only")


def _check_layers(ckpt: Checkpoint, where, prefixes, qc: QuantConfig | None = None) -> None:
    """CheckpointError unless every layer of ``prefixes`` has qweight, qzeros and scales, in
    shapes and dtypes that fit ``qc``'s layout (qc None: presence only). Headers only: no tensor
    is read."""
    missing = _missing_layer_tensors(ckpt, prefixes)
    if missing:
        raise CheckpointError(f"{where}: missing tensors: {', '.join(missing)}")
    for p in prefixes if qc is not None else ():
        _layer_dims(ckpt, p, qc)


def _dynamic_rule(qc: QuantConfig, name: str):
    """(pattern, overrides) of the GPTQModel ``dynamic`` rule that decides layer ``name``: the
    first whose regex (less its "+:" / "-:") matches the name from its start, as GPTQModel picks
    it; None where none does, a negative one decides, or the config has no such rules."""
    dynamic = qc.raw.get("dynamic")
    if not isinstance(dynamic, dict):
        return None
    for pattern, overrides in dynamic.items():
        if not isinstance(pattern, str):
            continue
        negative = pattern.startswith("-:")
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        try:
            if re.match(raw, name) is None:
                continue
        except re.error:
            continue  # (a pattern Python's re cannot read: left to the shape checks)
        return None if negative or not isinstance(overrides, dict) else (pattern, overrides)
    return None


def _check_dynamic(prefix: str, qc: QuantConfig) -> None:
    """CheckpointError where the config's ``dynamic`` rule for this layer gives it another width
    or group size than the config's own (GPTQModel's per-layer overrides): every layer is read
    with the config's group_size and as 4-bit, and such a layer was refused only by a shape
    error (qzeros of another shape) that did not say why."""
    rule = _dynamic_rule(qc, prefix)
    if rule is None:
        return
    pattern, overrides = rule
    changed = []
    if overrides.get("bits") is not None and str(overrides["bits"]).strip() != str(qc.bits):
        changed.append(f"bits={overrides['bits']!r}")
    if overrides.get("group_size") is not None and (
            str(overrides["group_size"]).strip() != str(qc.group_size)):
        changed.append(f"group_size={overrides['group_size']!r}")
    if changed:
        raise CheckpointError(
            f"{prefix}: the config's dynamic rule {json.dumps(pattern)} gives this layer "
            f"{', '.join(changed)} (the config: bits={qc.bits}, group_size={qc.group_size}); "
            "per-layer overrides of bits or group_size are not supported")


def _layer_dims(ckpt: Checkpoint, prefix: str, qc: QuantConfig) -> tuple[int, int]:
    """(K, N) of a quantized layer from its headers, after checking that the shapes and dtypes of
    qweight, qzeros, scales (and g_idx) fit the config's layout, so that errors name the tensor.
    A layer the config's ``dynamic`` rules give another width or group size is refused."""
    _check_dynamic(prefix, qc)
    header = ckpt.headers

    def info(suffix):
        key = f"{prefix}.{suffix}"
        return header[ckpt.shard_of[key]][key]

    dtype, shape, _ = info("qweight")
    if len(shape) != 2 or dtype != "I32":
        raise CheckpointError(f"{prefix}.qweight must be a 2-D int32 tensor, got {dtype} {shape}")
    rows, cols = shape
    K, N = (rows, cols * 8) if qc.method == "awq" else (rows * 8, cols)
    if K == 0 or N == 0:
        raise CheckpointError(f"{prefix}.qweight {shape} is empty")
    if N % 8:
        raise CheckpointError(f"{prefix}: N = {N} output features, not a multiple of 8 (4-bit "
                              "qzeros pack 8 columns a word; such layers are not supported)")
    if K % 8:  # (AWQ's qweight has a row per k; GPTQ's K is 8 per row)
        # (inspect reported such a layer as fine, which convert and load_quantized then refused)
        raise CheckpointError(f"{prefix}: K = {K} input features, not a multiple of 8 (the GPTQ "
                              "qweight the kernels run packs 8 rows of K a word; such layers are "
                              "not supported)")
    if f"{prefix}.scales" in ckpt.shard_of and info("scales")[1][-1:] != [N]:
        raise CheckpointError(
            f"{prefix}: qweight {shape} and scales {info('scales')[1]} do not fit the "
            f"{qc.method.upper()} layout the config names (qweight [K, N/8] for AWQ, [K/8, N] for "
            "GPTQ, scales [K/G, N])")
    if qc.method == "gptq" and f"{prefix}.qzeros" in ckpt.shard_of:
        zeros_shape = info("qzeros")[1]
        bits = _gptq_zeros_bits(zeros_shape[-1], N) if len(zeros_shape) == 2 else None
        if bits not in (4, None):  # (a shape that fits no width: the message below names it)
            raise _not_4bit(prefix, zeros_shape[-1], N, bits)
    G = group_len(K, qc.group_size)
    layout = (f"{qc.method.upper()} layout with K={K}, N={N}, group_size={qc.group_size}")
    if K % G:
        raise CheckpointError(f"{prefix}.qweight {shape} gives K={K}, not a multiple of "
                              f"group_size={qc.group_size}")
    expected = {"qzeros": ([K // G, N // 8], ("I32",)),
                "scales": ([K // G, N], ("F16", "BF16", "F32")),
                "g_idx": ([K], ("I32", "I64"))}
    for suffix, (exp_shape, dtypes) in expected.items():
        if f"{prefix}.{suffix}" not in ckpt.shard_of:
            continue
        dtype, shape, _ = info(suffix)
        if shape != exp_shape or dtype not in dtypes:
            raise CheckpointError(f"{prefix}.{suffix} is {dtype} {shape}, expected "
                                  f"{'/'.join(dtypes)} {exp_shape} for qweight {[rows, cols]} "
                                  f"in the {layout}")
    if (qc.method == "gptq" and K // G > 1 and f"{prefix}.g_idx" not in ckpt.shard_of
            and _layer_desc_act(qc, prefix)):
        # (read in plain group order, an act-order layer's weights came out wrong, silently)
        raise CheckpointError(f"{prefix}: the config says desc_act=true (act-order) but the layer "
                              "has no g_idx: which group each row of K belongs to is unknown")
    return K, N


def _layer_desc_act(qc: QuantConfig, prefix: str) -> bool:
    """Whether GPTQ layer ``prefix`` has act-order groups (a g_idx other than arange(K) // G):
    the config's desc_act, or its ``dynamic`` rule's for the layer; static_groups (GPTQModel,
    AutoGPTQ) keeps the groups in order under desc_act."""
    rule = _dynamic_rule(qc, prefix)
    overrides = rule[1] if rule is not None else {}
    where = f"quantization_config (layer {prefix})"
    return (_config_bool(overrides, "desc_act", qc.desc_act, where)
            and not _config_bool(overrides, "static_groups",
                                 _config_bool(qc.raw, "static_groups", False, where), where))


# ---------------------------------------------------------------------- loading into a model
def _state_tensors(model: nn.Module) -> dict:
    """{state_dict key: tensor} without building the state dict (what state_dict() would list)."""
    out = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        p = f"{mname}." if mname else ""
        for n, t in m._parameters.items():
            if t is not None:
                out[p + n] = t
        for n, t in m._buffers.items():
            if t is not None and n not in m._non_persistent_buffers_set:
                out[p + n] = t
    return out


def load_quantized(model: nn.Module, path) -> nn.Module:
    """Load a quantized checkpoint folder into ``model`` (built with float ``nn.Linear`` layers).

    Every ``nn.Linear`` the checkpoint quantizes (it has ``<name>.qweight``: the tensors decide,
    not ``modules_to_not_convert``, whose entries loaders match in different ways) becomes a :class:`QuantLinear` (one Linear under several
    names, once, under all of them); the others stay float, and one tied to a tensor the checkpoint
    holds (an ``lm_head`` sharing the embedding) needs no tensor of its own. A fused MoE experts
    module (transformers 5's 3-D ``gate_up_proj`` / ``down_proj``) whose experts the checkpoint
    quantizes one by one (``experts.<i>.gate_proj.qweight``..., or Mixtral's w1 / w3 / w2)
    becomes an :class:`UnfusedExperts` of QuantLinear layers. Keys of an older layout of a
    transformers model are renamed as its from_pretrained renames them (its conversion mapping's
    renamings: the ``model.language_model`` and ``model.visual`` of vision-language models,
    Mixtral's ``block_sparse_moe``, now ``mlp``, which is also renamed without transformers)
    where the new name reaches deeper into the model (errors name them so). Then the quantized
    layers are loaded, shard by shard, and the float tensors after them (cast into the model's
    parameters). A model built on the meta device is loaded with ``assign=True``: float tensors
    take the dtype its parameters had, and tied parameters are tied again; tensors no checkpoint
    holds (non-persistent buffers: a rotary ``inv_freq``) stay on meta, with a warning naming
    them. Missing or unexpected
    tensors, float tensors of another shape, different values under two names of one tied
    tensor, a quantized layer that must stay float (an attention's ``out_proj``, a Linear
    subclass with a ``forward`` of its own: see ``quantize_model``) and values a layer refuses
    (g_idx out of range) raise CheckpointError with the model as it was (except for the tensors
    of QuantLinear layers it held already: those are loaded in place; their
    ``checkpoint_zero_format`` is put back). A shard that cannot be read once the float tensors
    load leaves the model partly loaded. Per-layer ``rotary_emb.inv_freq`` tensors, which older
    transformers saved, are ignored where the model does not hold them (as transformers does).

    A model with a config object with ``to_dict()`` (a transformers model) gets
    ``model.config.quantization_config``, a plain dict, as transformers sets it when it loads a
    quantized model: the GPTQ config of what ``model.state_dict()`` now holds (GPTQ layout, v1
    zeros for an AWQ checkpoint; a GPTQ checkpoint's own other fields kept), so that its
    ``save_pretrained`` writes a folder that this function and GPTQ loaders read back; its
    ``tie_word_embeddings`` becomes false where lm_head is now quantized.

    A GPTQ v1 checkpoint whose layers' qzeros are all 0x88888888 (v2 zeros under a v1 label, see
    ``torch_ops.checkpoint._warn_v2_zeros``) loads as its config says, with a warning naming the
    layers."""
    _check_model(model, "load_quantized")
    folder = _checked_path("load_quantized", "path", path)
    config, qc = _quantized_folder(folder)
    ckpt = Checkpoint(folder)
    renamed = _renamed_to_model(model, ckpt.keys())
    if renamed:
        ckpt.rename(renamed)
    keys = set(ckpt.keys())
    qprefixes = set(ckpt.quantized_prefixes())

    replaced = []  # (name, original module): put back if the checkpoint does not fit
    biased = []  # QuantLinear layers held without a bias, given one below: taken off again
    formats = []  # (held QuantLinear, its checkpoint_zero_format), set below: put back
    try:
        try:
            # fused MoE experts the checkpoint holds one by one: QuantLinear layers of their own
            _unfuse_experts(model, qprefixes, keys, qc, replaced)
            # a Linear shared by several names (tied) is one layer: quantized when the checkpoint
            # holds qweight under any of its names, then every name gets the same QuantLinear
            names_of, read_by_parents = {}, weights_read_by_parents(model)
            for name, m in model.named_modules(remove_duplicate=False):
                if isinstance(m, (nn.Linear, QuantLinear)):
                    names_of.setdefault(id(m), (m, []))[1].append(name)
            layers = []  # (module, its names)
            for m, names in names_of.values():
                if not any(n in qprefixes for n in names):
                    continue  # stored unquantized (lm_head), or tied to a float tensor: stays float
                reason = None if isinstance(m, QuantLinear) else must_stay_float(m, read_by_parents)
                if reason is not None:  # (quantize_model leaves these float)
                    raise CheckpointError(
                        f"{next(n for n in names if n in qprefixes)}: the checkpoint quantizes "
                        f"this layer, but it is {reason}; a QuantLinear cannot take its place")
                layers.append((m, names))
                for name in names:
                    if name in qprefixes and f"{name}.scales" in keys:
                        K, N = _layer_dims(ckpt, name, qc)
                        if (K, N) != (m.in_features, m.out_features):
                            raise CheckpointError(
                                f"{name}: the checkpoint holds a {K}->{N} layer, the model a "
                                f"{m.in_features}->{m.out_features} one")
            quant_names = [name for _, names in layers for name in names]
            owner = {f"{name}.{s}": name for name in quant_names  # loaded layer by layer
                     for s in QUANT_SUFFIXES + ("bias",) if f"{name}.{s}" in keys}
            for m, names in layers:
                if isinstance(m, QuantLinear):
                    if m.group_size != qc.group_size:
                        raise CheckpointError(f"{names[0]}: QuantLinear has group_size="
                                              f"{m.group_size}, the checkpoint {qc.group_size}")
                    if m.bias is None and any(f"{n}.bias" in keys for n in names):
                        # AutoGPTQ's zero bias, kept as for a Linear below
                        m.bias = torch.zeros(m.out_features, dtype=m.scales.dtype,
                                             device=m.qweight.device)
                        biased.append(m)
                    continue
                try:
                    check_dims(m.in_features, m.out_features, qc.group_size, what=names[0])
                except ValueError as e:
                    raise CheckpointError(str(e)) from None
                # AutoGPTQ writes a (zero) bias for every layer, also where the model has none:
                # keep it
                bias = m.bias is not None or any(f"{n}.bias" in keys for n in names)
                new = QuantLinear(m.in_features, m.out_features, bias=bias,
                                  group_size=qc.group_size, dtype=torch.float16,
                                  device=m.weight.device).train(m.training)  # (as quantize_model)
                for name in names:
                    replace_module(model, name, new)
                    replaced.append((name, m))
            expected = _state_tensors(model)
            _check_keys(folder, ckpt, keys, expected, quant_names, owner,
                        callable(getattr(model, "tie_weights", None)))
            _check_tied_values(folder, ckpt, keys, expected, owner)
            formats = [(m, m.checkpoint_zero_format) for m, _ in layers
                       if isinstance(m, QuantLinear)]
            for name in quant_names:
                model.get_submodule(name).checkpoint_zero_format = qc.loader_zero_format
            assign = any(t.is_meta for t in expected.values())
            # safetensors' tensors map the file: what assign keeps must be a copy, else the model
            # is a view of the checkpoint (a file rewritten in place changes it, or, truncated,
            # ends the process with SIGBUS)
            read = (lambda key: ckpt.tensor(key).clone()) if assign else ckpt.tensor
            # the quantized layers first, the float tensors after them: a value a layer refuses
            # (g_idx out of range) then finds every other tensor of the model as it was
            need = Counter(owner.values())
            pending = {}
            v2_zeros = []  # layers whose v1 qzeros are all 0x88888888 (checked as they load)
            check_zeros = qc.method == "gptq" and qc.zero_format == "v1"
            for shard in ckpt.shards:
                for key in ckpt.headers[shard]:
                    name = owner.get(key)
                    if name is not None:
                        group = pending.setdefault(name, {})
                        group[key[len(name) + 1:]] = read(key)
                        if len(group) == need[name]:  # a layer's tensors may span shards
                            group = pending.pop(name)
                            if check_zeros and v2_zeros_read_as_v1(group["qzeros"]):
                                v2_zeros.append(name)
                            # (the layer's own warning off: one below names the folder)
                            with _v2_zeros_warning(False):
                                model.get_submodule(name).load_state_dict(group, assign=assign)
        except CheckpointError:
            raise  # (already names the folder)
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{folder}: {' '.join(str(e).split())}") from None
    except BaseException:  # (any: an interrupt too leaves the model as it was)
        for name, m in replaced:
            replace_module(model, name, m)
        for m in biased:
            m.bias = None
        for m, zero_format in formats:  # (else a later state_dict() writes the failed load's)
            m.checkpoint_zero_format = zero_format
        ckpt.close()
        raise
    try:  # (shapes checked above: only a read can fail here)
        for shard in ckpt.shards:
            plain = {key: ckpt.tensor(key) for key in ckpt.headers[shard]
                     if key not in owner and key in expected}  # (not the ignored ones)
            if assign:  # assign keeps the checkpoint's dtype, where copying in would cast
                plain = {key: _owned_like(t, expected[key]) for key, t in plain.items()}
            if plain:
                model.load_state_dict(plain, strict=False, assign=assign)
        if assign:
            _restore_ties(model, expected, keys)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: {' '.join(str(e).split())}") from None
    finally:
        ckpt.close()
    if assign:
        _warn_left_on_meta(model)
    _warn_v2_zeros("load_quantized", folder, config, v2_zeros, len(quant_names), stacklevel=3)
    _record_quant_config(model, qc.raw if qc.method == "gptq" else None)
    return model


# modules transformers 5 renamed (old name, new name), for when its own renamings are not at hand
# (_transformers_renamings): Mixtral's, PhiMoE's and MiniMax's block_sparse_moe is now their mlp
_MODULE_RENAMES = (("block_sparse_moe", "mlp"),)


def _is_transformers_model(model: nn.Module) -> bool:
    """transformers is loaded and ``model`` has a config object (a transformers model)"""
    return "transformers" in sys.modules and callable(
        getattr(getattr(model, "config", None), "to_dict", None))


def _apply_renamings(name: str, renamings) -> str:
    """``name`` through each of transformers' WeightRenaming ``renamings`` in turn (one of
    another form skipped)"""
    for renaming in renamings:
        try:
            name = renaming.rename_source_key(name)[0]
        except Exception:
            pass
    return name


def _transformers_renamings(model: nn.Module) -> list:
    """transformers' renamings of checkpoint keys for ``model``, as its from_pretrained applies
    them (the WeightRenaming entries of ``get_model_conversion_mapping``: Mixtral's
    block_sparse_moe -> mlp, the language_model / visual prefixes of its vision-language models,
    LayerNorm.gamma...), where ``model`` is a transformers model; [] otherwise, or where this
    transformers has no such API."""
    if not _is_transformers_model(model):
        return []
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        return [c for c in get_model_conversion_mapping(model) if isinstance(c, WeightRenaming)]
    except Exception:
        return []


def _checkpoint_renaming(model: nn.Module):
    """A function from ``model``'s key names to those its checkpoints hold, as transformers'
    save_pretrained writes them (its revert_weight_conversion: the model's renamings reversed,
    Mixtral's mlp -> block_sparse_moe, the vision-language models' prefixes...); the identity for
    other models, or where this transformers has no such API. save_quantized wrote the names the
    model holds in memory: a Mixtral checkpoint vLLM refuses ("There is no module or parameter
    named 'model.layers.0.mlp'"), whose save_pretrained wrote block_sparse_moe."""
    if not _is_transformers_model(model):
        return lambda name: name
    try:
        from transformers.core_model_loading import PrefixChange, WeightRenaming

        conversions = getattr(model, "_weight_conversions", None)
        if conversions is None:  # (as save_pretrained: no legacy renaming, no prefix change)
            from transformers.conversion_mapping import get_model_conversion_mapping

            conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                           if not isinstance(c, PrefixChange)]
        renamings = [r for r in (c.reverse_transform() for c in conversions[::-1])
                     if isinstance(r, WeightRenaming)]
    except Exception:
        return lambda name: name
    return functools.partial(_apply_renamings, renamings=renamings)


def _renamed_to_model(model: nn.Module, keys) -> dict:
    """{checkpoint key: the model's name for it} for the keys that an older layout of the model
    names otherwise: renamed by transformers' renamings (_transformers_renamings), else by
    _MODULE_RENAMES, where the new name reaches deeper into the model's modules than the key
    does (``layers.0.block_sparse_moe.experts.0.w1.qweight`` -> ``layers.0.mlp.experts.0.w1
    .qweight`` where the model has ``layers.0.mlp.experts`` and no ``layers.0.block_sparse_moe``).
    A key the model holds as it is, one the checkpoint holds under both names, and two keys of
    one new name stay as they are (the key check names the last two)."""
    modules = {name for name, _ in model.named_modules(remove_duplicate=False)}

    def depth(key):  # components of the longest module path key starts with
        parts = key.split(".")
        return max((i for i in range(1, len(parts)) if ".".join(parts[:i]) in modules), default=0)

    held = _state_tensors(model).keys()
    renamings = _transformers_renamings(model)
    renamed = {}
    for key in keys:
        if key in held:  # (the model's own name: kept)
            continue
        parts = _apply_renamings(key, renamings).split(".")
        for old, new in _MODULE_RENAMES:
            parts = [new if p == old else p for p in parts[:-1]] + parts[-1:]
        name = ".".join(parts)
        if name != key and name not in keys and depth(name) > depth(key):
            renamed[key] = name
    taken = Counter(renamed.values())
    return {k: v for k, v in renamed.items() if taken[v] == 1}


def _unfuse_experts(model: nn.Module, qprefixes, keys, qc: QuantConfig, replaced: list) -> None:
    """Put an UnfusedExperts in the place of each fused MoE experts module of ``model``
    (transformers 5's 3-D gate_up_proj and down_proj) whose experts the checkpoint quantizes one
    by one (``<name>.<i>.gate_proj.qweight``..., or Mixtral's w1 / w3 / w2), as GPTQ and AWQ
    tools write them: QuantLinear layers of the checkpoint's group size on the module's device,
    zeros until the load fills them. Each (name, fused module) goes to ``replaced`` as it is
    replaced, to be put back if the load fails; CheckpointError where the module's layout or the
    experts' names are not ones UnfusedExperts computes."""
    projs = {}  # fused module's name -> the projection names the checkpoint holds under it
    for prefix in qprefixes:
        m = _EXPERT_LAYER.match(prefix)
        if m:
            projs.setdefault(m.group(1), set()).add(m.group(2))
    done = {}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        layout = fused_experts_layout(m)
        if layout is None or name not in projs:
            continue
        names = next((n for n in EXPERT_NAMES if set(n) == projs[name]), None)
        if isinstance(layout, str) or names is None:
            raise CheckpointError(
                f"{name}: the checkpoint quantizes this MoE block's experts one by one "
                f"({', '.join(sorted(projs[name]))}), which the model fuses into 3-D parameters "
                f"({type(m).__name__}), and UnfusedExperts cannot take its place: "
                + (layout if isinstance(layout, str) else
                   "the projections are not named " + " or ".join(
                       "/".join(n) for n in EXPERT_NAMES)))
        if id(m) not in done:
            E, H, I, _ = layout
            bias = any(f"{name}.{e}.{p}.bias" in keys for e in range(E) for p in names)
            dims = ((H, I), (H, I), (I, H))  # (in, out) of gate, up, down
            device = m.gate_up_proj.device
            done[id(m)] = UnfusedExperts(
                [[QuantLinear(k, n, bias=bias, group_size=qc.group_size, dtype=torch.float16,
                              device=device) for k, n in dims] for _ in range(E)],
                m.act_fn, names).train(m.training)
        replace_module(model, name, done[id(m)])
        replaced.append((name, m))


_EXPERT_LAYER = re.compile(r"^(.*)\.[0-9]+\.([^.]+)$")


def _warn_v2_zeros(what: str, folder, config: dict, layers: list, total: int,
                   stacklevel: int, then: str = "") -> None:
    """Warn of GPTQ ``layers`` (of ``total`` quantized ones) under a v1 config whose qzeros are
    all 0x88888888 (``v2_zeros_read_as_v1``): v2 zeros saved under a v1 label, the trap of a model
    re-saved from transformers/optimum or GPTQModel, whose kernels take v2 zeros and which convert
    v1 ones in memory. Read as v1 they are zero points of 9 and every weight is off by one scale.
    Nothing is corrected: the user decides, by the config key parse_quant_config honours."""
    if not layers:
        return
    folder = Path(folder)
    # where read_quant_config found the config: config.json's, else a side file (AutoGPTQ's)
    source = (f"{CONFIG_NAME}'s quantization_config" if config.get("quantization_config")
              is not None else next((name for name in LEGACY_CONFIGS if _is_file(folder / name)),
                                    "the config"))
    warnings.warn(
        f"{what}: {folder}: {len(layers)} of {total} quantized layers (the first: {layers[0]}) "
        "hold GPTQ qzeros whose every word is 0x88888888, a zero point of 9 in every nibble as "
        "the config's GPTQ v1 format reads them. v1 stores z - 1, so a symmetric checkpoint "
        "holds 0x77777777; these look like v2 zeros (z = 8) saved under a v1 label (a model "
        "re-saved by transformers/optimum or GPTQModel, which hold v2 zeros in memory), and read "
        "as v1 every weight of these layers is off by one scale. If so, set "
        f"\"checkpoint_format\": \"gptq_v2\" in {source} (the key read first; where it also "
        f"has a \"format\" key, GPTQModel's, set that to \"gptq_v2\" too){then}",
        UserWarning, stacklevel=stacklevel)


def _warn_left_on_meta(model: nn.Module) -> None:
    """Warn of tensors a model built on the meta device still holds there after the load: the
    non-persistent buffers no checkpoint has (transformers' rotary ``inv_freq``, computed at
    construction). They stayed there without a word and the first forward failed with
    "Cannot copy out of meta tensor; no data!"."""
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        warnings.warn(f"load_quantized: {len(left)} tensor(s) are still on the meta device, "
                      f"not being in the checkpoint (non-persistent buffers): "
                      f"{_ops._first_few(left)}; the model cannot "
                      "run until they are computed. Build it with accelerate's "
                      "init_empty_weights() (parameters on meta, buffers real) or recompute them",
                      stacklevel=3)


def _owned_like(t: torch.Tensor, model_tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (not a view of the file), a float one in the dtype of the model's tensor
    (a meta tensor has one too)."""
    if t.is_floating_point() and model_tensor.is_floating_point():
        return t.to(model_tensor.dtype, copy=True)
    return t.clone()


def _restore_ties(model: nn.Module, expected: dict, keys) -> None:
    """After a load with assign=True, which puts a new tensor under the one key of a tied tensor
    the checkpoint holds (embed.weight): every other name of it (lm_head.weight), else left on
    meta, gets that same tensor again. ``expected``: the model's tensors before the load."""
    names_of = {}
    for key, t in expected.items():
        names_of.setdefault(id(t), []).append(key)
    for names in names_of.values():
        loaded = next((k for k in names if k in keys), None)
        if len(names) < 2 or loaded is None:
            continue
        mname, _, attr = loaded.rpartition(".")
        tensor = getattr(model.get_submodule(mname), attr)
        for key in names:
            mname, _, attr = key.rpartition(".")
            setattr(model.get_submodule(mname), attr, tensor)


def _check_keys(folder, ckpt: Checkpoint, keys, expected: dict, quant_names, owner: dict,
                can_tie: bool = False):
    """CheckpointError unless the checkpoint holds every tensor of the model (``expected``, its
    quantized layers replaced), no other (a layer's g_idx optional), and each float tensor in
    the model's shape. ``can_tie``: the model has transformers' ``tie_weights()``, which a
    skeleton built under accelerate's init_empty_weights needs before the load (there its
    lm_head is a meta Parameter of its own, not the embedding's), named where the missing
    tensors are all on meta."""
    # (a QuantLinear the model holds already lists its act-order g_idx: a checkpoint without
    # one loads too, and the layer leaves act-order)
    optional = {f"{n}.g_idx" for n in quant_names}
    present_ids = {id(t) for k, t in expected.items() if k in keys}
    missing = sorted(k for k, t in expected.items()  # tied: one key is enough
                     if k not in keys and k not in optional and id(t) not in present_ids)
    unexpected = sorted(k for k in keys - expected.keys() - optional
                        if not _IGNORED_ON_LOAD.search(k))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
            if can_tie and all(expected[k].is_meta for k in missing):
                parts[-1] += (" (on the meta device: tied weights a checkpoint stores once? "
                              "accelerate's init_empty_weights unties them; call "
                              "model.tie_weights() before load_quantized)")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
        raise CheckpointError(f"{folder}: checkpoint does not match the model: "
                              + "; ".join(parts) + _fused_experts_hint(missing, unexpected,
                                                                       expected))
    shapes = []
    for key in sorted(keys & expected.keys()):
        if key not in owner:
            shape = ckpt.headers[ckpt.shard_of[key]][key][1]
            if list(shape) != list(expected[key].shape):
                shapes.append(f"{key} {list(shape)} (the model's: {list(expected[key].shape)})")
    if shapes:
        raise CheckpointError(f"{folder}: tensors of another shape than the model's: "
                              + ", ".join(shapes))


_EXPERT_KEY = re.compile(r"^(.*\.experts)\.[0-9]+\.")


def _fused_experts_hint(missing, unexpected, expected: dict) -> str:
    """Where the checkpoint holds an MoE's experts one by one (``<x>.experts.<i>.<proj>.*``) as
    float tensors (quantized ones load: _unfuse_experts) and the model fuses them into 3-D
    parameters (``<x>.experts.gate_up_proj``, as transformers 5 builds Mixtral, Qwen2/3-MoE and
    others): a sentence saying so, which the two lists of names left to be worked out."""
    per_expert = {m.group(1) for k in unexpected if (m := _EXPERT_KEY.match(k))}
    fused = sorted(p for p in per_expert
                   if any(k.startswith(p + ".") and expected[k].dim() >= 3 for k in missing))
    if not fused:
        return ""
    return (f" (the checkpoint holds the experts of {fused[0]}"
            + (f" and {len(fused) - 1} more MoE block(s)" if len(fused) > 1 else "")
            + " one by one, experts.<i>.<proj>, where the model fuses them into 3-D parameters,"
            " as transformers 5 builds MoE models: load_quantized puts layers of their own in"
            " the fused module's place for quantized experts only, and maps no float tensors"
            " between the two layouts)")


def _check_tied_values(folder, ckpt: Checkpoint, keys, expected: dict, owner: dict) -> None:
    """CheckpointError where the checkpoint holds several names of one tied tensor (lm_head.weight
    and embed.weight of a model that shares them; a shared layer's qweight under two names) with
    different values: all would load into the one tensor, and the last would win, silently.
    Equal values are fine: a float tensor compared as the model would hold it (in its dtype),
    a quantized layer's as stored."""
    names_of = {}
    for key, t in expected.items():
        if key in keys:
            names_of.setdefault(id(t), []).append(key)
    for names in names_of.values():
        if len(names) < 2:
            continue
        dtype = expected[names[0]].dtype

        def value(key):
            t = ckpt.tensor(key)
            return t if key in owner else t.to(dtype)
        first = value(names[0])
        for key in names[1:]:
            t = value(key)
            # (bit for bit: a tensor written twice under two names has the same bytes; NaN too)
            if (t.dtype != first.dtype or t.shape != first.shape or not torch.equal(
                    t.reshape(-1).view(torch.uint8), first.reshape(-1).view(torch.uint8))):
                raise CheckpointError(
                    f"{folder}: {names[0]} and {key} are one tied tensor in the model, but the "
                    "checkpoint holds different values under the two names")


# ---------------------------------------------------------------------- saving from a model
def _config_dict(model: nn.Module, config) -> dict:
    """save_quantized's ``config`` as a dict: a dict as it is, an object's ``to_dict()`` (what
    transformers' configs offer: they are not mappings, and ``{**config}`` raised "'LlamaConfig'
    object is not a mapping"), and for None the model's own ``config.to_dict()`` where it has
    one (else config.json held quantization_config alone, which AutoConfig refuses for want
    of model_type)."""
    if config is None:
        config = getattr(model, "config", None)
        if not callable(getattr(config, "to_dict", None)):
            return {}
    if not isinstance(config, Mapping):  # (any mapping, as {**config} took before)
        to_dict = getattr(config, "to_dict", None)
        config = to_dict() if callable(to_dict) else config
        if not isinstance(config, Mapping):
            raise TypeError("save_quantized: config must be a dict or have to_dict() (a "
                            f"transformers config), got {type(config).__name__}")
    return dict(config)


def save_quantized(model: nn.Module, path, format: str = "awq", zero_format: str = "v1",
                   max_shard_bytes: int | None = None, config=None) -> None:
    """Write ``model`` (with QuantLinear layers) as a checkpoint folder in AWQ or GPTQ format:
    config.json (``config`` plus quantization_config) and model.safetensors, or shards of at most
    ``max_shard_bytes`` with model.safetensors.index.json. Float tensors are written as they are; a
    tensor or QuantLinear shared by several names is written once, under the first. The weight
    files of an earlier save into the same folder that this one does not overwrite are removed;
    other files there are left alone. ``sym`` is recorded true when every zero point is 8. A save
    that fails or is interrupted (Ctrl-C, SIGTERM raised as an exception) leaves an earlier
    checkpoint in the folder whole, and removes the folders it made; one killed by SIGKILL while
    it moves its files in may leave a mix of both: save again.
    ``config`` is a dict or an object with ``to_dict()`` (a transformers ``PretrainedConfig``);
    None takes ``model.config.to_dict()`` where the model has one (a transformers model: its
    AutoConfig needs ``model_type``), else writes quantization_config alone. Configs say
    ``"lm_head": true`` where lm_head is quantized, and ``"tie_word_embeddings": false`` where
    they said true (the float embedding is no longer lm_head's weight); a ``dtype`` (or
    ``torch_dtype``) the config leaves None is written as the model's, as save_pretrained does.
    GPTQ configs name every float Linear but lm_head in a negative ``dynamic`` entry
    (``"-:^name$"``, read by GPTQModel, vLLM and SGLang) and, where decoder blocks (``<blocks>.<i>.<name>``) hold one (an MoE router), list the
    quantized ones in ``modules_in_block_to_quantize`` (transformers); a GPTQ config vLLM or
    SGLang would refuse (asymmetric, act-order, another group size) is warned of. AWQ configs
    say ``"sym": false``. A transformers model's keys and layer names are written as its
    save_pretrained writes them (its key renamings reversed: Mixtral's ``block_sparse_moe``
    where transformers 5 holds ``mlp``), the layout vLLM and GPTQ / AWQ tools read. A row shard
    of an act-order layer (``QuantLinear(num_groups=...)``) is refused: checkpoints hold whole
    layers."""
    from safetensors.torch import save_file

    _check_model(model, "save_quantized")
    if format not in ("awq", "gptq"):
        raise ValueError(f"save_quantized: format must be 'awq' or 'gptq', got {format!r}")
    # (checked for AWQ too, which ignored it; as GPTQ to_gptq refused it under a layer's name,
    # with the hint for an act-order layer)
    _check_zero_format(zero_format, "save_quantized: zero_format")
    folder = _checked_path("save_quantized", "path", path)  # (before any work is done)
    if max_shard_bytes is not None:
        # (a str, as transformers' max_shard_size="5GB", raised TypeError "'>' not supported"
        # naming nothing; a negative size wrote every tensor into a shard of its own)
        max_shard_bytes = _ops._int("save_quantized", "max_shard_bytes", max_shard_bytes)
        if max_shard_bytes <= 0:
            raise ValueError("save_quantized: max_shard_bytes must be a positive number of bytes "
                             f"(or None: one file), got {max_shard_bytes}")
    config = _config_dict(model, config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("save_quantized: the model has no QuantLinear layer")
    _untie_quantized_head(model, config)
    # the dtype save_pretrained writes (its model.dtype: the first float parameter's), where the
    # config leaves it None (a model made from a config): loaders read None as float32
    floats = [t.dtype for t in model.parameters() if t.is_floating_point()]
    for key in ("dtype", "torch_dtype"):
        if key in config and config[key] is None and floats:
            config[key] = str(floats[0]).removeprefix("torch.")
    # a row shard's tensors (qweight [K_shard/8, N] beside the whole layer's scales) fit no
    # checkpoint layout: written as GPTQ they made a folder that load_quantized, convert, inspect
    # and other GPTQ loaders refuse (K not a multiple of group_size, or scales of other groups)
    shards = [f"{n} (in_features={m.in_features}, num_groups={m.num_groups})"
              for n, m in layers.items() if m.row_shard]
    if shards:
        raise ValueError(
            f"save_quantized: {', '.join(shards)}: row shard(s) of an act-order layer; a "
            "checkpoint holds whole layers (qweight [K/8, N], scales [K/G, N]), which no loader "
            "reads a shard's tensors as. Save the model holding the whole layers (or each rank's "
            "state_dict() with torch.save)")
    # scales or bias of another float dtype (model.double() makes them float64, as it does every
    # module's floats) were written as they were: a folder that load_quantized refused ("scales
    # is F64 [4, 128], expected F16/BF16/F32"), as GPTQ and AWQ loaders elsewhere do
    wide = [f"{n}.{k} ({t.dtype})" for n, m in layers.items() for k in ("scales", "bias")
            if (t := getattr(m, k)) is not None and t.dtype not in _FLOAT_DTYPES]
    if wide:
        raise ValueError(
            f"save_quantized: {', '.join(wide)}: a checkpoint's scales and bias are float16, "
            "bfloat16 or float32, the dtypes load_quantized and other loaders read (and the "
            "4-bit ops compute with); convert the model with .half(), .bfloat16() or .float() "
            "before saving it")
    sizes = {m.group_size for m in layers.values()}
    if len(sizes) != 1:
        raise ValueError(f"save_quantized: layers use several group sizes {sorted(sizes)}")
    quantized = {id(m) for m in layers.values()}
    owned = {f"{n}.{k}" for n, m in model.named_modules(remove_duplicate=False)
             if id(m) in quantized for k in (*m._parameters, *m._buffers)}
    tensors, seen = {}, set()
    for key, t in _state_tensors(model).items():
        if key in owned or id(t) in seen:
            continue  # quantized layers come below; a tied tensor is written once
        seen.add(id(t))
        tensors[key] = t.detach()
    act_order, sym = False, True
    for name, m in layers.items():  # a layer shared by several names: once, as tied tensors are
        try:
            exported = m.to_awq() if format == "awq" else m.to_gptq(zero_format)
        except ValueError as e:  # (an act-order layer as AWQ: the message names the layer)
            raise ValueError(f"save_quantized: {name}: {e} (save_quantized(..., format='gptq') "
                             "keeps act-order)") from None
        act_order |= m.act_order
        sym &= m.symmetric
        tensors.update({f"{name}.{s}": t for s, t in exported.items()})
    # the names checkpoints of this model hold (save_pretrained's), for tensors and layers alike
    # (a layer's name as its weight's key: the renamings match keys)
    rename = _checkpoint_renaming(model)
    renamed = {rename(k): k for k in tensors}
    if len(renamed) == len(tensors):  # (two keys of one new name: kept as the model names them)
        tensors = {new: tensors[k] for new, k in renamed.items()}
    else:
        rename = lambda name: name  # noqa: E731
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}

    def layer_name(name):
        return rename(name + ".weight").removesuffix(".weight")

    skip = sorted(layer_name(n) for n, m in model.named_modules() if isinstance(m, nn.Linear))
    quantized_names = [layer_name(n) for n, m in model.named_modules(remove_duplicate=False)
                       if id(m) in quantized]
    if format == "awq":  # (as convert to AWQ warns)
        _warn_skip_substrings("save_quantized as AWQ", skip, quantized_names, stacklevel=3)
        _warn_quantized_lm_head("save_quantized as AWQ", quantized_names, stacklevel=3)
    qc = quant_config_dict(format, sizes.pop(), zero_format, act_order, sym, skip)
    qc = _loader_fields(qc, quantized_names, skip, "save_quantized as GPTQ", stacklevel=3)
    _warn_serving_engines("save_quantized as GPTQ", qc, stacklevel=3)
    shards, size = [{}], 0
    for key in sorted(tensors):
        nb = tensors[key].numel() * tensors[key].element_size()
        if max_shard_bytes and shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nb
    names = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    # the folders this save makes, deepest first: a save that fails removes them again (and what
    # it had moved into its own folder), as convert does, leaving no half-written output
    created = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # a staging folder of a save that was killed is removed by _writer_folder below (named by
        # host and pid, as convert's partial folders are): one of a save still running into this
        # folder is left alone (removing every one made that save fail with FileNotFoundError
        # naming its staging folder); one named by an older version (no host and pid) is removed
        # here, as before
        for stale in folder.glob(_STAGING_PREFIX + "*"):
            if not re.match(r"[0-9a-f]{8}-[0-9]+-", stale.name[len(_STAGING_PREFIX):]) and (
                    stale.is_dir() and not stale.is_symlink()):
                _rmtree(stale)
        # every file is written into a folder of its own beside them first, then moved in: a
        # save that fails (a full disk) leaves an earlier checkpoint in the folder whole
        staging = _writer_folder(folder, _STAGING_PREFIX)
        try:
            written = []
            for name, shard in zip(names, shards):
                with _naming_the_file("save_quantized", folder / name):
                    save_file(shard, str(staging / name), metadata={"format": "pt"})
                    _chmod_ordinary(staging / name)
                written.append(name)
            if len(shards) > 1:
                weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
                total = sum(t.numel() * t.element_size() for t in tensors.values())
                with _naming_the_file("save_quantized", folder / INDEX_NAME), open(
                        staging / INDEX_NAME, "w", encoding="utf-8") as f:
                    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                              indent=2)
                written.append(INDEX_NAME)
            with _naming_the_file("save_quantized", folder / CONFIG_NAME), open(
                    staging / CONFIG_NAME, "w", encoding="utf-8") as f:
                json.dump({**config, "quantization_config": qc}, f, indent=2)
            written.append(CONFIG_NAME)
            # an earlier save's files this one replaces, and its index or shards that would be
            # read in place of (or beside) these, are moved aside into the staging folder, and
            # put back where the save is interrupted (Ctrl-C, SIGTERM raised as an exception)
            # while files are moved in: that left a new model.safetensors beside the earlier
            # config.json, or a new config beside the earlier index and shards, which no loader
            # reads. (A save killed by SIGKILL there still leaves such a mix: save again.)
            stale = [p.name for p in folder.glob("model*.safetensors")
                     if p.name not in names and _WEIGHTS_FILE.fullmatch(p.name)]
            stale += [INDEX_NAME] if len(shards) == 1 else []
            earlier = staging / "earlier"
            earlier.mkdir()
            try:
                for name in [*written, *stale]:
                    if os.path.lexists(folder / name):
                        os.replace(folder / name, earlier / name)
                    if name in written:
                        os.replace(staging / name, folder / name)
            except BaseException:
                # (from what is where, not from lists: an interrupt may come between any two steps)
                for name in [*written, *stale]:
                    if name in written and not os.path.lexists(staging / name):
                        (folder / name).unlink(missing_ok=True)
                    if os.path.lexists(earlier / name):
                        os.replace(earlier / name, folder / name)
                raise
        finally:
            _rmtree(staging)
    except BaseException:  # (an interrupt too)
        for p in created:  # never one that existed before; stops at one something else filled
            try:
                p.rmdir()
            except OSError:
                break
        raise


# ---------------------------------------------------------------------- conversion
def _convert_layer(tensors: dict, src: QuantConfig, to: str, zero_format: str, prefix: str) -> dict:
    """Repack one layer's quantized tensors (scales copied as they are)."""
    try:
        if src.method == "awq":
            layer = QuantLinear.from_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                                         group_size=src.group_size)
        else:
            layer = QuantLinear.from_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                                          g_idx=tensors.get("g_idx"), group_size=src.group_size,
                                          zero_format=src.zero_format)
        out = layer.to_awq() if to == "awq" else layer.to_gptq(zero_format)
    except ValueError as e:
        raise CheckpointError(f"{prefix}: {e}") from None
    out["scales"] = tensors["scales"]
    return out


def _dequantize_layer(tensors: dict, qc: QuantConfig) -> torch.Tensor:
    return _ops.dequantize(tensors["qweight"], tensors["scales"], tensors["qzeros"],
                           format=qc.method, bits=4, group_size=qc.group_size,
                           g_idx=tensors.get("g_idx") if qc.method == "gptq" else None,
                           zero_format=qc.loader_zero_format)


def _check_destination(src: Path, dst: Path) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise CheckpointError(f"destination {dst} is the source folder or inside it")
    if dst.exists() or dst.is_symlink():
        raise CheckpointError(f"destination {dst} already exists")
    if d in s.parents:
        raise CheckpointError(f"destination {dst} contains the source folder")


def _act_order_layers(ckpt: Checkpoint, qc: QuantConfig, prefixes) -> list:
    out = []
    if qc.method != "gptq":
        return out
    for p in prefixes:
        if f"{p}.g_idx" in ckpt.shard_of:
            K, _ = _layer_dims(ckpt, p, qc)  # (g_idx's shape [K] and dtype checked there)
            groups = 1 if qc.group_size == -1 else K // qc.group_size
            try:  # range first: an int64 g_idx narrowed unchecked could pass as the trivial one
                g_idx = checked_g_idx(ckpt.tensor(f"{p}.g_idx"), groups, f"{p}.")
            except ValueError as e:
                raise CheckpointError(str(e)) from None
            if not torch.equal(g_idx, trivial_g_idx(K, qc.group_size)):
                out.append(p)
    return out


def _symmetric(ckpt: Checkpoint, qc: QuantConfig, prefixes, zero_format=None) -> bool:
    """Every zero point of every layer is 8, read in ``zero_format`` (default: the config's)."""
    return all(zero_points_all_eight(ckpt.tensor(f"{p}.qzeros"), zero_format or qc.zero_format)
               for p in prefixes)


def _float_layers(ckpt: Checkpoint) -> set:
    """Names of the checkpoint's float layers: a 2-D ``<name>.weight`` without ``<name>.qweight``
    (embeddings too: the tensors do not tell them from a Linear)."""
    return {key[: -len(".weight")] for key in ckpt.keys()
            if key.endswith(".weight") and len(ckpt.shape(key)) == 2
            and key[: -len(".weight")] + ".qweight" not in ckpt.shard_of}


def _awq_skip_list(ckpt: Checkpoint, skip: list) -> list:
    """AWQ's modules_to_not_convert: ``skip`` (the source config's) and every float layer: a 2-D
    ``<name>.weight`` without ``<name>.qweight`` (a MoE router). AutoAWQ and transformers quantize
    every Linear this list does not name, and GPTQ configs rarely have one. Embeddings are listed
    too (the tensors do not tell them from a Linear; those loaders only touch Linear layers)."""
    out = sorted(set(skip) | {n for n in _float_layers(ckpt) if not name_matches(n, skip)})
    _warn_skip_substrings("convert to AWQ", out, ckpt.quantized_prefixes(), stacklevel=4)
    _warn_quantized_lm_head("convert to AWQ", ckpt.quantized_prefixes(), stacklevel=4)
    return out


def _warn_skip_substrings(what: str, skip: list, quantized, stacklevel: int) -> None:
    """Older transformers and AutoAWQ match AWQ's modules_to_not_convert entries as substrings of
    a layer's name: a float "mlp.gate" there also leaves "mlp.gate_up_proj" unquantized, and its
    qweight unloadable. Warn of every such pair."""
    shadowed = sorted({(n, p) for n in skip for p in quantized if n in p})
    if shadowed:
        warnings.warn(f"{what}: modules_to_not_convert entries are substrings of quantized "
                      "layers' names, which loaders matching substrings (older transformers, "
                      "AutoAWQ) would leave unquantized: "
                      + _ops._first_few(f"{n!r} in {p!r}" for n, p in shadowed),
                      stacklevel=stacklevel)


def _warn_quantized_lm_head(what: str, quantized, stacklevel: int) -> None:
    """transformers' AWQ loader keeps the output embedding float whatever modules_to_not_convert
    says (get_keys_to_not_convert), and AutoAWQ quantizes the decoder layers' Linears only: an
    AWQ checkpoint with a quantized lm_head (GPTQModel's lm_head=True) loads there with lm_head's
    weight missing (left as initialised) and its qweight ignored. Warn, naming the layers."""
    heads = sorted(p for p in quantized if name_matches(p, "lm_head"))
    if heads:
        warnings.warn(f"{what}: {', '.join(heads)} quantized, but transformers' AWQ loader "
                      "keeps lm_head float whatever modules_to_not_convert says (and AutoAWQ "
                      "quantizes only the decoder layers): those would load it without a weight "
                      "and ignore its qweight; keep such a checkpoint in GPTQ",
                      stacklevel=stacklevel)


def _warn_serving_engines(what: str, qc: dict, stacklevel: int) -> None:
    """Warn of a GPTQ config vLLM or SGLang would refuse (read from vLLM 0.34 and SGLang 0.5.23):
    both run 4-bit GPTQ through Marlin, which takes sym=true only (vLLM raises "Unsupported
    quantization config", SGLang falls back to a GPTQ kernel it no longer has) and group sizes
    -1/32/64/128; vLLM also refuses desc_act=true with groups (act-order), which SGLang runs."""
    if qc.get("quant_method") != "gptq":
        return
    why = []
    if not qc.get("sym"):
        why.append("sym=false (asymmetric zeros): vLLM and SGLang load only symmetric 4-bit GPTQ; "
                   "for them keep AWQ (zero points) or quantize with sym=True")
    if qc.get("desc_act") and qc.get("group_size") != -1:
        why.append("desc_act=true (act-order g_idx): vLLM refuses it (SGLang runs it)")
    if qc.get("group_size") not in (-1, 32, 64, 128):
        why.append(f"group_size={qc.get('group_size')}: their Marlin kernels take -1/32/64/128 only")
    if why:
        warnings.warn(f"{what}: vLLM (0.34) or SGLang (0.5.23) will refuse this GPTQ checkpoint: "
                      + "; ".join(why), stacklevel=stacklevel)


def convert_checkpoint(src, dst, to: str = "gptq", zero_format: str = "v1", verify: bool = False,
                       progress: bool = True) -> dict:
    """Convert a checkpoint folder to GPTQ (``zero_format`` v1 or v2) or AWQ, shard by shard.

    Quantized layers are repacked with the ops (GPTQ output always has g_idx), every other tensor is
    copied unchanged, config.json's quantization_config is rewritten (GPTQ's sym: true where every
    zero point is 8, float layers, a quantized lm_head and a config vLLM or SGLang would refuse
    handled as by save_quantized, a GPTQ source's own ``dynamic`` rules kept after ours;
    AWQ's modules_to_not_convert also names the float layers), the shard layout
    and index are kept and other files copied. The result is written to a temporary folder beside
    ``dst`` and renamed at the end: on any error nothing is left at ``dst`` and ``src`` is never modified.
    A folder holding both an index and a ``model.safetensors`` it does not list is refused
    (loaders disagree on which is the checkpoint). ``verify`` re-reads the written files and
    checks that every layer dequantizes to exactly the same weight and every other tensor is
    equal. A GPTQ v1 source whose layers' qzeros are all 0x88888888 (v2 zeros under a v1 label,
    see ``torch_ops.checkpoint._warn_v2_zeros``) is converted as its config says, with a
    warning. ``progress``: a progress bar on stderr (tqdm, bytes written). Returns a summary
    dict."""
    src = _checked_path("convert_checkpoint", "src", src)
    dst = _checked_path("convert_checkpoint", "dst", dst)
    if to not in ("gptq", "awq"):
        raise CheckpointError(f"convert_checkpoint: to must be one of ('gptq', 'awq'), got {to!r}")
    if zero_format not in ("v1", "v2"):
        raise CheckpointError("convert_checkpoint: zero_format must be one of ('v1', 'v2'), "
                              f"got {zero_format!r}")
    if not src.is_dir():
        _quantized_folder(src)  # (its error: no such folder, or not a folder)
    _check_destination(src, dst)
    config, qc = _quantized_folder(src)
    ckpt = Checkpoint(src)
    if ckpt.index is not None and (src / WEIGHTS_NAME).is_file() and (
            src / WEIGHTS_NAME not in ckpt.shards):
        # transformers loads model.safetensors before an index (vLLM and we, the index's shards):
        # converted, DST held the shards in the new format beside model.safetensors, copied in
        # the old one, which transformers then read against the new config
        raise CheckpointError(f"{src}: holds both {INDEX_NAME} and a {WEIGHTS_NAME} it does not "
                              f"list; transformers loads {WEIGHTS_NAME}, other loaders the "
                              f"index's shards, and convert would convert only the shards: "
                              "remove the one that is not the checkpoint")
    nested = [s for s in ckpt.shards if s.parent != src]
    if nested:
        raise CheckpointError(f"{src / INDEX_NAME}: shard {os.path.relpath(nested[0], src)} is "
                              "not a file of the folder itself (not supported by convert)")
    prefixes = ckpt.quantized_prefixes()
    if not prefixes:
        raise CheckpointError(f"{src}: no quantized layers (no *.qweight tensors)")
    _check_layers(ckpt, src, prefixes, qc)
    act_order = _act_order_layers(ckpt, qc, prefixes)
    if to == "awq" and act_order:
        raise CheckpointError(
            f"{src}: {len(act_order)} layer(s) use act-order (desc_act, e.g. {act_order[0]}), "
            "which AWQ cannot express; convert to gptq instead")

    # where each output tensor goes: same shard as in the source; a new g_idx beside its qweight
    qset = set(prefixes)
    plan = {shard: [] for shard in ckpt.shards}
    for key, shard in ckpt.shard_of.items():
        prefix, _, suffix = key.rpartition(".")
        if prefix in qset and suffix == "g_idx" and to == "awq":
            continue  # AWQ has no g_idx
        plan[shard].append(key)
        new_g_idx = f"{prefix}.g_idx"
        if prefix in qset and suffix == "qweight" and to == "gptq" and (
                new_g_idx not in ckpt.shard_of):
            plan[shard].append(new_g_idx)

    dst_parent = dst.parent.resolve()
    created = [p for p in [dst_parent, *dst_parent.parents] if not p.exists()]  # deepest first
    tmp = None
    try:
        dst_parent.mkdir(parents=True, exist_ok=True)
        tmp = _writer_folder(dst_parent, _partial_prefix(dst.name))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        v2_zeros, asym = {}, set()  # (filled as the layers are read: their names)
        weight_map, total, written = _write_shards(ckpt, plan, qset, qc, to, zero_format, tmp,
                                                   dst, progress, v2_zeros, asym)
        _warn_v2_zeros("convert", src, config, list(v2_zeros), len(prefixes), stacklevel=3,
                       then=", and convert again: the output holds the same off-by-one weights")
        # sym from the zero points, as save_quantized records it: AWQ has no such field, and
        # kernels that take sym (Marlin) ignore the zeros, so a wrong true would be wrong output
        # (every layer's qweight is in the plan, so each layer was read)
        sym = to == "gptq" and not asym
        skip = _awq_skip_list(ckpt, qc.modules_to_not_convert) if to == "awq" else (
            qc.modules_to_not_convert)
        new_qc = quant_config_dict(to, qc.group_size, zero_format, bool(act_order), sym, skip)
        if to == qc.method:  # GPTQModel's lm_head, meta, damp_percent...: kept, ours updated
            new_qc = _over_source(qc.raw, new_qc)
        elif to == "gptq" and "format" in qc.raw:
            new_qc["format"] = new_qc["checkpoint_format"]
        new_qc = _loader_fields(new_qc, prefixes, _float_layers(ckpt), "convert to GPTQ", 3,
                                qc.raw.get("dynamic") if qc.method == "gptq" else None)
        _warn_serving_engines("convert to GPTQ", new_qc, stacklevel=3)
        config = dict(config)  # (a source whose config ties a quantized lm_head: untied here)
        if any(name_matches(p, "lm_head") for p in prefixes):
            _untie(config)
        _write_side_files(src, tmp, config, new_qc, to, ckpt, weight_map, total)
        if verify:
            _verify(ckpt, Checkpoint(tmp), qc, read_quant_config(tmp)[1], prefixes, progress)
        try:
            os.rename(tmp, dst)
        except OSError as e:  # (a folder DST is replaced only where empty: ENOTEMPTY or EEXIST)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR) and (
                    dst.exists() or dst.is_symlink()):
                # another convert (or save) to DST, started while this one ran, finished first:
                # "cannot write DST (Directory not empty: <the hidden partial folder>)" said less
                raise CheckpointError(
                    f"destination {dst} already exists: it was written while this convert ran "
                    "(another convert or save to it); convert_checkpoint left it as it is "
                    "and removed its own output") from None
            raise
    except BaseException as e:
        if tmp is not None:
            _rmtree(tmp)
        for p in created:  # the folders made for DST, unless something else was put there since
            try:
                p.rmdir()
            except OSError:
                break
        if isinstance(e, OSError):
            if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
                # copytree's list of (source, destination, why): the first names the file, and
                # why is the OSError's text, "[Errno N] ..."
                culprit, why = e.args[0][0][0], str(e.args[0][0][2])
                code = re.match(r"\[Errno (\d+)\]", why)
                code = int(code.group(1)) if code else None
            else:
                culprit, code = e.filename, e.errno
                why = f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"
            # (copy2 names no file when it refuses a special file; only SRC can hold one.) A full
            # disk is DST's, though shutil's copy names the source file it was copying: that
            # was reported as "cannot read SRC"
            # (the culprit's folder, not the culprit itself: a link out of SRC, to /dev/zero,
            # resolves outside it)
            read = code not in _WRITE_ERRNOS and (isinstance(e, shutil.SpecialFileError) or (
                culprit is not None and _inside(Path(culprit).parent, src)))
            raise CheckpointError(f"cannot {'read' if read else 'write'} {src if read else dst} "
                                  f"({why})") from None
        raise
    finally:
        ckpt.close()
    return {"layers": len(prefixes), "tensors": len(weight_map), "shards": written,
            "bytes": total, "act_order_layers": len(act_order), "verified": verify,
            "src_format": qc.method, "dst_format": to}


# errors of the side that writes, whichever file they name (a copy's is its source)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not enabled, file=sys.stderr, leave=False)


def _write_shards(ckpt, plan, qset, qc, to, zero_format, tmp, dst, progress, v2_zeros=None,
                  asym=None):
    """Write ``plan``'s tensors, the quantized layers converted, into ``tmp`` (renamed to ``dst``
    at the end, which errors name) shard by shard; returns (weight_map, bytes written, files
    written). Checked on the tensors read for the conversion (each layer's qzeros read once):
    ``v2_zeros`` (a dict, where given) gets the names of GPTQ v1 layers whose qzeros are all
    0x88888888 (v2_zeros_read_as_v1), ``asym`` (a set, where given) those with a zero point
    other than 8 in the source's zero format."""
    from safetensors.torch import save_file

    check_zeros = v2_zeros is not None and qc.method == "gptq" and qc.zero_format == "v1"

    weight_map, total, written = {}, 0, 0
    with _progress(ckpt.nbytes(), progress, "convert") as bar:
        for shard in ckpt.shards:
            out, converted = {}, {}
            if not plan[shard] and ckpt.headers[shard]:
                # every tensor of it dropped (GPTQ g_idx going to AWQ): no file, else DST held an
                # empty shard that its index does not list (copied on by every later convert)
                bar.update(sum(h[2] for h in ckpt.headers[shard].values()))
                continue
            for key in plan[shard]:
                prefix, _, suffix = key.rpartition(".")
                if prefix in qset and suffix in QUANT_SUFFIXES:
                    if prefix not in converted:  # once per layer and shard
                        layer = ckpt.layer(prefix)
                        if check_zeros and v2_zeros_read_as_v1(layer["qzeros"]):
                            v2_zeros[prefix] = None
                        if asym is not None and not zero_points_all_eight(layer["qzeros"],
                                                                          qc.zero_format):
                            asym.add(prefix)
                        converted[prefix] = _convert_layer(layer, qc, to, zero_format, prefix)
                    t = converted[prefix][suffix]
                else:
                    t = ckpt.tensor(key)
                out[key] = t.contiguous()
                bar.update(ckpt.headers[shard].get(key, (0, 0, 0))[2])
            bar.update(sum(ckpt.headers[shard][k][2] for k in ckpt.headers[shard] if k not in out))
            try:
                save_file(out, str(tmp / shard.name), metadata=ckpt.metadata[shard] or None)
                _chmod_ordinary(tmp / shard.name)
            except Exception as e:
                # DST and the shard, as the other write errors name them: the hidden partial
                # folder (and safetensors' own temporary file in it) is removed on the way out
                raise CheckpointError(f"cannot write {dst} ({shard.name}: {e})") from None
            written += 1
            for key, t in out.items():
                weight_map[key] = shard.name
                total += t.numel() * t.element_size()
    return weight_map, total, written


def _write_side_files(src, tmp, config, new_qc, to, ckpt, weight_map, total):
    shard_names = {s.name for s in ckpt.shards}
    handled = shard_names | {CONFIG_NAME, INDEX_NAME} | set(LEGACY_CONFIGS)
    if ckpt.index is not None:
        index = dict(ckpt.index)
        index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
        index["weight_map"] = dict(sorted(weight_map.items()))
        with open(tmp / INDEX_NAME, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump({**config, "quantization_config": new_qc}, f, indent=2)
    for name, method in LEGACY_CONFIGS.items():
        if (src / name).is_file() and method == to:  # rewritten; a side file of the other kind goes
            with open(tmp / name, "w", encoding="utf-8") as f:
                json.dump(new_qc, f, indent=2)
    for item in src.iterdir():
        if item.name in handled or item.name.startswith(_STAGING_PREFIX):
            continue
        if item.is_dir():  # links followed, as at the top (a Hugging Face cache snapshot's
            # relative links would dangle in DST); dangling ones left out, loops refused
            _refuse_link_loop(str(item), tmp)
            shutil.copytree(item, tmp / item.name, symlinks=False, copy_function=_copy_regular,
                            ignore=functools.partial(_dangling_links, staging=tmp))
        else:  # a link's target is copied (a Hugging Face cache's snapshot is all links), a
            # dangling link as it is
            _copy_regular(item, tmp / item.name, follow_symlinks=item.exists())


def _copy_regular(src, dst, follow_symlinks=True):
    """shutil.copy2 of a regular file (or a dangling link, not followed): a device, a socket or a
    link to one is refused, as shutil refuses a named pipe (a side file linked to /dev/zero was
    copied until the disk filled)"""
    if follow_symlinks and os.path.exists(src):
        mode = os.stat(src).st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
            raise shutil.SpecialFileError(f"`{src}` is a device or socket")
    return shutil.copy2(src, dst, follow_symlinks=follow_symlinks)


def _dangling_links(folder, names, staging=None):
    """copytree's ignore: links that resolve to nothing (its own ignore_dangling_symlinks checks
    a relative link's target against the working directory). A link that loops, or that leads
    to the folder being written (``staging``), is refused."""
    for n in names:
        _refuse_link_loop(os.path.join(folder, n), staging)
    return [n for n in names if not os.path.exists(os.path.join(folder, n))]


def _refuse_link_loop(path: str, staging=None) -> None:
    """CheckpointError where ``path`` is a link to a folder that holds it (along its path as
    written or as resolved). Followed, it would be copied again inside its own copy, the
    checkpoint with it, until the system's limit of links in a path makes the link look
    dangling: a "successful" DST holding ~40 copies of SRC. Also where the link's folder holds
    ``staging``, the hidden folder DST is written in (SRC/extra -> DST's parent): the copy went
    on into the copy being made, until the path was too long for the system, and the error
    was a 4,000-character path."""
    if not (os.path.islink(path) and os.path.isdir(path)):
        return
    target = os.path.realpath(path)
    if staging is not None:
        written = os.path.realpath(staging)
        if written == target or written.startswith(target.rstrip(os.sep) + os.sep):
            raise CheckpointError(f"{path}: a link to {target}, a folder that holds the "
                                  "output being written: copying it would copy that output into "
                                  "itself, a loop without end")
    holder = os.path.dirname(os.path.abspath(path))
    for p in (holder, os.path.realpath(holder)):
        while True:
            if os.path.realpath(p) == target:
                raise CheckpointError(f"{path}: a link to {target}, a folder that holds it: "
                                      "copying it would loop without end")
            if os.path.dirname(p) == p:
                break
            p = os.path.dirname(p)


def _verify(src: Checkpoint, dst: Checkpoint, src_qc, dst_qc, prefixes, progress):
    try:
        qset = set(prefixes)
        with _progress(src.nbytes(), progress, "verify") as bar:
            for key in src.keys():
                prefix, _, suffix = key.rpartition(".")
                if prefix in qset and suffix in QUANT_SUFFIXES:
                    if suffix == "qweight":
                        a = _dequantize_layer(src.layer(prefix), src_qc)
                        b = _dequantize_layer(dst.layer(prefix), dst_qc)
                        # (NaN where a scale is inf or NaN, on both sides: equal there)
                        if a.shape != b.shape or not bool(
                                ((a == b) | (a.isnan() & b.isnan())).all()):
                            raise CheckpointError(f"verify: {prefix} dequantizes differently "
                                                  "after conversion")
                elif key not in dst.shard_of or not torch.equal(
                        src.tensor(key).view(-1).view(torch.uint8),
                        dst.tensor(key).view(-1).view(torch.uint8)):
                    raise CheckpointError(f"verify: tensor {key} differs after conversion")
                bar.update(src.headers[src.shard_of[key]][key][2])
    finally:
        dst.close()


# ---------------------------------------------------------------------- inspection
def _infer_layout(ckpt: Checkpoint, prefix: str) -> tuple[str, int, int]:
    """(format, K, group_size) guessed from one layer's shapes, for files without a config."""
    shapes = {s: ckpt.shape(f"{prefix}.{s}") for s in _REQUIRED}
    bad = next((s for s, shape in shapes.items() if len(shape) != 2), None)
    if bad is not None:
        raise CheckpointError(f"{prefix}.{bad} must be 2-D, got shape {shapes[bad]}")
    (rows, cols), (ng, n), zeros_cols = shapes["qweight"], shapes["scales"], shapes["qzeros"][1]
    if f"{prefix}.g_idx" in ckpt.shard_of or n == cols:
        fmt, K = "gptq", rows * 8
        bits = _gptq_zeros_bits(zeros_cols, n)
        if bits != 4:  # K = rows*8 holds for 4-bit only
            raise _not_4bit(prefix, zeros_cols, n, bits)
    elif n == cols * 8:
        fmt, K = "awq", rows
    else:
        raise CheckpointError(f"{prefix}: qweight {[rows, cols]} and scales {[ng, n]} fit neither "
                              "AWQ nor GPTQ 4-bit")
    # the group size is K / (scales' rows): 0 rows divided by zero (a traceback), and rows that do
    # not divide K gave a group size no file holds (more rows than K: 0, a division by zero later)
    if ng == 0 or K % ng:
        raise CheckpointError(f"{prefix}.scales has {ng} rows (groups) for K = {K} (qweight "
                              f"{[rows, cols]}, {fmt.upper()} layout): the rows must divide K")
    return fmt, K, (-1 if ng == 1 else K // ng)


def inspect_checkpoint(path) -> dict:
    """Describe a checkpoint folder or a single .safetensors file: format, bits, group size, zero
    format, act-order, number of quantized layers, tensors, shards and total size in bytes. For
    GPTQ also desc_act and sym: the config's, or for a file (no config) read from the tensors
    (sym None where the zero format assumed, v1, leaves it unknown); sym a config does not set
    is read from the tensors too, in its zero format. Every quantized layer's
    shapes are checked (headers only); a folder's layer missing a tensor is an error, a file's
    (one shard may hold part of a layer) is left out. A folder whose config says GPTQ v1 and
    whose layers' qzeros are all 0x88888888 (v2 zeros under a v1 label) is warned of
    (``torch_ops.checkpoint._warn_v2_zeros``)."""
    path = _checked_path("inspect_checkpoint", "path", path)
    ckpt = Checkpoint(path)
    try:
        prefixes = ckpt.quantized_prefixes()
        if path.is_dir():  # the whole checkpoint: a layer missing a tensor is an error
            _check_layers(ckpt, path, prefixes)
        else:  # one shard may hold part of a layer: only its whole ones are read
            prefixes = [p for p in prefixes if not _missing_layer_tensors(ckpt, [p])]
        config, qc = read_quant_config(path) if path.is_dir() else ({}, None)
        configured = qc is not None
        info = {"path": str(path), "format": None, "bits": None, "group_size": None,
                "zero_format": None, "act_order": False,
                "quantized_layers": len(ckpt.quantized_prefixes()),
                "tensors": len(ckpt.shard_of), "shards": len(ckpt.shards)}
        if qc is None and prefixes:
            fmt, _, group_size = _infer_layout(ckpt, prefixes[0])
            qc = QuantConfig(fmt, 4, group_size, "as-is" if fmt == "awq" else "v1")
            info["zero_format"] = "as-is" if fmt == "awq" else "v1 (assumed: no config)"
        elif qc is not None:
            info["zero_format"] = qc.zero_format
        if qc is not None:
            _check_layers(ckpt, path, prefixes, qc)
            info.update(format=qc.method, bits=qc.bits, group_size=qc.group_size)
            if prefixes:
                info["scales_dtype"] = ckpt.headers[ckpt.shard_of[prefixes[0] + ".scales"]][
                    prefixes[0] + ".scales"][0]
            act = _act_order_layers(ckpt, qc, prefixes)
            info["act_order"] = bool(act)
            info["act_order_layers"] = len(act)
        if configured and qc.method == "gptq":
            info["desc_act"] = qc.desc_act
            v2_zeros, v1_sym = [], True
            if qc.zero_format == "v1":  # (each layer's qzeros read once, for both questions)
                for p in prefixes:
                    qzeros = ckpt.tensor(f"{p}.qzeros")
                    if v2_zeros_read_as_v1(qzeros):
                        v2_zeros.append(p)
                    v1_sym = v1_sym and zero_points_all_eight(qzeros, "v1")
                _warn_v2_zeros("inspect", path, config, v2_zeros, len(prefixes), stacklevel=3)
            # a config without sym (AutoGPTQ, GPTQModel and transformers then assume true, which
            # asymmetric zeros would make wrong): the zero points decide, as convert and
            # save_quantized record it; unknown without a quantized layer
            info["sym"] = qc.sym if qc.sym is not None else None if not prefixes else (
                v1_sym if qc.zero_format == "v1" else _symmetric(ckpt, qc, prefixes))
        elif qc is not None and qc.method == "gptq":  # no config: from the tensors
            info["desc_act"] = info["act_order"]
            # symmetric in the v1 assumed; v2's symmetric words would be v1 zeros of 9: unknown
            info["sym"] = (True if _symmetric(ckpt, qc, prefixes) else
                           None if _symmetric(ckpt, qc, prefixes, "v2") else False)
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        info["total_bytes"] = sum(p.stat().st_size for p in files)
        info["tensor_bytes"] = ckpt.nbytes()
        return info
    finally:
        ckpt.close()
