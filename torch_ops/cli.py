"""Command line: ``python -m torch_ops convert SRC DST --to gptq|awq`` and
``python -m torch_ops inspect PATH``.

Errors end the command with exit status 1 and one line on stderr, never a traceback (set
TORCH_OPS_TRACEBACK=1 to see one); a command that succeeds prints the library's warnings after
its output, one line each on stderr (``torch_ops convert: warning: ...``; ``python -W`` and
PYTHONWARNINGS apply: ``ignore`` prints none, ``error`` makes a warning the command's error); a
usage error (argparse) with status 2 and the usage. An interrupt (Ctrl-C, SIGTERM from kill,
timeout or a job scheduler) removes what the command had written and ends it with status 130 or
143. Output into a pipe whose reader has stopped (``| head``) ends the command quietly with
status 141, as SIGPIPE ends other commands.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torch_ops",
                                description="Convert and inspect 4-bit AWQ / GPTQ checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="repack a checkpoint folder to GPTQ or AWQ",
                       description="Convert a Hugging Face style AWQ or GPTQ checkpoint folder. "
                       "SRC is never modified; DST must not exist and is created only on success.")
    c.add_argument("src", metavar="SRC", help="source checkpoint folder")
    c.add_argument("dst", metavar="DST", help="destination folder (must not exist)")
    c.add_argument("--to", required=True, choices=("gptq", "awq"), help="target format")
    c.add_argument("--zero-format", choices=("v1", "v2"), default=None,
                   help="GPTQ zero-point format of the output: v1 (checkpoint_format 'gptq', "
                   "stores z-1, the default) or v2 ('gptq_v2', stores z)")
    c.add_argument("--verify", action="store_true",
                   help="re-read the output and check every layer dequantizes identically")
    c.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar (shown only on a terminal anyway) and no summary")
    i = sub.add_parser("inspect", help="describe a checkpoint folder or .safetensors file")
    i.add_argument("path", metavar="PATH", help="checkpoint folder or .safetensors file")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    return p


def _convert(args) -> int:
    from .checkpoint import CheckpointError, convert_checkpoint

    if args.to == "awq" and args.zero_format is not None:
        raise CheckpointError("--zero-format applies to --to gptq only "
                              "(AWQ stores zeros as they are)")
    info = convert_checkpoint(args.src, args.dst, to=args.to, zero_format=args.zero_format or "v1",
                              verify=args.verify, progress=not args.quiet and sys.stderr.isatty())
    if not args.quiet:
        zf = f" ({args.zero_format or 'v1'} zeros)" if args.to == "gptq" else ""
        print(f"converted {info['layers']} quantized layers, {info['tensors']} tensors in "
              f"{info['shards']} shard(s) from {info['src_format']} to {args.to}{zf}: {args.dst}"
              + (" (verified: every layer dequantizes identically)" if args.verify else ""))
    return 0


def _inspect(args) -> int:
    from .checkpoint import inspect_checkpoint

    info = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [("path", info["path"]),
            ("format", info["format"] or "not quantized"),
            ("bits", info["bits"]),
            ("group size", info["group_size"]),
            ("zero format", info["zero_format"]),
            ("act-order", "yes" if info["act_order"] else "no"),
            ("quantized layers", info["quantized_layers"]),
            ("tensors", info["tensors"]),
            ("shards", info["shards"]),
            ("total size", f"{_size(info['total_bytes'])} ({info['total_bytes']} bytes)")]
    if "scales_dtype" in info:
        rows.insert(5, ("scales dtype", info["scales_dtype"]))
    if "sym" in info:
        rows.insert(6, ("symmetric", {True: "yes", False: "no"}.get(info["sym"], "unknown")))
    for k, v in rows:
        print(f"{k + ':':<18}{'-' if v is None else v}")
    return 0


class _Terminated(BaseException):
    """SIGTERM as an exception, so that convert's clean-up runs as for Ctrl-C (Python's default
    SIGTERM ends the process at once, leaving DST's hidden partial folder behind)."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # (where a handler was set from C, getsignal gives None: it stays, since it could not be put back)
    previous = (signal.signal(signal.SIGTERM, _on_sigterm)
                if _main_thread() and signal.getsignal(signal.SIGTERM) is not None else None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            if not sys.warnoptions:  # (python -W / PYTHONWARNINGS: the user's filters stand)
                warnings.simplefilter("default")
            status = _convert(args) if args.command == "convert" else _inspect(args)
        # after the command's own output, one line each (Python's format adds the file, line
        # and source line of the library's call); a command that fails says its error only
        for w in caught:
            print(f"torch_ops {args.command}: warning: {' '.join(str(w.message).split())}",
                  file=sys.stderr)
        sys.stdout.flush()  # here, not at exit: a closed pipe then raises where it is caught below
        return status
    except BrokenPipeError:
        # stdout's reader stopped early (``inspect X | head -1``): no message, as for any other
        # command. Python ignores SIGPIPE and gets EPIPE instead, so the unwritten output goes to
        # devnull (the flush at exit would fail again and print a traceback), and the status is
        # the one a command killed by SIGPIPE has (128 + 13), which `set -o pipefail` sees as
        # for cat or grep
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"torch_ops {args.command}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"torch_ops {args.command}: terminated", file=sys.stderr)
        return 143
    except Exception as e:  # one clear line, no traceback: the message names file and tensor
        if os.environ.get("TORCH_OPS_TRACEBACK"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"torch_ops {args.command}: error: {msg}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:  # (main() called from a program: its own handler back)
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
