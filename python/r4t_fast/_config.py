"""The one helper every config dataclass uses: a field with help text (``metadata["help"]``), read by the
CLI's argument parsers and the configs' ``help()`` (``RLConfig``, ``DiffusionTrainConfig``)."""

from __future__ import annotations

from dataclasses import field
from typing import Any

__all__ = ["help_field"]


def help_field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text; a list or dict default is copied for every instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})
