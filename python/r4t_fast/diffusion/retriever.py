"""The R4T diffusion retriever: query text -> one batched diffusion pass -> a grounded set of items.

    from r4t_fast import Retriever
    r = Retriever.from_pretrained("runs/polyvore/diffusion")
    sets = r.retrieve(["summer beach outfit", "rainy sunday jazz"], k=10, steps=16, guidance=0.0, seed=0)
    sets[0].item_ids, sets[0].texts, sets[0].scores

A retriever directory holds the diffusion model (``config.json`` + ``model.safetensors``, see
:func:`r4t_fast.diffusion.save_model`), its catalog (``catalog/``, a saved :class:`~r4t_fast.Catalog`
in the model's embedding space) and ``retriever.json`` (encoder spec and sampling defaults).

Sets larger than the model's L rows are drawn as ``ceil(k / L)`` independent samples whose rows are
grounded jointly (no item twice); the ``k`` rows with the best grounding scores are returned.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r4t_fast._internal import atomic_write_text, check_non_negative_int, check_positive_int, unit_rows
from r4t_fast.data.catalog import Catalog
from r4t_fast.data.results import RetrievalResult
from r4t_fast.diffusion.model import EDM, SetDenoiser, load_model, save_model
from r4t_fast.diffusion.samplers import SAMPLERS, SAMPLING_DEFAULTS, generate_sets
from r4t_fast.kernels import ops

__all__ = ["Retriever", "RetrievedSet"]


@dataclass(frozen=True)
class RetrievedSet(RetrievalResult):
    """One query's set: ``item_indices`` (k,) catalog rows, ``item_ids``/``texts`` (k,), ``scores`` (k,)
    the cosine of each item with the query (the meaning of ``scores`` for every ``RetrievalResult``),
    ``row_scores`` (k,) the grounding score (inner product of each generated row with its item; rows are
    ranked by it), ``row_embeddings`` (k, d) the generated rows, ``candidates`` (k, C) each row's nearest
    items when asked for."""

    item_ids: tuple[str, ...] = field(default=())
    texts: tuple[str, ...] = field(default=())
    row_scores: np.ndarray | None = None


class Retriever:
    """Diffusion fan-out retriever (method name ``r4t-diffusion``).

    Args:
        model: a trained :class:`~r4t_fast.diffusion.SetDenoiser` (rows of dimension ``catalog.dim``).
        catalog: the items rows are grounded to.
        encoder: text encoder for queries (``.encode(list[str]) -> (n, cond_dim)``), or None when only
            :meth:`retrieve_embeddings` is used.
        encoder_spec: how to rebuild the encoder on load (e.g. ``"minilm"``).
        steps, sampler, guidance, seed: sampling defaults (overridable per call).
    """

    name = "r4t-diffusion"

    def __init__(
        self,
        model: SetDenoiser,
        catalog: Catalog,
        encoder: Any = None,
        *,
        encoder_spec: str | None = None,
        steps: int = SAMPLING_DEFAULTS.steps,
        sampler: str = SAMPLING_DEFAULTS.sampler,
        guidance: float = SAMPLING_DEFAULTS.guidance,
        seed: int = SAMPLING_DEFAULTS.seed,
        device: str | torch.device = "cpu",
    ) -> None:
        if model.cfg.dim != catalog.dim:
            raise ValueError(
                f"catalog: dimension {catalog.dim} does not match the model's rows ({model.cfg.dim})"
            )
        if encoder is not None and getattr(encoder, "dim", model.cfg.cond_dim) != model.cfg.cond_dim:
            want = model.cfg.cond_dim
            raise ValueError(
                f"encoder: dimension {encoder.dim} does not match the model's condition ({want})"
            )
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: unknown {sampler!r}; valid choices: {sorted(SAMPLERS)}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.edm = EDM(self.model)
        self.catalog = catalog
        self._cat_dev = catalog.embeddings.to(self.device)
        self.encoder = encoder
        self.encoder_spec = encoder_spec
        self.defaults = {
            "steps": int(steps),
            "sampler": sampler,
            "guidance": float(guidance),
            "seed": int(seed),
        }

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        encoder: Any = None,
        **defaults: Any,
    ) -> Retriever:
        """Load a retriever directory written by :meth:`save` (encoder rebuilt from its spec unless given)."""
        d = Path(path)
        rpath = d / "retriever.json"
        if not rpath.is_file():
            raise FileNotFoundError(f"path: {d} is not a retriever directory (missing retriever.json)")
        try:
            meta = json.loads(rpath.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{rpath}: corrupt ({exc})") from exc
        model, _ = load_model(d, device=device)
        catalog = Catalog.load(d / "catalog")
        spec = meta.get("encoder_spec")
        if encoder is None and spec:
            from r4t_fast.data.encoders import get_encoder

            encoder = get_encoder(spec)
        kw = {**meta.get("defaults", {}), **defaults}
        return cls(model, catalog, encoder, encoder_spec=spec, device=device, **kw)

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        d = Path(path)
        save_model(self.model, d, extra=extra)
        self.catalog.save(d / "catalog")
        meta = {
            "format": "r4t_fast.diffusion.retriever",
            "encoder_spec": self.encoder_spec,
            "defaults": self.defaults,
        }
        atomic_write_text(d / "retriever.json", json.dumps(meta, indent=2))
        return d

    def config(self) -> dict[str, Any]:
        return {
            **self.defaults,
            "model": {k: v for k, v in vars(self.model.cfg).items()},
            "encoder": self.encoder_spec,
        }

    # ------------------------------------------------------------------ retrieval
    @torch.no_grad()
    def retrieve_embeddings(
        self,
        query_emb: Any,
        k: int | None = None,
        *,
        n_candidates: int = 0,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float | None = None,
        seed: int | None = None,
    ) -> list[RetrievedSet]:
        """Sets for query embeddings (B, cond_dim) float32."""
        q = torch.as_tensor(np.asarray(query_emb) if not isinstance(query_emb, torch.Tensor) else query_emb)
        cfg = self.model.cfg
        if q.dim() != 2 or q.shape[1] != cfg.cond_dim or q.dtype != torch.float32:
            raise ValueError(
                f"query_emb: expected float32 (B, {cfg.cond_dim}), got {q.dtype} {tuple(q.shape)}"
            )
        if not bool(torch.isfinite(q).all()):
            raise ValueError("query_emb: contains NaN or inf")
        k = cfg.set_size if k is None else k
        k = check_positive_int(k, "k")
        if k > len(self.catalog):
            raise ValueError(f"k: {k} exceeds the catalog size ({len(self.catalog)})")
        n_candidates = check_non_negative_int(n_candidates, "n_candidates")
        o = {**self.defaults}
        for key, v in (("steps", steps), ("sampler", sampler), ("guidance", guidance), ("seed", seed)):
            if v is not None:
                o[key] = v
        B = q.shape[0]
        if B == 0:
            return []
        n_sets = math.ceil(k / cfg.set_size)
        cond = q.to(self.device).repeat_interleave(n_sets, dim=0)
        rows = generate_sets(
            self.edm, cond, steps=o["steps"], sampler=o["sampler"], guidance=o["guidance"], seed=o["seed"]
        )
        rows = rows.reshape(B, n_sets * cfg.set_size, cfg.dim).float().contiguous()
        ids, scores = ops.ground_sets(rows, self._cat_dev, check_finite=False)
        # Keep the k best-grounded rows (stable: ties keep row order).
        order = torch.sort(
            torch.where(ids >= 0, scores, torch.full_like(scores, -math.inf)),
            dim=1,
            descending=True,
            stable=True,
        ).indices[:, :k]
        ids = torch.gather(ids, 1, order).cpu()
        scores = torch.gather(scores, 1, order).cpu()
        rows = torch.gather(rows, 1, order[:, :, None].expand(-1, -1, cfg.dim))
        cands = None
        if n_candidates:
            _, cands = ops.knn(rows.reshape(-1, cfg.dim), self._cat_dev, n_candidates, check_finite=False)
            cands = cands.reshape(B, k, n_candidates).cpu()
        rows = rows.cpu()
        # scores: cos(item, query), as for every RetrievalResult (catalog rows are unit-norm); None when
        # the query lives in another space than the items (cond_dim != dim)
        cos = None
        if cfg.cond_dim == cfg.dim:
            qn = unit_rows(q.cpu().float())
            # index_select on the flat ids (cheaper than 2-D advanced indexing: 0.08 vs 0.14 ms at 64 x 10)
            items = self.catalog.embeddings.index_select(0, ids.clamp_min(0).reshape(-1)).float()
            items = items.reshape(*ids.shape, cfg.dim)
            cos = torch.einsum("bkd,bd->bk", items, qn)
            cos = torch.where(ids >= 0, cos, torch.full_like(cos, -math.inf))
        out = []
        for b in range(B):
            idx = ids[b].numpy()
            out.append(
                RetrievedSet(
                    item_indices=idx,
                    row_embeddings=rows[b].numpy(),
                    candidates=None if cands is None else cands[b].numpy(),
                    scores=None if cos is None else cos[b].numpy(),
                    row_scores=scores[b].numpy(),
                    item_ids=tuple(self.catalog.ids[i] if i >= 0 else "" for i in idx),
                    texts=tuple(self.catalog.texts[i] if i >= 0 else "" for i in idx),
                )
            )
        return out

    def retrieve(
        self, query_texts: Sequence[str], k: int | None = None, *, n_candidates: int = 0, **kw: Any
    ) -> list[RetrievedSet]:
        """Sets for query texts: a list of :class:`RetrievedSet`, one per query (same order)."""
        if isinstance(query_texts, str) or not all(isinstance(t, str) and t.strip() for t in query_texts):
            raise ValueError("query_texts: expected a list of non-empty strings")
        if self.encoder is None:
            raise ValueError("encoder: this retriever has no text encoder; use retrieve_embeddings()")
        if not query_texts:
            return []
        q = np.asarray(self.encoder.encode(list(query_texts)), dtype=np.float32)
        return self.retrieve_embeddings(torch.from_numpy(q), k, n_candidates=n_candidates, **kw)


# ---------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="retriever directory (r4t train-diffusion / r4t pipeline output)"
    )
    p.add_argument("--query", action="append", required=True, help="query text (repeatable)")
    p.add_argument("-k", type=int, default=None, help="items per set (default: the model's set size)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance strength w")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of a list")


def cli_main(args: argparse.Namespace) -> int:
    r = Retriever.from_pretrained(args.model)
    sets = r.retrieve(
        args.query, args.k, steps=args.steps, sampler=args.sampler, guidance=args.guidance, seed=args.seed
    )
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "query": q,
                        "item_ids": list(s.item_ids),
                        "texts": list(s.texts),
                        "scores": None if s.scores is None else [float(x) for x in s.scores],
                        "row_scores": [float(x) for x in s.row_scores],
                    }
                    for q, s in zip(args.query, sets, strict=True)
                ],
                indent=2,
            )
        )
        return 0
    for q, s in zip(args.query, sets, strict=True):
        print(f"\n{q}")
        shown = s.scores if s.scores is not None else s.row_scores
        for i, (t, sc) in enumerate(zip(s.texts, shown, strict=True), 1):
            print(f"  {i:2d}. {t}  ({sc:.3f})")
    return 0
