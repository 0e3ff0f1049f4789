"""``r4t serve``: an HTTP service over a :class:`~r4t_fast.Retriever` (FastAPI + uvicorn, the ``serve``
extra): micro-batched retrieval, a live catalog swapped atomically, Prometheus metrics and a page to look
at sets. Imports nothing heavy at package import: ``create_app`` lives in :mod:`r4t_fast.serve.app`."""

from __future__ import annotations

__all__: list[str] = []
