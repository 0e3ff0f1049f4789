"""The ``r4t`` command line: a thin dispatcher.

Each subcommand lives in the module that implements it, which defines
``add_cli_arguments(parser)`` and ``cli_main(args) -> int``; modules are imported only when their
subcommand runs, so ``r4t --help`` stays fast and light.

A user error (a bad argument value, a missing or unreadable path, a corrupt saved directory or JSON
file, an unknown dataset) ends the command with one line on stderr, ``r4t <command>: error: <message>``,
and exit status 2, never a traceback (a closed stdout pipe, ``r4t retrieve --json | head -1``, exits
quietly with :data:`EXIT_BROKEN_PIPE`); an ``--out`` path that did not exist before the command is removed
again, with the hidden siblings (``.<out>.tmp-*``, ``.<out>.v1``, ``.<out>.lock``, ...) the failed
command left beside it -- unless the command had run for more than :data:`KEEP_AFTER_S` seconds (it may
hold checkpoints worth resuming from; the error line says it was kept). Any other exception is a bug
and keeps its traceback. ``R4T_DEBUG=1`` re-raises user errors too, with their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("r4t_fast.eval.demo", "small retrieval demo on a real catalog (dense kNN + set grounding)"),
    "eval": ("r4t_fast.eval.evaluation", "evaluate a method on a dataset split; writes a JSON record"),
    "report": ("r4t_fast.eval.report", "render evaluation records into a Markdown table and plots"),
    "train-rl": ("r4t_fast.train.rl", "stage 1: GRPO-tune a fan-out policy on set-level rewards"),
    "synthesize": ("r4t_fast.train.synthesis", "stage 2: sample the tuned policy into (query, set) pairs"),
    "train-diffusion": ("r4t_fast.train.diffusion", "stage 3: train the set diffusion retriever"),
    "distill": ("r4t_fast.train.distill", "distil a diffusion model into a 1-4 step consistency model"),
    "retrieve": (
        "r4t_fast.diffusion.retrieve_cli",
        "retrieve sets for queries with a trained diffusion retriever",
    ),
    "pipeline": ("r4t_fast.pipeline", "run RL -> synthesis -> diffusion -> evaluation end to end"),
    "serve": ("r4t_fast.serve.command", "serve a retriever over HTTP (API, live catalog, page)"),
}

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # argument checks, SavedDirError, DataError, json.JSONDecodeError, ...
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
"""Exceptions that are always the user's error (the message names the argument or the path)."""

_NAMED = re.compile(r"-{0,2}[A-Za-z_][\w.\-\[\]]*: \S")
"""How our own checks word a message (``k: expected a positive int, got 0``); a TypeError or KeyError
worded like this is a user error, any other (``'NoneType' object is not callable``) a bug."""

DEBUG_ENV = "R4T_DEBUG"

