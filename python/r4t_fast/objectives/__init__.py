"""Set-level objectives of R4T, one home for each formula: the RL rewards (``r4t_fast.fanout.rewards``)
and the evaluation (``r4t_fast.eval.metrics``) both call these functions.

- :mod:`~r4t_fast.objectives.terms`: the OAR terms (groundedness, Vendi diversity, alignment), their
  ``composite`` with the paper's ``DEFAULT_WEIGHTS``, Vendi / ILD of item sets and item relevance;
- :mod:`~r4t_fast.objectives.coverage`: WSCR coverage by id (recall, hit, MRecall, category coverage),
  the fair budget and its round-robin candidate union.
"""

from __future__ import annotations

from r4t_fast.objectives.coverage import *  # noqa: F403
from r4t_fast.objectives.coverage import __all__ as _coverage_all
from r4t_fast.objectives.terms import *  # noqa: F403
from r4t_fast.objectives.terms import __all__ as _terms_all

__all__ = sorted([*_terms_all, *_coverage_all])
