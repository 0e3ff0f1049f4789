"""Stage 1's room: the fan-out language model (FOLM) and its set-level rewards.

- :mod:`~r4t_fast.fanout.policy`: a policy spec -> a local model dir (SmolLM2 converted from its GGUF once);
- :mod:`~r4t_fast.fanout.prompt`: the paper's instruction and one-shot example as chat messages;
- :mod:`~r4t_fast.fanout.parser`: subqueries out of any completion, never raising on the text;
- :mod:`~r4t_fast.fanout.constrained`: constrained decoding (:class:`FanOutConstraint`): every answer is
  exactly k distinct short subqueries in the strict format, for FanOutLM and for TRL's GRPOTrainer;
- :mod:`~r4t_fast.fanout.generation`: :class:`FanOutLM`, batched generation and latency;
- :mod:`~r4t_fast.fanout.rewards`: the OAR and WSCR rewards of a completion batch (TRL reward function).

The names of the old ``r4t_fast.llm`` module are re-exported here. The LLM *baselines* of the old
``r4t_fast.fanout`` module (``LLMFanOutBaseline``, ``BestOfNBaseline``, ...) now live in
:mod:`r4t_fast.eval.llm_baselines`; they stay reachable from here for one release.
"""

from __future__ import annotations

from typing import Any

from r4t_fast.fanout.constrained import (
    FanOutConstraint,
    FanOutLogitsProcessor,
    constrained_generate,
    install_constraint,
)
from r4t_fast.fanout.generation import (
    FanOutLM,
    GenerationOutput,
    GenerationTiming,
    LatencyResult,
    benchmark_latency,
)
from r4t_fast.fanout.parser import ParseResult, parse_subqueries
from r4t_fast.fanout.policy import (
    DEFAULT_POLICY,
    POLICY_CHOICES,
    default_cache_dir,
    find_smollm2_gguf,
    resolve_policy,
)
from r4t_fast.fanout.prompt import (
    CHATML_END,
    SYSTEM_PROMPT,
    SYSTEM_PROMPT_NO_THINK,
    build_messages,
    format_answer,
)

__all__ = [
    "CHATML_END",
    "DEFAULT_POLICY",
    "POLICY_CHOICES",
    "SYSTEM_PROMPT",
    "SYSTEM_PROMPT_NO_THINK",
    "FanOutConstraint",
    "FanOutLM",
    "FanOutLogitsProcessor",
    "GenerationOutput",
    "GenerationTiming",
    "LatencyResult",
    "ParseResult",
    "benchmark_latency",
    "build_messages",
    "constrained_generate",
    "default_cache_dir",
    "find_smollm2_gguf",
    "format_answer",
    "install_constraint",
    "parse_subqueries",
    "resolve_policy",
]

_MOVED = ("BestOfNBaseline", "FanOut", "FanOutStats", "LLMFanOutBaseline")


def __getattr__(name: str) -> Any:  # deprecated: the LLM baselines of the 0.1 ``r4t_fast.fanout`` module
    if name in _MOVED:
        import warnings

        from r4t_fast.eval import llm_baselines

        warnings.warn(
            f"r4t_fast.fanout.{name} is deprecated: import r4t_fast.eval.llm_baselines.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(llm_baselines, name)
    raise AttributeError(f"module 'r4t_fast.fanout' has no attribute {name!r}")
