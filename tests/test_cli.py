"""``python -m torch_ops convert|inspect``: success, output, and every refusal (one line on stderr,
exit status 1, SRC untouched, nothing left at DST)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torch_ops
from torch_ops.cli import main
from test_checkpoint import (QUANTIZED, TinyLM, all_tensors, check_logits, make_checkpoint,
                             set_checkpoint_format, tree_digest)


def module_command(*args):
    """(argv, env) of ``python -m torch_ops ARGS`` in a fresh interpreter on this checkout's package."""
    root = str(Path(torch_ops.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return [sys.executable, "-m", "torch_ops", *map(str, args)], env


def run_module(*args):
    argv, env = module_command(*args)
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)


def assert_one_line_error(err: str, command="convert"):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"torch_ops {command}: error: "), err
    assert "Traceback" not in err


def test_module_entry_point_convert_and_refusal(tmp_path):
    src = tmp_path / "awq"
    _, oracle = make_checkpoint(src, "awq", shards=2)
    result = run_module("convert", src, tmp_path / "gptq", "--to", "gptq", "--zero-format", "v2",
                        "--verify")
    assert result.returncode == 0, result.stderr
    assert "converted 4 quantized layers" in result.stdout and "verified" in result.stdout
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert config["quantization_config"]["checkpoint_format"] == "gptq_v2"
    check_logits(torch_ops.load_quantized(TinyLM(), tmp_path / "gptq"), oracle)

    result = run_module("convert", tmp_path / "missing", tmp_path / "out", "--to", "awq")
    assert result.returncode == 1
    assert_one_line_error(result.stderr)
    assert "missing" in result.stderr and not (tmp_path / "out").exists()


def test_convert_in_process(tmp_path, capsys):
    src = tmp_path / "gptq"
    make_checkpoint(src, "gptq", "v1")
    assert main(["convert", str(src), str(tmp_path / "awq"), "--to", "awq", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    a, b = all_tensors(src), all_tensors(tmp_path / "awq")
    for name in QUANTIZED:
        qweight, qzeros = torch_ops.reference.gptq_to_awq(a[f"{name}.qweight"], a[f"{name}.qzeros"], "v1")
        assert torch.equal(b[f"{name}.qweight"], qweight) and torch.equal(b[f"{name}.qzeros"], qzeros)
        assert f"{name}.g_idx" not in b
    qc = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["version"], qc["group_size"]) == ("awq", "gemm", 64)


def _truncate_shard(folder):
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])


def _corrupt_config(folder):
    (folder / "config.json").write_text("{not json")


def _unsupported_bits(folder):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (folder / "config.json").write_text(json.dumps(config))


def _drop_scales(folder):
    shard = folder / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    del tensors["blocks.0.up.scales"]
    from safetensors.torch import save_file
    save_file(tensors, str(shard))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["blocks.0.up.scales"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _g_idx_wrapped(folder):
    """An int64 g_idx of trivial + 2**32: its int32 narrowing is the trivial g_idx."""
    from safetensors.torch import save_file
    key = "blocks.1.up.g_idx"
    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(str(shard))
    tensors[key] = tensors[key].long() + 2**32
    save_file(tensors, str(shard))


def _garbage_shard(folder):
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"\x05" * 64)


