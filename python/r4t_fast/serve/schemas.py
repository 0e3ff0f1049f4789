"""The request and response bodies of ``r4t serve`` (pydantic models: the one validation rule of the API).

Every model forbids unknown fields, so a typo (``"mmr_lamda"``) is a 422 naming the field, not a silently
ignored option. Ranges follow the library's own checks (``Retriever`` and ``check_*``): the API refuses
what the library would refuse, before the request reaches the batcher.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from r4t_fast._internal import MAX_K
from r4t_fast.diffusion.options import MAX_GUIDANCE, MAX_PULL, MAX_STEPS

__all__ = [
    "METHODS",
    "CatalogItem",
    "CatalogUpdate",
    "Filter",
    "RetrieveRequest",
]

METHODS = ("r4t", "dense", "mmr", "dpp")
"""What ``POST /v1/retrieve`` can run: R4T-Diffusion sets and the three query-side baselines."""

MAX_QUERIES = 256
"""Most queries in one request (a bigger job is a batch job, not a request)."""
MAX_FILTER_IDS = 100_000
MAX_UPDATE_ITEMS = 10_000

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
ItemId = Annotated[str, StringConstraints(min_length=1, max_length=512)]
Scalar = str | int | float | bool | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Filter(_Strict):
    """Items a request may return: every given clause must hold (AND); an empty filter allows all."""

    ids: list[ItemId] | None = Field(None, max_length=MAX_FILTER_IDS, description="allowed item ids")
    categories: list[str] | None = Field(None, max_length=10_000, description="allowed categories")
    metadata: dict[str, Scalar] | None = Field(
        None, description="metadata equals: every key must be present with exactly this value"
    )

    def key(self) -> str:
        """A canonical string (requests with the same filter share a batch and a cached mask)."""
        return json.dumps(self.model_dump(exclude_none=True), sort_keys=True)


class RetrieveRequest(_Strict):
    """``POST /v1/retrieve``: one set of ``k`` items per query."""

    queries: list[Text] = Field(..., min_length=1, max_length=MAX_QUERIES, description="query texts")
    k: int = Field(10, ge=1, le=MAX_K, description="items per set")
    method: Literal["r4t", "dense", "mmr", "dpp"] = "r4t"
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="r4t sampler steps (default: model's)")
    guidance: float | None = Field(None, ge=-MAX_GUIDANCE, le=MAX_GUIDANCE, description="r4t CFG weight")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="r4t seed (64-bit)")
    anchor: float | None = Field(None, ge=0.0, lt=1.0, description="r4t: the query's share of the set")
    pull: float | None = Field(None, ge=0.0, le=MAX_PULL, description="r4t: rows moved toward the query")
    mmr_lambda: float = Field(0.5, ge=0.0, le=1.0, description="mmr: relevance weight (1 = dense)")
    dpp_theta: float = Field(0.5, ge=0.0, lt=1.0, description="dpp: relevance weight (0 = diversity)")
    pool: int = Field(100, ge=1, le=10_000, description="mmr / dpp: candidates re-ranked per query")
    filter: Filter | None = None

    @model_validator(mode="after")
    def _pool_holds_k(self) -> RetrieveRequest:
        if self.method in ("mmr", "dpp") and self.k > self.pool:
            raise ValueError(f"k: {self.k} exceeds pool ({self.pool}) for method {self.method!r}")
        return self

    def batch_key(self) -> str:
        """Requests with equal keys run in one batched call (everything but the queries)."""
        d = self.model_dump(exclude={"queries", "filter"})
        d["filter"] = None if self.filter is None else self.filter.key()
        return json.dumps(d, sort_keys=True)


class CatalogItem(_Strict):
    """An item to add (``text`` required) or update (only the given fields change)."""

    id: ItemId
    text: Text | None = None
    category: str | None = None
    metadata: dict[str, Any] | None = None
    embedding: list[float] | None = Field(
        None, description="the item's vector (default: the retriever's encoder applied to text)"
    )


class CatalogUpdate(_Strict):
    """``POST /v1/catalog``: removals, then updates, then additions, applied as one atomic change."""

    add: list[CatalogItem] = Field(default_factory=list, max_length=MAX_UPDATE_ITEMS)
    update: list[CatalogItem] = Field(default_factory=list, max_length=MAX_UPDATE_ITEMS)
    remove: list[ItemId] = Field(default_factory=list, max_length=MAX_UPDATE_ITEMS)

    @model_validator(mode="after")
    def _texts_for_new_items(self) -> CatalogUpdate:
        for j, it in enumerate(self.add):
            if it.text is None and it.embedding is None:
                raise ValueError(f"add[{j}].text: a new item needs a text (or an embedding)")
        if not (self.add or self.update or self.remove):
            raise ValueError("add: nothing to change (add, update and remove are all empty)")
        return self
