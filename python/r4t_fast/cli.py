"""The ``r4t`` command line: a thin dispatcher.

Each subcommand lives in the module that implements it, which defines
``add_cli_arguments(parser)`` and ``cli_main(args) -> int``; modules are imported only when their
subcommand runs, so ``r4t --help`` stays fast and light.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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
        "r4t_fast.diffusion.retriever",
        "retrieve sets for queries with a trained diffusion retriever",
    ),
    "pipeline": ("r4t_fast.pipeline", "run RL -> synthesis -> diffusion -> evaluation end to end"),
}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r4t", description="r4t_fast: fast, property-aligned fan-out retrieval")
    p.add_argument("--version", action="store_true", help="print the version and build info, then exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if name == load:
            importlib.import_module(mod).add_cli_arguments(sp)
    return p


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
    mod = importlib.import_module(COMMANDS[args.command][0])
    return int(mod.cli_main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