KEEP_AFTER_S = 60.0
"""A command that fails later than this keeps the ``--out`` it created: past validation, it may hold
hours of checkpoints (a resumable RL run, synthesis shards) that a late user error must not wipe."""


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r4t", description="r4t_fast: fast, property-aligned fan-out retrieval")
    p.add_argument("--version", action="store_true", help="print the version and build info, then exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if name == load:
            importlib.import_module(mod).add_cli_arguments(sp)
    return p


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of ``exc`` when it is a user error, else None (a bug: keep the traceback).

    User errors: :data:`USER_ERRORS`; a TypeError or KeyError whose message starts with the argument's
    name (``name: ...``, the wording of every check in r4t_fast: unknown dataset, split or set id); a
    ``SystemExit`` carrying a message instead of a status.
    """
    if isinstance(exc, SystemExit):
        text = exc.code if isinstance(exc.code, str) else None
    elif isinstance(exc, (TypeError, KeyError)) and not isinstance(exc, ValueError):
        arg = exc.args[0] if len(exc.args) == 1 else None
        text = arg if isinstance(arg, str) and _NAMED.match(arg) else None
    elif isinstance(exc, USER_ERRORS):
        text = str(exc) or type(exc).__name__
    else:
        text = None
    if text is None:
        return None
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip()) or type(exc).__name__


def _siblings(path: Path) -> list[str]:
    """Names beside ``path`` that its writers make: ``.<name>.tmp-*``, ``.<name>.v1``, ``<name>.tmp``."""
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [n for n in names if n.startswith((f".{path.name}.", f"{path.name}."))]


class _OutGuard:
    """What a command's ``--out`` looked like before it ran, to undo what a failed run created there.

    ``root`` is the highest path of ``out`` and its parents that did not exist (``out`` itself when its
    parent exists); ``before`` the names beside ``root`` that looked like its siblings (``.D.tmp-*``,
    ``D.tmp``, ...) and already existed. Nothing that existed before is ever removed.
    """

    def __init__(self, out: Any) -> None:
        self.root: Path | None = None
        self.before: set[str] = set()
        if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
            return
        p = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
        if os.path.lexists(p):
            return
        while p.parent != p and not os.path.lexists(p.parent):
            p = p.parent
        self.root = p
        self.before = set(_siblings(p))

    def undo(self, elapsed_s: float) -> str:
        """Remove ``root`` and the new siblings beside it (best effort: never raises), unless the run
        took more than :data:`KEEP_AFTER_S`; returns what to add to the error line ("" or a note)."""
        if self.root is None:
            return ""
        victims = [self.root] if os.path.lexists(self.root) else []
        victims += [self.root.parent / n for n in _siblings(self.root) if n not in self.before]
        if victims and elapsed_s > KEEP_AFTER_S:
            kept = ", ".join(str(v) for v in victims)  # e.g. only a training checkpoint beside --out
            return f" (kept {kept}: the run had worked {elapsed_s:.0f} s)"
        for v in victims:
            try:
                if v.is_dir() and not v.is_symlink():
                    shutil.rmtree(v)
                else:
                    v.unlink()
            except OSError:
                pass
        return ""


def _fail(command: str, message: str) -> int:
    prefix = f"r4t {command}: error: "
    print(message if message.startswith(prefix) else prefix + message, file=sys.stderr)
    return 2


def _configure_threads(args: argparse.Namespace) -> None:
    """The package's thread rule (:mod:`r4t_fast._threads`), with the command's own ``--threads`` /
    ``--num-threads`` value when the user gave one (0 or absent: the rule chooses)."""
    from r4t_fast import _threads

    given = getattr(args, "threads", None) or getattr(args, "num_threads", None)
    if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < 0):
        raise ValueError(f"--threads: expected a positive int, got {given!r}")
    _threads.configure(given or None)


EXIT_BROKEN_PIPE = 128 + 13
"""Exit status when the reader of stdout went away (``r4t retrieve --json | head -1``): 128 + SIGPIPE,
what a shell tool killed by SIGPIPE reports; no traceback, no message."""


def _stdout_closed() -> int:
    """Point stdout at /dev/null (so the interpreter's final flush cannot raise again) and exit quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (captured)
        pass
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = next((a for a in argv if not a.startswith("-")), None)
    if cmd is not None and cmd not in COMMANDS:
        build_parser().print_usage(sys.stderr)
        print(f"r4t: unknown command {cmd!r}; valid choices: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    parser = build_parser(load=cmd)
    args = parser.parse_args(argv)
    if args.version:
        from r4t_fast._version import __version__
        from r4t_fast.kernels._backend import build_info

        print(f"r4t_fast {__version__}", build_info())
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    guard = _OutGuard(getattr(args, "out", None))
    t0 = time.monotonic()
    try:
        _configure_threads(args)  # before the command's module imports torch (r4t_fast._threads)
        mod = importlib.import_module(COMMANDS[args.command][0])
        rc = int(mod.cli_main(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except BrokenPipeError:
        return _stdout_closed()
    except BaseException as exc:
        message = user_error_message(exc)
        if message is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        return _fail(args.command, message + guard.undo(time.monotonic() - t0))
    if rc == 2:  # the command reported a user error itself
        guard.undo(time.monotonic() - t0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
