"""Method resolution for ``r4t eval``: a method name, a policy dir or a retriever dir -> a retriever
factory; the config recorded for it; and the catalog check a retriever directory must pass."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from r4t_fast.data.prepare import EvalData
from r4t_fast.eval.records import _jsonable, catalog_fingerprint, catalog_mismatch

__all__ = ["check_catalog", "resolve_method"]


def _is_policy_dir(text: str) -> bool:
    return Path(text).expanduser().is_dir()


def _saved_catalog(text: str) -> Any:
    """The catalog saved in retriever directory ``text``, or None where it cannot be read."""
    from r4t_fast.data.catalog import Catalog

    try:
        return Catalog.load(Path(text).expanduser() / "catalog", verify=False)
    except (OSError, ValueError):
        return None


def resolve_method(
    method: Any,
    data: EvalData,
    *,
    method_name: str | None = None,
    method_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, str]:
    """Build the retriever for ``method`` on ``data``'s catalog; returns ``(retriever, method name)``.

    ``method`` is a registered baseline name (``dense``, ``mmr``, ``dpp``, ``llm-zeroshot``, ``llm-bon``),
    ``"folm"`` (with ``policy=`` in ``method_kwargs``), a diffusion retriever directory (``r4t-diffusion``,
    one holding ``retriever.json``), a local policy directory (``folm``), an object with
    ``retrieve(query_texts, k, *, n_candidates)`` or a factory ``(catalog, encoder) -> such an object``.

    Raises:
        ValueError: an unknown name (the message lists the valid choices).
    """
    from r4t_fast.eval.baselines import available_baselines, get_baseline

    kwargs = dict(method_kwargs or {})
    if isinstance(method, (str, os.PathLike)):
        text = os.fspath(method)
        if text in available_baselines():
            try:
                return get_baseline(text, catalog=data.catalog, encoder=data.encoder, **kwargs), text
            except TypeError as exc:  # an argument the method's constructor does not take
                raise ValueError(f"method_kwargs: {sorted(kwargs)} not accepted by {text!r}: {exc}") from exc
        if (Path(text).expanduser() / "retriever.json").is_file():  # a diffusion retriever directory
            from r4t_fast.diffusion.retriever import Retriever

            name = method_name or "r4t-diffusion"
            try:
                retriever = Retriever.from_pretrained(text, encoder=data.encoder, **kwargs)
            except ValueError:
                # a retriever of another dataset or encoder fails on the query dimension first; the
                # catalog check says what is wrong (ids or embeddings differ), naming both sides
                own = _saved_catalog(text)
                if own is not None:
                    check_catalog(None, data.catalog, source=text, target=data.dataset.name, own=own)
                raise
            return retriever, name
        if text == "folm" or _is_policy_dir(text):
            from r4t_fast.eval.llm_baselines import LLMFanOutBaseline

            if text != "folm":
                kwargs["policy"] = text
            if "policy" not in kwargs:
                raise ValueError(
                    "method: 'folm' needs a tuned policy: pass --method MODEL_DIR or --policy DIR"
                )
            name = method_name or "folm"
            try:
                return LLMFanOutBaseline(data.catalog, data.encoder, name=name, **kwargs), name
            except TypeError as exc:
                raise ValueError(f"method_kwargs: {sorted(kwargs)} not accepted by {name!r}: {exc}") from exc
        raise ValueError(
            f"method: unknown method {text!r}; valid choices: {', '.join(available_baselines())}, "
            "or a local policy directory (evaluated as 'folm')"
        )
    if callable(getattr(method, "retrieve", None)) and not isinstance(method, type):
        retriever = method
    elif callable(method):
        retriever = method(data.catalog, data.encoder)
        if not callable(getattr(retriever, "retrieve", None)):
            raise ValueError("method: the factory did not return an object with .retrieve()")
    else:
        raise ValueError(
            "method: expected a method name, a policy dir, a retriever or a factory, "
            f"got {type(method).__name__}"
        )
    name = method_name or getattr(retriever, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError("method_name: required when the retriever has no .name")
    return retriever, name


def _method_config(retriever: Any) -> dict[str, Any]:
    cfg = getattr(retriever, "config", None)
    if callable(cfg):
        out = dict(cfg())
    else:
        out = {}
        for attr in ("lambda_", "pool", "theta"):
            if hasattr(retriever, attr):
                out[attr] = getattr(retriever, attr)
    out["class"] = f"{type(retriever).__module__}.{type(retriever).__qualname__}"
    return _jsonable(out)


def check_catalog(
    retriever: Any,
    catalog: Any,
    *,
    source: str | None = None,
    target: str | None = None,
    own: Any = None,
) -> dict[str, Any]:
    """The evaluation catalog's fingerprint; raises ValueError if ``retriever`` brings another catalog.

    A retriever with its own ``.catalog`` (a diffusion retriever directory) is compared by item ids and
    by the sha256 of its float32 embeddings (:func:`r4t_fast.eval.records.catalog_fingerprint`); the
    message says which of the two differs, and names ``source`` (the retriever directory) and
    ``target`` (the evaluation dataset) when given. ``own`` is the retriever's catalog when it is
    already loaded apart from a retriever. Retrievers built on ``catalog`` itself pass at no cost.
    """
    fp = catalog_fingerprint(catalog)
    own = getattr(retriever, "catalog", None) if own is None else own
    if own is None or own is catalog:
        return fp
    try:
        theirs = catalog_fingerprint(own)
    except ValueError:
        return fp  # not a catalog object (e.g. a test double): nothing to compare
    why = catalog_mismatch(theirs, fp)
    if why is not None:
        names = f"retriever {source!r}" if source else "the retriever"
        names += f" vs dataset {target!r}" if target else ""
        raise ValueError(
            "method: the retriever's catalog is not the evaluation catalog: "
            f"{why}; {names}: train or rebuild the retriever on this dataset's catalog"
        )
    return fp
