"""r4t_fast: fast, property-aligned fan-out retrieval (R4T, arXiv 2603.06397).

Public names only; the compiled core ``r4t_fast._C`` is private (see ``r4t_fast.kernels._backend``).
Importing this package never touches a GPU. The rooms of the package are described in
``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

from r4t_fast import _compat
from r4t_fast._version import __version__
from r4t_fast.kernels._backend import build_info, cuda_available

__all__ = ["__version__", "build_info", "cuda_available", "Catalog", "Retriever", "ops"]

_compat.install()  # old module paths (r4t_fast.metrics, ...) stay importable for one release

_LAZY = {
    "Catalog": ("r4t_fast.data.catalog", "Catalog"),
    "Retriever": ("r4t_fast.diffusion.retriever", "Retriever"),
    "ops": ("r4t_fast.kernels.ops", None),
}


def __getattr__(name: str):  # lazy imports keep `import r4t_fast` light
    if name not in _LAZY:
        raise AttributeError(f"module 'r4t_fast' has no attribute {name!r}")
    import importlib

    mod_name, attr = _LAZY[name]
    mod = importlib.import_module(mod_name)
    return mod if attr is None else getattr(mod, attr)
