"""Old module paths of r4t_fast 0.1 (``r4t_fast.metrics``, ``r4t_fast.baselines``, ...), kept importable
for one release as thin aliases of their new homes; importing one warns with the new path.

A path with one new home is that very module (so attribute lookups and patches reach the real code);
a path whose contents were split (``metrics``, ``llm``, ``evaluation``) is a read-only view that
re-exports the public names of its new homes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence

__all__ = ["ALIASES", "install"]

ALIASES: dict[str, tuple[str, ...]] = {
    "_backend": ("r4t_fast.kernels._backend",),
    "_arrays": ("r4t_fast.kernels._arrays",),
    "ops": ("r4t_fast.kernels.ops",),
    "reference": ("r4t_fast.kernels.reference",),
    "catalog": ("r4t_fast.data.catalog",),
    "encoders": ("r4t_fast.data.encoders",),
    "llm": (
        "r4t_fast.fanout.policy",
        "r4t_fast.fanout.prompt",
        "r4t_fast.fanout.parser",
        "r4t_fast.fanout.generation",
    ),
    "rewards": ("r4t_fast.fanout.rewards",),
    "sampler": ("r4t_fast.diffusion.samplers",),
    "retriever": ("r4t_fast.diffusion.retriever",),
    "metrics": ("r4t_fast.objectives", "r4t_fast.eval.metrics", "r4t_fast.eval.stats"),
    "baselines": ("r4t_fast.eval.baselines",),
    "evaluation": ("r4t_fast.eval.evaluation", "r4t_fast.data.prepare"),
    "report": ("r4t_fast.eval.report",),
    "demo": ("r4t_fast.eval.demo",),
}
"""Old name (under ``r4t_fast.``) -> the module(s) that now hold its contents."""


def _view(name: str, targets: Sequence[str]) -> types.ModuleType:
    view = types.ModuleType(name, f"Deprecated alias of {', '.join(targets)}.")
    names: list[str] = []
    for t in targets:
        mod = importlib.import_module(t)
        public = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
        for n in public:
            setattr(view, n, getattr(mod, n))
            names.append(n)
    view.__all__ = sorted(set(names))  # type: ignore[attr-defined]
    return view


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, targets: tuple[str, ...]) -> None:
        self.targets = targets

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new = " / ".join(self.targets)
        warnings.warn(f"{spec.name} is deprecated: import {new}", DeprecationWarning, stacklevel=3)
        if len(self.targets) == 1:
            return importlib.import_module(self.targets[0])
        return _view(spec.name, self.targets)

    def exec_module(self, module: types.ModuleType) -> None:  # already executed
        return None


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None):  # type: ignore[override]
        prefix, _, leaf = fullname.partition(".")
        if prefix != "r4t_fast" or leaf not in ALIASES:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(ALIASES[leaf]))


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
