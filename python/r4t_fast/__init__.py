"""r4t_fast: fast, property-aligned fan-out retrieval (R4T, arXiv 2603.06397).

Public names only; the compiled core ``r4t_fast._C`` is private (see ``_backend``). Importing this
package never touches a GPU.
"""

from __future__ import annotations

from ._backend import build_info, cuda_available
from ._version import __version__

__all__ = ["__version__", "build_info", "cuda_available", "Catalog", "ops"]


_LAZY = {"Catalog": ("catalog", "Catalog"), "Retriever": ("retriever", "Retriever"), "ops": ("ops", None)}


def __getattr__(name: str):  # lazy imports keep `import r4t_fast` light
    if name not in _LAZY:
        raise AttributeError(f"module 'r4t_fast' has no attribute {name!r}")
    import importlib

    mod_name, attr = _LAZY[name]
    mod = importlib.import_module(f"{__name__}.{mod_name}")
    return mod if attr is None else getattr(mod, attr)