@pytest.mark.parametrize("damage,to,message", [
    (_truncate_shard, "gptq", "truncated"),
    (_corrupt_config, "gptq", "cannot read JSON"),
    (_unsupported_bits, "gptq", "only 4-bit"),
    (_drop_scales, "gptq", "missing tensors: blocks.0.up.scales"),
    (_garbage_shard, "gptq", "corrupt or truncated safetensors header"),
    (None, "awq", "act-order"),
    (_g_idx_wrapped, "gptq", "blocks.1.up.g_idx values must lie in [0, 2)"),
])
def test_convert_refusals(tmp_path, capsys, damage, to, message):
    src = tmp_path / "src"
    make_checkpoint(src, "gptq", act_order=damage is None, shards=2)
    if damage is not None:
        damage(src)
    before = tree_digest(src)
    assert main(["convert", str(src), str(tmp_path / "dst"), "--to", to]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert message in err
    assert tree_digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DST, no temp folder


def test_convert_refuses_bad_destinations_and_arguments(tmp_path, capsys):
    src = tmp_path / "src"
    make_checkpoint(src, "awq")
    (tmp_path / "exists").mkdir()
    before = tree_digest(src)
    cases = [([str(src), str(src), "--to", "gptq"], "is the source folder or inside it"),
             ([str(src), str(src / "sub" / "dst"), "--to", "gptq"], "is the source folder or inside it"),
             ([str(src), str(tmp_path / "exists"), "--to", "gptq"], "already exists"),
             ([str(src), str(tmp_path / "dst"), "--to", "awq", "--zero-format", "v2"],
              "--zero-format applies to --to gptq only")]
    for args, message in cases:
        assert main(["convert", *args]) == 1
        err = capsys.readouterr().err
        assert_one_line_error(err)
        assert message in err, err
    assert tree_digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "src"]
    assert sorted(p.name for p in (tmp_path / "exists").iterdir()) == []


