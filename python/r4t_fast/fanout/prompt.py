"""The fan-out prompt: the paper's instruction plus a one-shot example, in ChatML messages.

The model writes ``k`` search subqueries, optionally after a one-sentence reasoning block::

    <think>one short sentence</think>          (only with think=True)
    <queries>["...", "...", ...]</queries>

The prompt is sized for small policies and short generation caps. Measured with the SmolLM2-135M
tokenizer for k = 10: the worked answer is 63 tokens with ``think=False`` and 80 with ``think=True``
(the previous example was 108 tokens, so a model that imitated it needed ~110 of a 112-128-token
cap); the system message is 79 / 89 tokens (was 105) and the whole chat-templated prompt 176 / 203
(was 250). ``tests/test_llm.py::test_prompt_fits_the_token_budget`` keeps it so.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from r4t_fast._internal import check_k

CHATML_END = "<|im_end|>"
"""ChatML end-of-turn token (the GGUF metadata's eos is wrong: pass this token's id explicitly)."""

__all__ = [
    "CHATML_END",
    "REQUEST_PREFIX",
    "SYSTEM_PROMPT",
    "SYSTEM_PROMPT_NO_THINK",
    "build_messages",
    "format_answer",
    "query_from_prompt",
]

REQUEST_PREFIX = "Request: "
"""What the user turn puts before the query (:func:`build_messages`; :func:`query_from_prompt` reads it)."""

# --------------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------------

_INSTRUCTION = (
    "You write search queries for a catalog of fashion items and music.\n"
    "Write {k} queries for the request. They are diverse but on the same topic: "
    "each adds or changes one to three words of the request.\n"
    "Answer in this format and nothing else:\n"
)
_LIST_RULE = "The JSON list holds exactly {k} different short queries."

#: System message with a reasoning block (``think=True``); ``{k}`` is replaced by the number of subqueries.
SYSTEM_PROMPT = (
    _INSTRUCTION + "<think>one short sentence</think>\n" + '<queries>["...", "..."]</queries>\n' + _LIST_RULE
)
#: System message without a reasoning block (``think=False``, the default for small constrained policies).
SYSTEM_PROMPT_NO_THINK = _INSTRUCTION + '<queries>["...", "..."]</queries>\n' + _LIST_RULE

_EXAMPLE_QUERY = "beach day"
_EXAMPLE_THOUGHT = "Light clothes, sun gear and upbeat songs."
# Short (2-3 words, 2-4 tokens each) so that an answer that imitates the example stays far below the cap.
_EXAMPLE_SUBQUERIES = (
    "beach straw hat",
    "linen beach shirt",
    "beach sandals",
    "beach tote bag",
    "surf rock songs",
    "beach sunglasses",
    "floral sundress",
    "summer pop playlist",
    "beach towel",
    "denim shorts",
    "reggae beach songs",
    "white bikini",
    "beach cover up",
    "flip flops",
    "sunscreen",
    "beach hoop earrings",
    "tropical house music",
    "wide brim sun hat",
    "beach day jazz",
    "rattan beach bag",
)


def format_answer(queries: Sequence[str], thought: str | None = None) -> str:
    """An answer in the exact format the parser and the constraint use (``think`` block when ``thought``).

    >>> format_answer(["a b", "c"])
    '<queries>["a b", "c"]</queries>'
    >>> format_answer(["a"], thought="x")
    '<think>x</think>\\n<queries>["a"]</queries>'
    """
    body = f"<queries>{json.dumps(list(queries), ensure_ascii=False)}</queries>"
    return body if thought is None else f"<think>{thought}</think>\n{body}"


def build_messages(
    query: str, k: int = 10, *, one_shot: bool = True, think: bool = True
) -> list[dict[str, str]]:
    """Chat messages asking the policy for ``k`` subqueries of ``query``.

    The system message carries the paper's instruction ("diverse but on the same topic; add or change
    one to three words", exactly ``k`` different queries in ``<queries>[...]</queries>``), preceded by a
    one-sentence ``<think>...</think>`` block when ``think`` (the paper's format, the default here;
    :class:`~r4t_fast.fanout.constrained.FanOutConstraint` defaults to ``think=False`` for small
    policies). With ``one_shot`` (default) a short worked example precedes the query as an earlier
    user/assistant turn; it has exactly ``k`` items for ``k <= 20`` and is left out above that.

    >>> [m["role"] for m in build_messages("rainy sunday jazz", k=3)]
    ['system', 'user', 'assistant', 'user']
    >>> build_messages("rainy sunday jazz", k=3)[-1]["content"]
    'Request: rainy sunday jazz'
    >>> build_messages("rainy sunday jazz", k=2, think=False)[2]["content"]
    '<queries>["beach straw hat", "linen beach shirt"]</queries>'
    """
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"query: expected a non-empty string, got {query!r}")
    k = check_k(k)
    system = SYSTEM_PROMPT if think else SYSTEM_PROMPT_NO_THINK
    messages = [{"role": "system", "content": system.format(k=k)}]
    if one_shot and k <= len(_EXAMPLE_SUBQUERIES):
        messages.append({"role": "user", "content": f"{REQUEST_PREFIX}{_EXAMPLE_QUERY}"})
        thought = _EXAMPLE_THOUGHT if think else None
        messages.append({"role": "assistant", "content": format_answer(_EXAMPLE_SUBQUERIES[:k], thought)})
    messages.append({"role": "user", "content": f"{REQUEST_PREFIX}{' '.join(query.split())}"})
    return messages


def query_from_prompt(text: str) -> str | None:
    """The query of a chat-templated :func:`build_messages` prompt (its last user turn), or ``None``.

    >>> query_from_prompt("<|im_start|>user\\nRequest: beach day<|im_end|>\\n"
    ...                   "<|im_start|>user\\nRequest: red  scarf<|im_end|>\\n<|im_start|>assistant\\n")
    'red scarf'
    """
    at = text.rfind(REQUEST_PREFIX)
    if at < 0:
        return None
    rest = text[at + len(REQUEST_PREFIX) :]
    for end in (CHATML_END, "\n"):
        rest = rest.split(end, 1)[0]
    query = " ".join(rest.split())
    return query or None
