"""``r4t retrieve``: sets for queries from the command line, from a retriever directory or from a model
directory written by ``r4t train-diffusion`` plus a dataset's catalog (:func:`retriever_from_model`), so
the whole path from data to a retrieved set needs no Python::

    r4t train-diffusion --targets reference --dataset polyvore --out runs/model
    r4t retrieve --model runs/model --query "summer beach outfit" --save runs/retriever
    r4t retrieve --model runs/retriever --query "rainy sunday jazz" --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from r4t_fast._internal import (
    MANIFEST_NAME,
    check_float,
    check_positive_int,
    check_save_target,
    check_seed,
    verify_dir,
)
from r4t_fast.diffusion.model import load_model
from r4t_fast.diffusion.options import MAX_GUIDANCE, MAX_K_RETRIEVE, MAX_PULL, MAX_STEPS, NOISE_MODES
from r4t_fast.diffusion.retriever import FORMAT, Retriever
from r4t_fast.diffusion.samplers import SAMPLERS

__all__ = ["add_cli_arguments", "cli_main", "retriever_from_model"]


def retriever_from_model(
    model_dir: str | os.PathLike,
    dataset: str | os.PathLike | None = None,
    *,
    encoder: str | None = None,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    **defaults: Any,
) -> Retriever:
    """A :class:`Retriever` from a ``r4t train-diffusion`` model directory and a dataset's catalog (by
    default the dataset and encoder spec the model was trained with, from its ``config.json``)."""
    from r4t_fast.data.prepare import load_eval_data

    d = Path(model_dir)
    real = d
    if d.is_symlink() or (d / MANIFEST_NAME).is_file():
        real = verify_dir(d, format="r4t_fast.diffusion", nested=False).path
    model, meta = load_model(real)
    space = meta.get("space") if isinstance(meta.get("space"), dict) else {}
    ref = meta.get("reference_dataset") if isinstance(meta.get("reference_dataset"), dict) else {}
    dataset = dataset or space.get("dataset_spec") or ref.get("dataset_spec") or ref.get("dataset")
    if not dataset:
        raise ValueError(f"--dataset: {d} does not record its dataset; name the catalog with --dataset")
    spec = encoder or space.get("encoder_spec") or ref.get("encoder_spec") or "minilm"
    data = load_eval_data(dataset, encoder=spec, data_dir=data_dir, cache_dir=cache_dir, progress=False)
    sampling = meta.get("sampling") if isinstance(meta.get("sampling"), dict) else {}
    return Retriever(model, data.catalog, data.encoder, encoder_spec=spec, **{**sampling, **defaults})


# ---------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="a retriever directory (r4t pipeline, --save) or an r4t train-diffusion model dir (+ --dataset)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="with a train-diffusion model: the catalog to ground on, polyvore | spotify | PATH.jsonl "
        "(default: the dataset the model was trained on, from its config.json)",
    )
    p.add_argument("--encoder", default=None, help="with a train-diffusion model: query encoder spec")
    p.add_argument("--data-dir", default=None, help="data directory ($R4T_DATA_DIR or ../shared/data)")
    p.add_argument("--cache-dir", default=None, help="cache root ($R4T_CACHE_DIR or ~/.cache/r4t_fast)")
    p.add_argument("--save", default=None, help="also save the retriever built here to this directory")
    p.add_argument("--query", action="append", required=True, help="query text (repeatable)")
    p.add_argument("-k", type=int, default=None, help="items per set (default: the model's set size)")
    p.add_argument("--steps", type=int, default=None, help=f"sampler steps (1 to {MAX_STEPS})")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance strength w")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--anchor", type=float, default=None, help="share of the set given to the query, [0, 1)")
    p.add_argument("--pull", type=float, default=None, help="rows moved toward the query, [0, 10]")
    p.add_argument(
        "--precision", choices=["fp32", "bf16"], default=None,
        help="the sampler's GEMMs: fp32, or bf16 inputs/weights (faster on CPUs with AVX512-BF16)",
    )  # fmt: skip
    p.add_argument(
        "--noise", choices=list(NOISE_MODES), default=None,
        help="initial noise: per query ('query') or one draw for every query ('fixed': models trained "
        "with retrieval_noise fixed); default: the saved retriever's",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a list")


def _finite_or_none(x: Any) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def cli_main(args: argparse.Namespace) -> int:
    # validate everything cheap before loading the model, the catalog and the encoder
    for q in args.query:
        if not q.strip():
            raise ValueError(f"--query: expected non-empty text, got {q!r}")
    if args.k is not None:
        check_positive_int(args.k, "-k", upper=MAX_K_RETRIEVE)
    if args.steps is not None:
        check_positive_int(args.steps, "--steps", upper=MAX_STEPS)
    if args.guidance is not None:
        check_float(args.guidance, "--guidance", low=-MAX_GUIDANCE, high=MAX_GUIDANCE)
    if args.anchor is not None and not 0.0 <= check_float(args.anchor, "--anchor") < 1.0:
        raise ValueError(f"--anchor: expected a number in [0, 1), got {args.anchor!r}")
    if args.pull is not None:
        check_float(args.pull, "--pull", low=0.0, high=MAX_PULL)
    if args.seed is not None:
        check_seed(args.seed, "--seed")
    model = Path(args.model)
    if not model.exists():
        raise FileNotFoundError(f"--model: no retriever directory at {model}")
    if not model.is_dir():
        raise ValueError(f"--model: {model} is not a directory")
    is_retriever = (model / "retriever.json").is_file()
    if is_retriever and (args.dataset or args.encoder):
        raise ValueError(f"--dataset/--encoder: only with a train-diffusion model; {model} is a retriever")
    if not is_retriever and not (model / "config.json").is_file():
        raise FileNotFoundError(f"--model: {model} holds neither retriever.json nor config.json")
    if args.save is not None:
        legacy = lambda p: (p / "retriever.json").is_file()  # noqa: E731  (as Retriever.save accepts)
        check_save_target(Path(os.path.abspath(args.save)), FORMAT, legacy, name="--save")
    if is_retriever:
        r = Retriever.from_pretrained(model)
    else:
        r = retriever_from_model(
            model, args.dataset, encoder=args.encoder, data_dir=args.data_dir, cache_dir=args.cache_dir
        )
    if args.save is not None:
        r.save(args.save)
    opts = {"steps": args.steps, "sampler": args.sampler, "guidance": args.guidance, "seed": args.seed}
    opts["anchor"], opts["pull"], opts["precision"] = args.anchor, args.pull, args.precision
    opts["noise"] = args.noise
    sets = r.retrieve(args.query, args.k, **opts)
    if args.json:
        records = [
            {
                "query": q,
                "item_ids": list(s.item_ids),
                "texts": list(s.texts),
                "scores": None if s.scores is None else [_finite_or_none(x) for x in s.scores],
                "row_scores": [_finite_or_none(x) for x in s.row_scores],
            }
            for q, s in zip(args.query, sets, strict=True)
        ]
        print(json.dumps(records, indent=2, allow_nan=False))
        return 0
    for q, s in zip(args.query, sets, strict=True):
        print(f"\n{q}")
        shown = s.scores if s.scores is not None else s.row_scores
        for i, (t, sc) in enumerate(zip(s.texts, shown, strict=True), 1):
            print(f"  {i:2d}. {t}  ({sc:.3f})")
    return 0