def test_inspect_output(tmp_path, capsys):
    folder = tmp_path / "gptq"
    make_checkpoint(folder, "gptq", "v2", act_order=True, sym=True, shards=2)
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    rows = dict(line.split(":", 1) for line in out.strip().splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert rows["format"] == "gptq" and rows["bits"] == "4" and rows["group size"] == "64"
    assert rows["zero format"] == "v2" and rows["act-order"] == "yes" and rows["symmetric"] == "yes"
    assert rows["quantized layers"] == "4" and rows["shards"] == "2"
    assert rows["total size"].endswith(f"({size} bytes)")

    shard = str(folder / "model-00001-of-00002.safetensors")
    assert main(["inspect", "--json", shard]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "gptq" and info["group_size"] == 64 and info["act_order"] is True
    # no config: v2's symmetric zeros read as v1 (the zero format assumed) are zeros of 9
    assert info["desc_act"] is True and info["sym"] is None
    assert main(["inspect", shard]) == 0
    assert "symmetric:        unknown" in capsys.readouterr().out

    assert main(["inspect", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err, "inspect")
    assert "no such file or folder" in err


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    """``inspect X | head -1``: a reader that stops early is no error (no message), and the
    status is a SIGPIPE death's, 141, as for any other command in the pipeline."""
    make_checkpoint(tmp_path / "awq", "awq")
    argv, env = module_command("inspect", tmp_path / "awq")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # long before the interpreter has imported torch and writes
    err = proc.stderr.read().decode()
    assert (proc.wait(timeout=300), err) == (141, "")


# ---------------------------------------------------------------- files, links, signals
def test_written_weight_files_have_ordinary_modes(tmp_path):
    """safetensors writes 0600 files: convert's and save_quantized's shards get 0666 less the
    umask, like every other file, so another user's server can read them"""
    umask = os.umask(0o022)
    try:
        src = tmp_path / "awq"
        make_checkpoint(src, "awq", shards=2)
        assert main(["convert", str(src), str(tmp_path / "gptq"), "--to", "gptq", "-q"]) == 0
        model = torch_ops.load_quantized(TinyLM(), tmp_path / "gptq")
        torch_ops.checkpoint.save_quantized(model, tmp_path / "saved", "awq", max_shard_bytes=100_000)
        for folder in ("gptq", "saved"):
            for f in (tmp_path / folder).glob("*"):
                assert f.stat().st_mode & 0o777 == 0o644, (f, oct(f.stat().st_mode))
    finally:
        os.umask(umask)


def test_convert_follows_links_in_subfolders(tmp_path):
    """A Hugging Face cache snapshot: every file a relative link into blobs/, also in subfolders;
    DST holds the files (links in DST would dangle)"""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    make_checkpoint(tmp_path / "real", "awq")
    blobs.mkdir()
    (snap / "tokenizer").mkdir(parents=True)
    (tmp_path / "real" / "tokenizer.json").rename(blobs / "t")
    for f in (tmp_path / "real").iterdir():
        f.rename(blobs / f.name)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f.name))
    (snap / "tokenizer" / "tokenizer.json").symlink_to(Path("..", "..", "..", "blobs", "t"))
    (snap / "tokenizer" / "gone.txt").symlink_to("nowhere")
    assert main(["convert", str(snap), str(tmp_path / "out"), "--to", "gptq", "-q"]) == 0
    copied = tmp_path / "out" / "tokenizer" / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_text() == '{"model": "none"}'
    assert not (tmp_path / "out" / "tokenizer" / "gone.txt").exists()


@pytest.mark.parametrize("link", ["self", "parent", "mutual"])
def test_convert_refuses_links_that_loop(tmp_path, capsys, link):
    """A link to a folder that holds it (the folder itself, one above, or two folders linked to
    each other) would be copied without end, its checkpoint again at every level, until the
    recursion limit or a full disk: refused by name, nothing left behind"""
    src = tmp_path / "models" / "src"
    make_checkpoint(src, "awq")
    if link == "self":
        (src / "tokenizer").mkdir()
        (src / "tokenizer" / "back").symlink_to(Path(".."))
    elif link == "parent":
        (src / "up").symlink_to(Path(".."))
    else:
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "b").symlink_to(src / "side")
        (src / "side").mkdir()
        (src / "side" / "a").symlink_to(tmp_path / "a")
    before = tree_digest(src)
    assert main(["convert", str(src), str(tmp_path / "models" / "dst"), "--to", "gptq", "-q"]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "loop" in err, err
    assert tree_digest(src) == before
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["src"]


def test_convert_refuses_a_link_to_the_folder_of_dst(tmp_path, capsys):
    """SRC/extra linking to the folder DST goes in: the copy walked into the hidden partial
    folder being written, which held extra again, until the path was too long for the system
    ("cannot write DST ([Errno 36] File name too long: '.../extra/.dst.partial-.../extra/...')",
    4,000 characters). Refused by name, nothing left behind"""
    src, out = tmp_path / "src", tmp_path / "out"
    make_checkpoint(src, "awq")
    out.mkdir()
    (src / "extra").symlink_to(out)
    before = tree_digest(src)
    assert main(["convert", str(src), str(out / "dst"), "--to", "gptq", "-q"]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "holds the output being written" in err and "loop" in err and len(err) < 600, err
    assert tree_digest(src) == before
    assert list(out.iterdir()) == []


def test_convert_failing_on_a_source_file_cleans_read_only_folders(tmp_path, capsys, monkeypatch):
    """A read-only subfolder copied into DST's hidden partial folder is removed with it when a
    later file fails; an unreadable source file is reported as a read error of SRC"""
    import shutil

    src = tmp_path / "src"
    make_checkpoint(src, "awq")
    (src / "a_tokenizer").mkdir()
    (src / "a_tokenizer" / "vocab.txt").write_text("hi")
    (src / "a_tokenizer").chmod(0o555)
    (src / "z_secret.txt").write_text("s")
    real_copy2 = shutil.copy2

    def copy2(s, d, **kw):  # (root reads a 000 file: the refusal is simulated)
        if Path(s).name == "z_secret.txt":
            raise PermissionError(13, "Permission denied", str(s))
        return real_copy2(s, d, **kw)

    monkeypatch.setattr(shutil, "copy2", copy2)
    (tmp_path / "out").mkdir()
    try:
        assert main(["convert", str(src), str(tmp_path / "out" / "dst"), "--to", "gptq", "-q"]) == 1
    finally:
        (src / "a_tokenizer").chmod(0o755)
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert f"cannot read {src} (Permission denied: {src / 'z_secret.txt'})" in err, err
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("where", ["readme.md", "tok/vocab.txt"])  # SRC's own file, a subfolder's
def test_convert_disk_full_copying_side_files_is_a_write_error_of_dst(tmp_path, capsys, monkeypatch,
                                                                      where):
    """A full disk while copying SRC's other files: shutil's copy names the source file (copytree
    lists the error under it), which was reported as "cannot read SRC", blaming the source."""
    import errno
    import shutil

    if not getattr(shutil, "_USE_CP_SENDFILE", False):
        pytest.skip("the full disk is simulated in os.sendfile, which shutil uses on Linux")
    src = tmp_path / "src"
    make_checkpoint(src, "awq")
    (src / "tok").mkdir()
    (src / where).write_text("text")
    before = tree_digest(src)

    real_sendfile = os.sendfile

    def sendfile(out_fd, in_fd, *args):  # (full when it comes to ``where``: the others fit)
        if os.readlink(f"/proc/self/fd/{in_fd}").endswith(where):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_sendfile(out_fd, in_fd, *args)

    monkeypatch.setattr(os, "sendfile", sendfile)
    assert main(["convert", str(src), str(tmp_path / "dst"), "--to", "gptq", "-q"]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert f"cannot write {tmp_path / 'dst'} (" in err and "No space left on device" in err, err
    assert where in err  # (the file it was copying)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"] and tree_digest(src) == before


def test_convert_terminated_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    """SIGTERM (kill, timeout, a scheduler) during convert: the partial output is removed and the
    command ends with status 143"""
    import signal

    from torch_ops import checkpoint

    src = tmp_path / "src"
    make_checkpoint(src, "awq", shards=2)
    real = checkpoint._write_side_files

    def terminated(*args):
        real(*args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpoint, "_write_side_files", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["convert", str(src), str(tmp_path / "dst"), "--to", "gptq", "-q"]) == 143
    assert "torch_ops convert: terminated" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert signal.getsignal(signal.SIGTERM) == before


def test_json_is_read_as_utf8_whatever_the_locale(tmp_path):
    src = tmp_path / "src"
    make_checkpoint(src, "awq")
    config = json.loads((src / "config.json").read_text())
    config["id2label"] = {"0": "modèle"}  # written as UTF-8 bytes, as transformers writes it
    (src / "config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    assert "modèle".encode() in (src / "config.json").read_bytes()
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8"}
    root = str(Path(torch_ops.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "torch_ops", "convert", str(src),
                             str(tmp_path / "dst"), "--to", "gptq", "-q"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "dst" / "config.json").read_text(encoding="utf-8"))
    assert config["id2label"]["0"] == "modèle"


def test_path_not_utf8_gets_a_clear_error(tmp_path, capsys):
    src = Path(os.fsdecode(bytes(tmp_path) + b"/mod\xe8le"))
    make_checkpoint(src, "awq")
    assert main(["inspect", str(src)]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err, "inspect")
    assert "not valid UTF-8" in err


@pytest.mark.parametrize("where", ["tok/pipe", "pipe"])  # in a subfolder, or SRC's own
def test_convert_special_file_in_a_subfolder_is_a_read_error_of_src(tmp_path, capsys, where):
    src = tmp_path / "src"
    make_checkpoint(src, "awq")
    (src / "tok").mkdir()
    os.mkfifo(src / where)
    assert main(["convert", str(src), str(tmp_path / "dst"), "--to", "gptq", "-q"]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert f"cannot read {src} (`{src / where}` is a named pipe)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
@pytest.mark.parametrize("where", ["tok/zero", "zero"])
def test_convert_refuses_a_side_file_linked_to_a_device(tmp_path, capsys, where):
    """A side file that is a link to /dev/zero was copied (copy2 follows links) until the disk
    filled; now refused as a named pipe is, leaving no DST"""
    src = tmp_path / "src"
    make_checkpoint(src, "awq")
    (src / "tok").mkdir()
    os.symlink("/dev/zero", src / where)
    assert main(["convert", str(src), str(tmp_path / "dst"), "--to", "gptq", "-q"]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert f"cannot read {src} (`{src / where}` is a device or socket)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_killed_save_leaves_no_staging_folder_for_the_next_save_or_convert(tmp_path):
    from torch_ops.checkpoint import _STAGING_PREFIX, save_quantized

    model = torch_ops.quantize_model(TinyLM(), group_size=64)
    folder = tmp_path / "c"
    save_quantized(model, folder, "awq")
    stale = folder / (_STAGING_PREFIX + "killed")  # what a save killed by SIGKILL leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "gptq", "-q"]) == 0
    assert not any(p.name.startswith(_STAGING_PREFIX) for p in (tmp_path / "out").iterdir())
    save_quantized(model, folder, "awq")
    assert not stale.exists()


def test_warnings_are_one_line_each_on_stderr(tmp_path):
    """The library's warnings (here: convert to GPTQ of asymmetric zeros, which vLLM and SGLang
    refuse) reach the command's stderr as one line each, "torch_ops convert: warning: ...",
    not as Python's "file:line: UserWarning:" and the source line of the call; the command
    succeeds all the same."""
    src = tmp_path / "awq"
    make_checkpoint(src, "awq")
    result = run_module("convert", src, tmp_path / "gptq", "--to", "gptq")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("torch_ops convert: warning: ") for line in lines), lines
    assert any("vLLM" in line and "sym=false" in line for line in lines), lines
    assert "UserWarning" not in result.stderr and "cli.py" not in result.stderr
    assert (tmp_path / "gptq" / "config.json").is_file()


def test_v2_zeros_under_a_v1_label_are_a_warning_line(tmp_path, capsys):
    """inspect and convert of a checkpoint labelled GPTQ v1 whose qzeros are all 0x88888888 (v2's
    symmetric zeros, re-saved under a v1 label) succeed and print the library's warning as one
    line after their output, naming the folder and the config key to set."""
    src = tmp_path / "relabelled"
    make_checkpoint(src, "gptq", "v2", sym=True)
    set_checkpoint_format(src, "gptq")
    for command, argv in [("inspect", ["inspect", str(src)]),
                          ("convert", ["convert", str(src), str(tmp_path / "out"), "--to", "gptq"])]:
        assert main(argv) == 0
        out, err = capsys.readouterr()
        assert out
        found = [line for line in err.splitlines() if "0x88888888" in line]
        assert len(found) == 1, err
        assert found[0].startswith(f"torch_ops {command}: warning: {command}: {src}: 4 of 4 "
                                   "quantized layers (the first: blocks.0.down)"), found[0]
        assert '"checkpoint_format": "gptq_v2"' in found[0]
    set_checkpoint_format(src, "gptq_v2")
    assert main(["inspect", str(src)]) == 0
    assert "0x88888888" not in capsys.readouterr().err


@pytest.mark.parametrize("option", ["ignore", "error"])
def test_warnings_follow_python_warning_options(tmp_path, option):
    """The CLI set its own filter ("default") over the user's: ``python -W ignore`` (or
    PYTHONWARNINGS=ignore) still printed the warning lines, and ``-W error`` did not make a
    warning end the command. The user's options now stand: nothing printed, or the warning as
    the command's one error line (exit status 1, nothing left at DST)."""
    src = tmp_path / "awq"
    make_checkpoint(src, "awq")
    argv, env = module_command("convert", src, tmp_path / "gptq", "--to", "gptq")
    result = subprocess.run([argv[0], "-W", option, *argv[1:]], capture_output=True, text=True,
                            env=env, timeout=300)
    if option == "ignore":
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert (tmp_path / "gptq" / "config.json").is_file()
    else:
        assert result.returncode == 1, result.stderr
        assert_one_line_error(result.stderr)
        assert "vLLM" in result.stderr and not (tmp_path / "gptq").exists()


def test_convert_killed_by_sigkill_leaves_a_folder_the_next_convert_removes(tmp_path):
    """SIGKILL (the OOM killer) cannot be caught: the convert's hidden partial folder stayed beside
    DST for good (as large as the checkpoint). Its name records the host and the pid, and the next
    convert beside it removes it once that pid is dead; one of a live pid (a convert still
    running) or of another host sharing the file system is left alone."""
    from torch_ops import checkpoint

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_checkpoint(src, "awq", shards=2)
    root = str(Path(torch_ops.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    killed = ("import os, signal, sys; from torch_ops import checkpoint as c; "
              "c._write_side_files = lambda *a: os.kill(os.getpid(), signal.SIGKILL); "
              "c.convert_checkpoint(sys.argv[1], sys.argv[2], to='gptq', progress=False)")
    result = subprocess.run([sys.executable, "-c", killed, str(src), str(dst)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr
    dead = [p.name for p in tmp_path.iterdir() if p.name not in ("src",)]
    assert len(dead) == 1 and dead[0].startswith(".dst.partial-"), dead  # what SIGKILL leaves
    prefix = checkpoint._partial_prefix("dst")
    live = tmp_path / f"{prefix}{checkpoint._PID_SPACE}-{os.getpid()}-abc"
    other_host = tmp_path / f"{prefix}{int(checkpoint._PID_SPACE, 16) ^ 1:08x}-{2**22 + 1}-abc"
    other_dst = tmp_path / f"{checkpoint._partial_prefix('dst2')}{checkpoint._PID_SPACE}-{2**22 + 1}-a"
    for p in (live, other_host, other_dst):
        p.mkdir()
    with pytest.warns(UserWarning, match="sym=false"):  # (TinyLM's zeros are asymmetric)
        checkpoint.convert_checkpoint(src, dst, to="gptq", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["src", "dst", live.name, other_host.name, other_dst.name])
    assert (dst / "config.json").is_file()


def test_convert_terminated_just_after_the_rename_keeps_the_parents_mode(tmp_path, capsys,
                                                                         monkeypatch):
    """SIGTERM right after the partial folder was renamed to DST: the clean-up removed the partial
    folder, gone by then, and _rmtree's retry made DST's parent 0700 (another user's server could
    no longer read the checkpoint). DST is whole and the parent keeps its mode."""
    import signal

    from torch_ops import checkpoint

    src, parent = tmp_path / "src", tmp_path / "out"
    make_checkpoint(src, "awq")
    parent.mkdir()
    os.chmod(parent, 0o755)
    real = os.rename

    def rename_then_terminated(*args):
        real(*args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpoint.os, "rename", rename_then_terminated)
    assert main(["convert", str(src), str(parent / "dst"), "--to", "gptq", "-q"]) == 143
    monkeypatch.undo()
    assert parent.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in parent.iterdir()) == ["dst"]
    torch_ops.inspect_checkpoint(parent / "dst")
    checkpoint._rmtree(parent / "gone")  # (a folder already removed: nothing changes)
    assert parent.stat().st_mode & 0o777 == 0o755


def test_convert_beside_partial_like_names_of_odd_characters(tmp_path):
    """A folder beside DST named as a partial folder but with a "pid" of other digits ("²", which
    str.isdigit takes and int() refuses) made every convert there fail with a bare ValueError;
    such names, files, and links to folders elsewhere are left alone, the targets untouched."""
    from torch_ops import checkpoint

    src, parent = tmp_path / "src", tmp_path / "out"
    make_checkpoint(src, "awq")
    parent.mkdir()
    prefix = f"{checkpoint._partial_prefix('dst')}{checkpoint._PID_SPACE}-"
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("k")
    odd = [f"{prefix}\u00b2-a", f"{prefix}\u0661\u0662-a", f"{prefix} 5-a", f"{prefix}-5-a",
           f"{prefix}0-a", f"{prefix}{10**30}-a"]
    for name in odd:
        (parent / name).mkdir()
    (parent / f"{prefix}{2**22 + 3}-f").write_text("a file")
    (parent / f"{prefix}{2**22 + 5}-l").symlink_to(target)
    with pytest.warns(UserWarning, match="sym=false"):
        checkpoint.convert_checkpoint(src, parent / "dst", to="gptq", progress=False)
    assert sorted(p.name for p in parent.iterdir()) == sorted(
        ["dst", *odd, f"{prefix}{2**22 + 3}-f", f"{prefix}{2**22 + 5}-l"])
    assert (target / "keep").read_text() == "k"


def test_convert_into_a_parent_it_cannot_list(tmp_path, monkeypatch):
    """A parent DST may be written into but not listed (0733, a drop box: root reads any, so the
    refusal is simulated): the removal of dead partial folders, a clean-up, made convert fail with
    "Permission denied" where it wrote DST before."""
    from torch_ops import checkpoint

    src, parent = tmp_path / "src", tmp_path / "out"
    make_checkpoint(src, "awq")
    parent.mkdir()
    real = Path.iterdir

    def iterdir(self):
        if self == parent:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.warns(UserWarning, match="sym=false"):
        checkpoint.convert_checkpoint(src, parent / "dst", to="gptq", progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in parent.iterdir()) == ["dst"]


def test_two_converts_to_one_destination_the_later_fails_clearly(tmp_path, capsys, monkeypatch):
    """Two converts to the same DST at once both pass the "DST exists" check; the one that renames
    second failed with "cannot write DST (Directory not empty: <its hidden partial folder>)". It
    says DST was written meanwhile; the first's DST stays whole, nothing else is left."""
    from test_checkpoint import tree_digest

    from torch_ops import checkpoint

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_checkpoint(src, "awq")
    before = tree_digest(src)
    real = checkpoint._write_side_files

    def other_convert_wins(*args):
        real(*args)
        monkeypatch.setattr(checkpoint, "_write_side_files", real)
        assert main(["convert", str(src), str(dst), "--to", "awq", "-q"]) == 0  # (the other)

    monkeypatch.setattr(checkpoint, "_write_side_files", other_convert_wins)
    assert main(["convert", str(src), str(dst), "--to", "gptq", "-q"]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert f"destination {dst} already exists: it was written while this convert ran" in err, err
    assert ".partial-" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]
    assert torch_ops.inspect_checkpoint(dst)["format"] == "awq" and tree_digest(src) == before


def test_a_save_does_not_remove_the_staging_folder_of_a_save_still_running(tmp_path):
    """save_quantized removed every staging folder in the checkpoint folder as a killed save's:
    a save running there at the same time then failed with FileNotFoundError naming its hidden
    staging folder (and its clean-up made the folder 0700). Only a dead pid's are removed."""
    import signal

    from torch_ops import checkpoint

    model = torch_ops.quantize_model(TinyLM(), group_size=64)
    folder = tmp_path / "c"
    checkpoint.save_quantized(model, folder, "awq")
    os.chmod(folder, 0o755)
    root = str(Path(torch_ops.__file__).resolve().parent.parent)
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, tests])}
    slow = ("import sys, time, warnings, torch_ops, safetensors.torch as st; "
            "from torch_ops import checkpoint as c; from test_checkpoint import TinyLM; "
            "warnings.simplefilter('ignore'); m = torch_ops.quantize_model(TinyLM(), group_size=64); "
            "real = st.save_file; "
            "st.save_file = lambda *a, **k: (real(*a, **k), print('saving', flush=True), "
            "time.sleep(3)); c.save_quantized(m, sys.argv[1], 'gptq')")
    other = subprocess.Popen([sys.executable, "-c", slow, str(folder)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert other.stdout.readline() == "saving\n", other.stderr.read()
        dead = folder / f"{checkpoint._STAGING_PREFIX}{checkpoint._PID_SPACE}-{2**22 + 9}-x"
        dead.mkdir()  # (what a save killed by SIGKILL leaves)
        checkpoint.save_quantized(model, folder, "awq")
        assert not dead.exists()
        _, err = other.communicate(timeout=300)
    finally:
        if other.poll() is None:
            other.send_signal(signal.SIGKILL)
    assert other.returncode == 0, err
    assert folder.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert torch_ops.inspect_checkpoint(folder)["format"] == "gptq"
