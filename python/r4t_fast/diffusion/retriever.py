"""The R4T diffusion retriever: query text -> one batched diffusion pass -> a grounded set of items.

    from r4t_fast import Retriever
    r = Retriever.from_pretrained("runs/polyvore/diffusion")
    sets = r.retrieve(["summer beach outfit", "rainy sunday jazz"], k=10, steps=16, guidance=0.0, seed=0)
    sets[0].item_ids, sets[0].texts, sets[0].scores

A retriever directory is a crash-safe saved directory (:func:`r4t_fast._internal.save_dir_atomically`,
format ``r4t_fast.retriever``: a symlink to a verified version with a sha256 manifest) holding the
diffusion model (``config.json`` + ``model.safetensors``, see :func:`r4t_fast.diffusion.save_model`), its
catalog (``catalog/``, a saved :class:`~r4t_fast.Catalog` in the model's embedding space) and
``retriever.json`` (encoder spec and sampling defaults). Plain directories of the same files without a
manifest (r4t_fast 0.1) still load, with a warning when verification was asked for. The ``r4t retrieve``
command lives in :mod:`r4t_fast.diffusion.retrieve_cli`.

Sets larger than the model's L rows are drawn as ``ceil(k / L)`` independent samples whose rows are
grounded jointly (no item twice); the ``k`` rows with the best grounding scores are returned. On the
CPU the whole sampling and the grounding run in one fused call (:func:`r4t_fast.ops.sample_sets`);
elsewhere (CUDA, ``fused=False``) the eager samplers, then :func:`r4t_fast.ops.ground_sets`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r4t_fast._internal import (
    MANIFEST_NAME,
    SavedDirError,
    atomic_write_text,
    check_non_negative_int,
    check_positive_int,
    save_dir_atomically,
    unit_rows,
    verify_dir,
)
from r4t_fast.data.backends import ground_sets as index_ground_sets
from r4t_fast.data.catalog import Catalog
from r4t_fast.data.results import RetrievalResult
from r4t_fast.diffusion.layout import rank_candidates
from r4t_fast.diffusion.model import EDM, SetDenoiser, load_model, save_model, shift_rows
from r4t_fast.diffusion.options import (
    MAX_K_RETRIEVE,
    check_options,
    query_budget_share,
    query_rows,
    query_seeds,
)
from r4t_fast.diffusion.samplers import (
    SAMPLING_DEFAULTS,
    eager_sample_sets,
    fused_packing,
    fused_sample_sets,
    sampler_sigmas,
)
from r4t_fast.kernels import ops
from r4t_fast.kernels._arrays import all_finite
from r4t_fast.kernels.sampler_pack import PackedDenoiser
from r4t_fast.objectives import fair_budget

__all__ = ["Retriever", "RetrievedSet"]

FORMAT = "r4t_fast.retriever"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RetrievedSet(RetrievalResult):
    """One query's set: ``item_indices`` (k,) catalog rows, ``item_ids``/``texts`` (k,), ``scores`` (k,)
    the cosine of each item with the query (the meaning of ``scores`` for every ``RetrievalResult``),
    ``row_scores`` (k,) the grounding score (inner product of each generated row with its item; rows are
    ranked by it), ``row_embeddings`` (k, d) the generated rows, ``candidates`` (k, C) each row's nearest
    items when asked for ((k + m - 1, C) with ``anchor > 0``: row 0 and m - 1 appended rows hold the
    query's own ranking, interleaved)."""

    item_ids: tuple[str, ...] = field(default=())
    texts: tuple[str, ...] = field(default=())
    row_scores: np.ndarray | None = None


def _check_fused(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"fused: expected None (auto), True or False, got {value!r}")
    return value


class Retriever:
    """Diffusion fan-out retriever (method name ``r4t-diffusion``).

    Args:
        model: a trained :class:`~r4t_fast.diffusion.SetDenoiser` (rows of dimension ``catalog.dim``).
        catalog: the items rows are grounded to; a live catalog (``Catalog.add/update/remove``) is read
            afresh at every call, so a new item is retrievable at once and a removed one never returned.
        encoder: text encoder for queries (``.encode(list[str]) -> (n, cond_dim)``), or None when only
            :meth:`retrieve_embeddings` is used.
        encoder_spec: how to rebuild the encoder on load (e.g. ``"minilm"``).
        steps, sampler, guidance, seed, anchor, pull, candidate_pull, precision, noise, candidate_layout,
            deep_share: sampling defaults (overridable per call, stored on save); see
            :meth:`retrieve_embeddings`.
        fused: default of ``retrieve(fused=...)``: None (auto: the fused CPU kernel when it applies),
            True (require it), False (the eager samplers + ``ops.ground_sets``, for comparisons).
        coarse: the fused kernel's grounding search over an int8 copy of the catalog with an exact
            re-score (:func:`r4t_fast.ops.knn`'s ``coarse``; built once per catalog, a quarter of its
            memory): None (auto: where the CPU has AVX-512 VNNI and the search qualifies), False (exact).

    Thread safety: :meth:`retrieve` may be called from several threads at once (no per-call state is
    kept on the object; results equal sequential calls).
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
        anchor: float = 0.0,
        pull: float = 0.0,
        candidate_pull: float | None = None,
        precision: str = "fp32",
        noise: str = "query",
        candidate_layout: str = "rows",
        deep_share: float | None = None,
        fused: bool | None = None,
        coarse: bool | None = None,
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
        self.defaults = check_options(
            {
                "steps": steps,
                "sampler": sampler,
                "guidance": guidance,
                "seed": seed,
                "anchor": anchor,
                "pull": pull,
                "candidate_pull": candidate_pull,
                "precision": precision,
                "noise": noise,
                "candidate_layout": candidate_layout,
                "deep_share": deep_share,
            }
        )
        self.fused = _check_fused(fused)
        if coarse not in (None, False):
            raise ValueError(f"coarse: expected None (auto) or False (exact only), got {coarse!r}")
        self.coarse = coarse
        self.device = ops.check_device(device)
        self.model = model.to(self.device).eval()
        self.edm = EDM(self.model)
        self.catalog = catalog
        self.encoder = encoder
        self.encoder_spec = encoder_spec
        self._cat_src: torch.Tensor | None = None
        self._cat_on_device: torch.Tensor | None = None
        self._coarse_of: tuple[torch.Tensor, ops.CoarseCatalog] | None = None
        self._warned_bf16 = False

    def with_catalog(self, catalog: Catalog) -> Retriever:
        """A retriever with the same model, encoder and defaults grounding on ``catalog`` (same dim)."""
        return Retriever(
            self.model,
            catalog,
            self.encoder,
            encoder_spec=self.encoder_spec,
            fused=self.fused,
            coarse=self.coarse,
            device=self.device,
            **self.defaults,
        )

    @property
    def _cat_dev(self) -> torch.Tensor:
        """The catalog's current embeddings on the retriever's device (copied once per catalog change)."""
        emb = self.catalog.embeddings
        if self.device.type == "cpu" and emb.device.type == "cpu":
            return emb if emb.is_contiguous() else emb.contiguous()
        src, dev = self._cat_src, self._cat_on_device
        if src is not emb or dev is None:  # identity: Catalog replaces the tensor on every change
            dev = emb.to(self.device).contiguous()
            self._cat_src, self._cat_on_device = emb, dev
        return dev

    def _coarse_for(self, cat: torch.Tensor) -> ops.CoarseCatalog | None:
        """The int8 copy of ``cat`` for the fused grounding search (built once per catalog tensor), or
        None where it does not apply (``coarse=False``, no AVX-512 VNNI, CUDA)."""
        if self.coarse is False or cat.is_cuda or not ops.coarse_supported():
            return None
        held = self._coarse_of  # one read: another thread may replace it
        if held is None or held[0] is not cat:
            held = (cat, ops.coarse_catalog(cat, check_finite=False))
            self._coarse_of = held
        return held[1]

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        encoder: Any = None,
        verify: bool = True,
        **defaults: Any,
    ) -> Retriever:
        """Load a retriever directory written by :meth:`save` (encoder rebuilt from its spec unless given).

        ``verify`` (default True) compares the sha256 of every file with the manifest (sizes always);
        False is for trusted fast loads. A plain directory without a manifest (r4t_fast 0.1, ``r4t
        distill``) loads unverified. Raises FileNotFoundError when ``path`` holds no retriever,
        SavedDirError / ValueError naming the file when one is corrupt, truncated or edited.
        """
        ops.check_device(device)
        d = Path(path)
        hidden = d.parent.glob(f".{d.name}.v*") if d.parent.is_dir() else iter(())
        managed = d.is_symlink() or (d / MANIFEST_NAME).is_file()
        if managed or (not d.exists() and any(True for _ in hidden)):
            m = verify_dir(d, format=FORMAT, format_versions=(FORMAT_VERSION,), verify=verify, nested=False)
            real = m.path
            for name in ("retriever.json", "config.json", "model.safetensors"):
                if name not in m.files:
                    raise SavedDirError(f"{d / MANIFEST_NAME}: field 'files': no entry for {name!r}")
        elif (d / "retriever.json").is_file():
            real = d  # legacy: no manifest, nothing to verify against
            if verify:
                warnings.warn(
                    f"path: {d} has no {MANIFEST_NAME}: loaded UNVERIFIED (a corrupt or edited file goes "
                    "unnoticed); re-save it with Retriever.save, or pass verify=False for a trusted copy",
                    UserWarning,
                    stacklevel=2,
                )
        else:
            raise FileNotFoundError(f"path: {d} is not a retriever directory (missing retriever.json)")
        rpath = d / "retriever.json"
        try:
            meta = json.loads((real / "retriever.json").read_text())
            if not isinstance(meta, dict):
                raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{rpath}: corrupt ({exc})") from exc
        model, _ = load_model(real, device=device)
        try:
            catalog = Catalog.load(real / "catalog", verify=verify)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{d / 'catalog'}: missing catalog ({exc})") from exc
        spec = meta.get("encoder_spec")
        if encoder is None and spec:
            from r4t_fast.data.encoders import get_encoder

            encoder = get_encoder(spec)
        saved = meta.get("defaults", {})
        if not isinstance(saved, dict):
            raise ValueError(f"{rpath}: field 'defaults': expected an object, got {saved!r}")
        kw = {**saved, **defaults}
        return cls(model, catalog, encoder, encoder_spec=spec, device=device, **kw)

    def save(self, path: str | os.PathLike, extra: dict | None = None, *, keep: int = 2) -> Path:
        """Save crash-safely into directory ``path`` (written beside the old version, checksummed and
        switched in by one atomic rename: a save killed at any point leaves the previous version or the
        new one loadable). ``extra`` goes into ``config.json``. Returns ``path``."""
        meta = {"format": FORMAT, "encoder_spec": self.encoder_spec, "defaults": self.defaults}

        def write(tmp: Path) -> None:
            save_model(self.model, tmp, extra=extra)
            self.catalog.save(tmp / "catalog")
            atomic_write_text(tmp / "retriever.json", json.dumps(meta, indent=2, allow_nan=False))

        return save_dir_atomically(
            path,
            write,
            format=FORMAT,
            format_version=FORMAT_VERSION,
            keep=keep,
            legacy=lambda p: (p / "retriever.json").is_file(),
        )

    def config(self) -> dict[str, Any]:
        return {
            **self.defaults,
            "model": {k: v for k, v in vars(self.model.cfg).items()},
            "encoder": self.encoder_spec,
        }

    # ------------------------------------------------------------------ retrieval
    def _fused_packing(self, fused: bool | None, cond: torch.Tensor) -> PackedDenoiser | None:
        """The packed model when this call runs the fused kernel (None: the eager path)."""
        fused = self.fused if fused is None else _check_fused(fused)
        if fused is False:
            return None
        packed, why = fused_packing(self.edm, cond)
        if packed is None and fused:
            raise ValueError(f"fused: the fused sampler cannot run here: {why}; pass fused=None or False")
        return packed

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
        anchor: float | None = None,
        pull: float | None = None,
        candidate_pull: float | None = None,
        precision: str | None = None,
        noise: str | None = None,
        candidate_layout: str | None = None,
        deep_share: float | None = None,
        allowed: Any = None,
        fused: bool | None = None,
    ) -> list[RetrievedSet]:
        """Sets for query embeddings (B, cond_dim) float32.

        Args:
            k: items per set (default the model's L), at most the catalog size and
                :data:`MAX_K_RETRIEVE` (grounding a set costs O(k^2)).
            n_candidates: C nearest items per row for ``candidates`` (0: none).
            steps, sampler, guidance, seed: sampling options (default: the retriever's defaults). Each
                query's noise comes from its own seed, derived from ``seed`` and the query's bytes
                (:func:`query_seeds`), so a query's set does not depend on the rest of the batch.
            noise: ``"query"`` (that per-query seed) or ``"fixed"`` (every query starts from the one draw
                of ``seed``: for a model trained with ``retrieval_noise='fixed'``), :data:`NOISE_MODES`.
            anchor: in [0, 1), the share of the candidate budget given to the query itself (needs
                cond_dim == dim). With anchor > 0, row 0 is the query embedding grounded to its nearest
                item (the other rows take other items; the lowest-scored diffusion row is dropped), and
                with candidates ``m = max(1, round(anchor * k / (1 - anchor)))`` rows hold the query's
                own ranking interleaved (row 0 and m - 1 appended rows; row j: ranks j, j + m, ...), so a
                round-robin union or a fixed quota per row over the k - 1 + m rows reads the query's
                ranking in order, each rank once, about ``anchor`` of the budget.
            pull: in [0, 10], how far every sampled row is moved toward the query before grounding:
                row + pull * query (needs cond_dim == dim; 0 = the model's rows). A retrieval-time
                trade chosen on validation: more pull raises item relevance and recall, lowers Vendi.
            candidate_pull: in [-10, 10], the pull of the rows the ``candidates`` lists are read around
                (the model's row + candidate_pull * query; negative: moved away from the query), apart
                from the items' ``pull``; None (the default) = ``pull``. The items want rows near the
                query (relevance), a deep candidate list wants rows off the query's own ranking (which
                the anchor already reads): a large ``pull`` with ``candidate_pull`` <= 0 serves both.
            candidate_layout: ``"rows"`` (each row's own list; with the anchor, the query's ranking
                interleaved over m rows) or ``"ranked"`` (:mod:`r4t_fast.diffusion.layout`: one order of
                distinct candidates laid out column-major over the same rows: the round-robin union of
                the fair budget ``objectives.fair_budget(catalog size, k)`` is the ``"rows"`` layout's,
                past it the query's ranking takes ``deep_share`` and the rows' lists the rest, so any
                budget read round-robin or by a fixed quota per row is distinct items).
            deep_share: in [0, 1], the ``"ranked"`` layout's query share past the fair budget (needs
                the anchor); None (the default) = the anchor's share of the fair budget.
            precision: ``"fp32"`` or ``"bf16"`` (:data:`PRECISIONS`): the sampler's GEMMs on bf16 inputs and
                weights, float32 accumulation -- about twice the fused kernel's speed on a CPU with
                AVX512-BF16 (``build_info()["sampler_bf16"]``); rows within ~0.3 % of float32's.
            allowed: a query-time filter, anything :meth:`Catalog.filter_mask` accepts (a bool (N,)
                mask, item ids, or a predicate ``f(category, metadata) -> bool``): every item returned
                (and every candidate) is allowed; at least k items must pass.
            fused: None (the retriever's default), True (the fused CPU kernel) or False (eager).

        Raises:
            ValueError: naming the argument; also when sampling produced non-finite rows (a diverging
                guidance, NaN weights).
        """
        q = torch.as_tensor(np.asarray(query_emb) if not isinstance(query_emb, torch.Tensor) else query_emb)
        cfg = self.model.cfg
        if q.dim() != 2 or q.shape[1] != cfg.cond_dim or q.dtype != torch.float32:
            raise ValueError(
                f"query_emb: expected float32 (B, {cfg.cond_dim}), got {q.dtype} {tuple(q.shape)}"
            )
        if not all_finite(q):
            raise ValueError("query_emb: contains NaN or inf")
        k = cfg.set_size if k is None else k
        k = check_positive_int(k, "k", upper=MAX_K_RETRIEVE)
        n_items = len(self.catalog)
        if k > n_items:
            raise ValueError(f"k: {k} exceeds the catalog size ({n_items})")
        n_candidates = check_non_negative_int(n_candidates, "n_candidates")
        if n_candidates > n_items:
            raise ValueError(f"n_candidates: {n_candidates} exceeds the catalog size ({n_items})")

        given = {"steps": steps, "sampler": sampler, "guidance": guidance, "seed": seed, "anchor": anchor}
        given["pull"], given["precision"], given["noise"] = pull, precision, noise
        given["candidate_pull"] = candidate_pull
        given["candidate_layout"], given["deep_share"] = candidate_layout, deep_share
        over = {key: v for key, v in given.items() if v is not None}
        o = check_options({**self.defaults, **over}) if over else self.defaults  # defaults: checked once
        n_rows_c = k + max(0, query_rows(o["anchor"], k) - 1)  # k rows + m - 1 of the query
        ranked = o["candidate_layout"] == "ranked" and n_candidates > 0  # the rows' lists read 2x deeper
        if q.shape[0] * n_rows_c * n_candidates * (2 if ranked else 1) > ops.MAX_RESULT_SLOTS:
            raise ValueError(
                f"n_candidates: {n_candidates} per row x {n_rows_c} rows x {q.shape[0]} queries exceeds "
                f"{ops.MAX_RESULT_SLOTS} candidate slots; pass fewer candidates or queries per call"
            )
        for name in ("pull", "candidate_pull"):
            if (o[name] or 0.0) != 0 and cfg.cond_dim != cfg.dim:  # a negative candidate pull too
                raise ValueError(
                    f"{name}: needs queries in the items' space (cond_dim {cfg.cond_dim} != dim {cfg.dim})"
                )
        if o["anchor"] > 0 and cfg.cond_dim != cfg.dim:
            raise ValueError(
                f"anchor: needs queries in the items' space (cond_dim {cfg.cond_dim} != dim {cfg.dim})"
            )
        cat = self._cat_dev
        mask = None
        if allowed is not None:
            mask = self.catalog.filter_mask(allowed).to(cat.device)
            if (n_ok := int(mask.sum())) < k:
                raise ValueError(f"allowed: only {n_ok} catalog items pass the filter, fewer than k={k}")
        B = q.shape[0]
        if B == 0:
            return []
        n_sets = math.ceil(k / cfg.set_size)
        qd = q.to(self.device)
        cond = qd if n_sets == 1 else qd.repeat_interleave(n_sets, dim=0)
        sigmas = sampler_sigmas(o["sampler"], o["steps"], cfg)
        seeds = query_seeds(o["seed"], q) if o["noise"] == "query" else [o["seed"]] * B
        kw = dict(sampler=o["sampler"], guidance=o["guidance"], seed=seeds)
        R = n_sets * cfg.set_size
        m = kq = 0
        if o["anchor"] > 0:  # the query's own ranking: its nearest item (and m rows of candidates)
            m = query_rows(o["anchor"], k) if n_candidates else 0
            kq = min(max(1, (n_rows_c if ranked else m) * n_candidates), n_items)
        q_found = None
        # a catalog behind an approximate or remote index (usearch, Milvus) is searched through it: the
        # rows are grounded by its batch search (distinct items kept: data.backends.ground_sets) and the
        # fused kernel, which scans the in-memory matrix, is not used
        via_index = self.catalog.index_kind != "exact"
        packed = None if via_index else self._fused_packing(fused, cond)
        if packed is not None:
            out = fused_sample_sets(
                self.edm,
                cond,
                sigmas,
                catalog=cat,
                group=n_sets,
                allowed=mask,
                check_finite=False,
                pull=o["pull"],
                anchor=qd.contiguous() if kq else None,  # in the same catalog pass as the rows
                anchor_k=max(kq, 1),
                packed=packed,
                coarse=self._coarse_for(cat),
                precision=o["precision"],
                **kw,
            )
            rows = out.rows.reshape(B, R, cfg.dim)
            self._check_rows(rows, o)
            ids, scores = out.ids, out.scores
            q_found = (out.anchor_scores, out.anchor_ids) if kq else None
        else:
            if o["precision"] == "bf16" and not self._warned_bf16:
                self._warned_bf16 = True
                warnings.warn(
                    "precision: 'bf16' is a speed option of the fused CPU kernel; this call takes the eager "
                    "path (fused=False, a CUDA device or an index-backed catalog) and runs float32",
                    stacklevel=3,
                )
            x = eager_sample_sets(self.edm, cond, sigmas, **kw)
            if o["pull"]:
                x = shift_rows(x, cond, o["pull"])
            rows = x.reshape(B, R, cfg.dim).float().contiguous()
            self._check_rows(rows, o)
            if via_index:
                ids, scores = index_ground_sets(self.catalog.backend, self.catalog.embeddings, rows.cpu(),
                                                allowed=None if mask is None else mask.cpu())  # fmt: skip
                ids, scores = ids.to(rows.device), scores.to(rows.device)
            else:
                ids, scores = ops.ground_sets(rows, cat, check_finite=False, allowed=mask)
        if o["anchor"] > 0:
            q_scores, q_ids = q_found or self._knn(qd, cat, kq, mask, via_index)
            q_scores, q_ids = q_scores.cpu(), q_ids.cpu()
        # The selection, in numpy (each torch op costs ~5 us at batch 1; these are (B, R) arrays):
        ids_n, scores_n, rows_n = ids.cpu().numpy(), scores.cpu().numpy(), rows.cpu().numpy()
        valid = np.where(ids_n >= 0, scores_n, -np.inf)
        if o["anchor"] > 0:
            # the query row takes its nearest item; a diffusion row grounded to that item is dropped
            valid[ids_n == q_ids.numpy()[:, :1]] = -np.inf
        n_rows = k - 1 if o["anchor"] > 0 else k
        # Keep the best-grounded rows (stable: ties keep row order).
        order = np.argsort(-valid, axis=1, kind="stable")[:, :n_rows]
        at = (np.arange(B)[:, None], order)  # (B, n_rows) picks; fancy indexing, not take_along_axis
        ids_n, scores_n, rows_n = ids_n[at], scores_n[at], rows_n[at]
        if o["anchor"] > 0:
            ids_n = np.concatenate([q_ids.numpy()[:, :1], ids_n], axis=1)
            scores_n = np.concatenate([q_scores.numpy()[:, :1], scores_n], axis=1)
            rows_n = np.concatenate([q.cpu().numpy()[:, None, :].astype(rows_n.dtype), rows_n], axis=1)
        cands = None
        if n_candidates:
            free = rows_n[:, 1:] if m else rows_n  # with the anchor, row 0's list is the query's ranking
            cp = o["pull"] if o["candidate_pull"] is None else o["candidate_pull"]
            if cp != o["pull"]:  # the lists are read around rows moved by candidate_pull, not by pull
                free = free + np.float32(cp - o["pull"]) * q.cpu().numpy()[:, None, :].astype(free.dtype)
            rows_t = torch.from_numpy(np.ascontiguousarray(free)).to(cat.device)
            deep = min(2 * n_candidates, n_items) if ranked else n_candidates  # ranked: past overlaps
            _, lists = self._knn(rows_t.reshape(-1, cfg.dim).contiguous(), cat, deep, mask, via_index)
            lists = lists.cpu().reshape(B, free.shape[1], deep)
            cands = lists[:, :, :n_candidates]
            if m:  # row 0 and m - 1 appended rows hold the ranking interleaved (row j: ranks j, j + m, ...)
                ranking = torch.full((B, m * n_candidates), -1, dtype=torch.int64)
                ranking[:, : q_ids.shape[1]] = q_ids[:, : m * n_candidates]
                ranking = ranking.reshape(B, n_candidates, m).transpose(1, 2)
                cands = torch.cat([ranking[:, :1], cands, ranking[:, 1:]], dim=1)
            if ranked:
                cands = self._ranked(cands, q_ids if m else None, lists, k, o)
        return self._results(q, ids_n, scores_n, rows_n, cands)

    def _ranked(
        self, cands: torch.Tensor, q_ids: torch.Tensor | None, lists: torch.Tensor, k: int, o: dict
    ) -> torch.Tensor:
        """The ``"ranked"`` layout of the ``"rows"`` layout's ``cands`` (:func:`layout.rank_candidates`;
        ``lists``: the model rows' deeper lists)."""
        fair_k = fair_budget(len(self.catalog), k)
        share = query_budget_share(o["anchor"], k) if o["deep_share"] is None else o["deep_share"]
        c, lists_n = cands.numpy(), lists.numpy()
        out = [
            rank_candidates(c[i], None if q_ids is None else q_ids[i].numpy(), lists_n[i], fair_k, share)
            for i in range(c.shape[0])
        ]
        return torch.from_numpy(np.stack(out))

    def _knn(
        self, q: torch.Tensor, cat: torch.Tensor, k: int, mask: torch.Tensor | None, via_index: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores, ids) of ``q`` over the catalog: exact ``ops.knn`` on ``cat``, or the catalog's
        own index (``via_index``)."""
        if not via_index:
            return ops.knn(q, cat, k, check_finite=False, allowed=mask)
        s, r = self.catalog.search(q.cpu(), k, allowed=None if mask is None else mask.cpu())
        return s.to(q.device), r.to(q.device)

    def _check_rows(self, rows: torch.Tensor, o: dict[str, Any]) -> None:
        if not all_finite(rows):
            raise ValueError(
                f"sampling produced non-finite rows (guidance={o['guidance']!r}, sampler={o['sampler']!r}, "
                f"steps={o['steps']}); check the model weights and lower the guidance"
            )

    def _results(
        self,
        q: torch.Tensor,
        ids: np.ndarray,
        scores: np.ndarray,
        rows: np.ndarray,
        cands: torch.Tensor | None,
    ) -> list[RetrievedSet]:
        cfg = self.model.cfg
        catalog = self.catalog
        # scores: cos(item, query), as for every RetrievalResult (catalog rows are unit-norm); None when
        # the query lives in another space than the items (cond_dim != dim)
        cos = None
        if cfg.cond_dim == cfg.dim:
            qn = unit_rows(q.detach().cpu().float().numpy())
            emb = catalog.embeddings.cpu()
            flat = ids.clip(0).reshape(-1)
            if emb.dtype == torch.float32:
                items = emb.numpy()[flat]
            else:  # float16 storage: only the chosen rows are widened
                items = emb.index_select(0, torch.from_numpy(flat)).float().numpy()
            items = items.reshape(*ids.shape, cfg.dim)
            cos = np.matmul(items, qn[:, :, None])[:, :, 0]
            cos = np.where(ids >= 0, cos, np.float32(-np.inf))
        out = []
        for b in range(ids.shape[0]):
            idx = ids[b]
            out.append(
                RetrievedSet(
                    item_indices=idx,
                    row_embeddings=rows[b],
                    candidates=None if cands is None else cands[b].numpy(),
                    scores=None if cos is None else cos[b],
                    row_scores=scores[b],
                    item_ids=tuple(catalog.ids[i] if i >= 0 else "" for i in idx),
                    texts=tuple(catalog.texts[i] if i >= 0 else "" for i in idx),
                )
            )
        return out

    def retrieve(
        self, query_texts: Iterable[str], k: int | None = None, *, n_candidates: int = 0, **kw: Any
    ) -> list[RetrievedSet]:
        """Sets for query texts (any iterable of non-empty strings, e.g. a list or a generator): a list
        of :class:`RetrievedSet`, one per query (same order). ``kw``: see :meth:`retrieve_embeddings`."""
        if isinstance(query_texts, (str, bytes)) or not isinstance(query_texts, Iterable):
            raise ValueError(
                f"query_texts: expected a list of non-empty strings, got {type(query_texts).__name__}"
            )
        texts = list(query_texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"query_texts: expected a list of non-empty strings, got [{i}] = {t!r}")
        if self.encoder is None:
            raise ValueError("encoder: this retriever has no text encoder; use retrieve_embeddings()")
        if not texts:
            return []
        q = np.asarray(self.encoder.encode(texts), dtype=np.float32)
        return self.retrieve_embeddings(torch.from_numpy(q), k, n_candidates=n_candidates, **kw)
