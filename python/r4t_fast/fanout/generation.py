"""Batched generation with the fan-out language model (FOLM) and per-query latency.

:class:`FanOutLM` generates for many queries at once (left padding, greedy or sampled) and records
timings; :func:`benchmark_latency` measures per-query latency at several batch sizes. ``torch`` and
``transformers`` are imported lazily, so importing this module is cheap."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


from r4t_fast._internal import check_k, check_positive_int
from r4t_fast.fanout.constrained import FanOutConstraint
from r4t_fast.fanout.parser import ParseResult, parse_subqueries
from r4t_fast.fanout.policy import POLICY_META, resolve_policy
from r4t_fast.fanout.prompt import CHATML_END, build_messages

__all__ = [
    "check_sampling",
    "FanOutLM",
    "GenerationOutput",
    "GenerationTiming",
    "LatencyResult",
    "benchmark_latency",
]

# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationOutput:
    """One completion for one query.

    Attributes:
        text: the generated text (special tokens removed, prompt excluded).
        subqueries: the parsed subqueries (see :func:`parse_subqueries`).
        ok: at least one usable subquery was parsed.
        n_tokens: generated tokens, counting the end-of-turn token when the model emitted one.
        finished: the model ended its turn (False: cut at ``max_new_tokens``).
        parse: the full :class:`ParseResult` (``reason``, ``method``, ``format_ok``...).
    """

    text: str
    subqueries: list[str]
    ok: bool
    n_tokens: int
    finished: bool
    parse: ParseResult


@dataclass(frozen=True)
class GenerationTiming:
    """Wall-clock cost of one :meth:`FanOutLM.generate` call (tokenisation and parsing included).

    Attributes:
        n_queries: queries in the call.
        n_sequences: sequences generated (``n_queries * samples``; greedy generates one per query).
        batch_size: sequences per forward batch.
        n_batches: batches run.
        wall_s: total seconds; ``generate_s``: seconds inside ``model.generate``.
        generated_tokens: sum of :attr:`GenerationOutput.n_tokens` over the sequences.
        decode_positions: positions ``model.generate`` decoded, padding included: the sum over batches of
            rows x new positions (a batch runs until its longest answer ends). Same model, same settings:
            the same positions per second whatever the answers, where tokens per second follows their
            lengths.
    """

    n_queries: int
    n_sequences: int
    batch_size: int
    n_batches: int
    wall_s: float
    generate_s: float
    generated_tokens: int
    decode_positions: int = 0

    @property
    def per_query_s(self) -> float:
        """Amortised seconds per query (``wall_s / n_queries``)."""
        return self.wall_s / max(self.n_queries, 1)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of ``model.generate`` time, over all sequences."""
        return self.generated_tokens / self.generate_s if self.generate_s > 0 else float("nan")

    @property
    def positions_per_s(self) -> float:
        """Decoded positions (padding included) per second of ``model.generate`` time."""
        return self.decode_positions / self.generate_s if self.generate_s > 0 else float("nan")


def _check_queries(queries: Any) -> list[str]:
    if isinstance(queries, str):
        raise TypeError("queries: expected a list of strings, got a single str (wrap it in a list)")
    if not isinstance(queries, Sequence):
        raise TypeError(f"queries: expected a list of strings, got {type(queries).__name__}")
    out = list(queries)
    for i, q in enumerate(out):
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"queries[{i}]: expected a non-empty string, got {q!r}")
    return out


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_sampling(
    temperature: Any, top_p: Any = 1.0, repetition_penalty: Any = 1.0, *, sampled: bool = False
) -> tuple[float, float, float]:
    """The sampling arguments of every fan-out generation, checked once: ``temperature >= 0`` (0 = greedy;
    ``> 0`` with ``sampled``), ``top_p`` in ``(0, 1]``, ``repetition_penalty > 0`` (1 = off), all finite."""
    if not _is_number(temperature) or temperature < 0 or (sampled and temperature == 0):
        rule = "> 0" if sampled else ">= 0 (0 = greedy)"
        raise ValueError(f"temperature: expected a float {rule}, got {temperature!r}")
    if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a float in (0, 1], got {top_p!r}")
    if not _is_number(repetition_penalty) or not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty: expected a float > 0 (1 = off), got {repetition_penalty!r}")
    return float(temperature), float(top_p), float(repetition_penalty)


def _adapter_dir(spec: Any) -> tuple[Path, str] | None:
    """(adapter dir, its base model) when ``spec`` is a PEFT adapter directory (``adapter_config.json``
    and no ``config.json``: a LoRA training checkpoint), else None."""
    if not isinstance(spec, (str, os.PathLike)):
        return None
    d = Path(spec).expanduser()
    cfg = d / "adapter_config.json"
    if not cfg.is_file() or (d / "config.json").is_file():
        return None
    import json

    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"model_dir: {cfg} names no base_model_name_or_path; cannot merge the adapter")
    return d, str(base)


def trained_one_shot(model_dir: str | os.PathLike[str] | None) -> bool:
    """Whether the policy in ``model_dir`` was tuned with the worked example in its prompt: its
    ``r4t_policy.json``'s ``config.one_shot``; True for any other model (the default prompt)."""
    f = None if model_dir is None else Path(model_dir) / POLICY_META
    if f is None or not f.is_file():
        return True
    import json

    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"model_dir: {f} is not readable JSON ({exc})") from exc
    cfg = meta.get("config") if isinstance(meta, dict) else None
    value = cfg.get("one_shot", True) if isinstance(cfg, dict) else True
    if not isinstance(value, bool):
        raise ValueError(f"model_dir: {f}: config.one_shot must be a bool, got {value!r}")
    return value


def _has_tokenizer(d: Path) -> bool:
    return any((d / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))


class FanOutLM:
    """A causal chat LM that writes ``k`` subqueries per query, batched with left padding.

    Args:
        model_dir: a local Hugging Face model dir or a policy name (see :func:`resolve_policy`).
        device: torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        dtype: floating dtype of the weights (float32 by default; on CPU bfloat16 is several times slower).

    The end-of-turn token ``<|im_end|>`` (ChatML) is the eos and pad token when the vocabulary has it,
    else the tokenizer's eos; both are passed explicitly to ``generate``. Use :meth:`from_model` to wrap
    a model already in memory (a PEFT model during training, for instance).

    Example::

        lm = FanOutLM("smollm2")
        outs = lm.generate(["summer beach outfit"], k=10)
        outs[0][0].subqueries
    """

    def __init__(
        self, model_dir: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: Any = None
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        adapter = _adapter_dir(model_dir)
        try:
            path = resolve_policy(adapter[1] if adapter else model_dir)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"model_dir: {exc}".replace("model_dir: spec: ", "model_dir: ")) from exc
        tok_dir = adapter[0] if adapter and _has_tokenizer(adapter[0]) else path
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.lora_merged = False
        if adapter:  # a LoRA adapter dir (a training checkpoint): merged for inference, no adapter layers
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter[0])).merge_and_unload()
            self.lora_merged = True
        self._setup(model, tokenizer, device)
        self.model_dir: Path | None = adapter[0] if adapter else path
        # the prompt the policy was tuned on (with or without the worked example): generate's default
        self.one_shot: bool = trained_one_shot(self.model_dir)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, device: str | torch.device | None = None) -> FanOutLM:
        """Wrap a loaded causal LM and its tokenizer (no copy; the model is moved only if ``device``)."""
        self = cls.__new__(cls)
        if device is None:
            device = next(model.parameters()).device
        self._setup(model, tokenizer, device)
        self.model_dir = None
        self.lora_merged = False  # a PEFT model stays wrapped (training evaluates the live adapter)
        self.one_shot = True
        return self

    def _setup(self, model: Any, tokenizer: Any, device: Any) -> None:
        import torch

        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}"
            ) from exc
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("tokenizer: has no chat_template; FanOutLM needs a chat (instruct) model")
        end_id = tokenizer.convert_tokens_to_ids(CHATML_END) if CHATML_END in tokenizer.get_vocab() else None
        eos_ids = [i for i in (end_id, tokenizer.eos_token_id) if isinstance(i, int)]
        if not eos_ids:
            raise ValueError(
                f"tokenizer: has neither {CHATML_END} nor an eos token; cannot tell where a turn ends"
            )
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_ids))
        self.pad_token_id: int = self.eos_token_ids[0]
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.last_timing: GenerationTiming | None = None

    def __repr__(self) -> str:
        name = self.model_dir if self.model_dir is not None else type(self.model).__name__
        return f"FanOutLM({str(name)!r}, device={str(self.device)!r}, dtype={self.model.dtype})"

    def prompt_text(
        self, query: str, k: int = 10, *, one_shot: bool | None = None, think: bool = True
    ) -> str:
        """The chat-templated prompt string for one query (generation prompt included); ``one_shot``
        None: :attr:`one_shot` (the policy's own prompt)."""
        one_shot = self.one_shot if one_shot is None else bool(one_shot)
        return self.tokenizer.apply_chat_template(
            build_messages(query, k, one_shot=one_shot, think=think),
            tokenize=False,
            add_generation_prompt=True,
        )

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        encoded = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return [list(ids) for ids in encoded]

    def _left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both ``(batch, max_len)`` int64, padded on the left."""
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
                mask[i, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _generation_config(self, temperature: float, top_p: float, max_new_tokens: int) -> Any:
        from transformers import GenerationConfig

        common: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
        }
        if temperature == 0.0:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **common)

    def _processors(
        self,
        repetition_penalty: float,
        prompt_width: int,
        constraint: FanOutConstraint | None,
        max_new_tokens: int,
    ) -> Any:
        """Completion-only repetition penalty (the prompt's tokens are not penalised), then the
        constraint (last, so that its mask is final), or None when neither is on."""
        if repetition_penalty == 1.0 and constraint is None:
            return None
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

        processors = LogitsProcessorList()
        if repetition_penalty != 1.0:
            processors.append(
                RepetitionPenaltyLogitsProcessor(repetition_penalty, prompt_ignore_length=prompt_width)
            )
        if constraint is not None:
            processors.append(
                constraint.logits_processor(self.tokenizer, max_new_tokens, eos_token_id=self.pad_token_id)
            )
        return processors

    def _resolve_constraint(
        self, constrained: bool | FanOutConstraint, k: int, think: bool | None
    ) -> tuple[FanOutConstraint | None, bool]:
        """``(constraint or None, think)`` from :meth:`generate`'s ``constrained`` / ``think``."""
        if isinstance(constrained, FanOutConstraint):
            if constrained.k != k:
                raise ValueError(f"constrained: FanOutConstraint.k={constrained.k} differs from k={k}")
            if think is not None and bool(think) != constrained.think:
                raise ValueError(f"think: {think!r} differs from FanOutConstraint.think={constrained.think}")
            return constrained, constrained.think
        if not isinstance(constrained, bool):
            raise ValueError(f"constrained: expected a bool or a FanOutConstraint, got {constrained!r}")
        if think is not None and not isinstance(think, bool):
            raise ValueError(f"think: expected a bool or None, got {think!r}")
        if constrained:
            think = False if think is None else think
            return FanOutConstraint(k=k, think=think), think
        return None, True if think is None else think

    def generate(
        self,
        queries: Sequence[str],
        k: int = 10,
        num_samples: int = 1,
        temperature: float = 0.0,
        *,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        max_new_tokens: int = 192,
        batch_size: int = 8,
        seed: int | None = None,
        one_shot: bool | None = None,
        constrained: bool | FanOutConstraint = False,
        think: bool | None = None,
    ) -> list[list[GenerationOutput]]:
        """Generate and parse subqueries for every query.

        Args:
            queries: the user queries, ``n`` non-empty strings.
            k: subqueries asked for (and kept at most) per completion.
            num_samples: completions per query. Greedy decoding (``temperature == 0``) is deterministic,
                so it runs once per query and repeats the result ``num_samples`` times.
            temperature: 0 for greedy decoding, > 0 to sample (pure temperature sampling, ``top_k`` off).
            top_p: nucleus-sampling mass when sampling.
            repetition_penalty: CTRL-style penalty on tokens already generated in this completion (the
                prompt is exempt, so the format tags stay likely); 1 = off.
            max_new_tokens: cap on generated tokens per completion.
            batch_size: sequences per forward batch (prompts are sorted by length to limit padding).
            seed: seeds the sampler (the global torch RNG is left untouched); sampled outputs depend on the
                seed *and* on how sequences are batched.
            one_shot: include the worked example in the prompt (see :func:`build_messages`); None: the
                policy's own setting (:attr:`one_shot`: as it was tuned, else True).
            constrained: ``True`` (a default :class:`~r4t_fast.fanout.constrained.FanOutConstraint` for
                this ``k``) or a constraint: every completion is then exactly ``k`` distinct short
                subqueries in the strict format, ended within ``max_new_tokens`` (which must be at least
                ``constraint.min_new_tokens(lm.tokenizer)``, about 57 for k = 10 with SmolLM2).
            think: ask for (and, constrained, force) a ``<think>`` block. ``None``: the constraint's
                setting (off by default) when constrained, else on (the paper's prompt, unchanged).

        Returns:
            ``out[i][j]``: sample ``j`` of query ``i``, shape ``(n, num_samples)`` as nested lists.
            Timings of the call are in :attr:`last_timing`.
        """
        import torch

        queries = _check_queries(queries)
        k = check_k(k)
        num_samples = check_positive_int(num_samples, "num_samples")
        max_new_tokens = check_positive_int(max_new_tokens, "max_new_tokens")
        batch_size = check_positive_int(batch_size, "batch_size")
        temperature, top_p, repetition_penalty = check_sampling(temperature, top_p, repetition_penalty)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed: expected an int or None, got {seed!r}")
        constraint, think = self._resolve_constraint(constrained, k, think)
        if constraint is not None:  # fail before any generation when the cap cannot hold the answer
            constraint.logits_processor(self.tokenizer, max_new_tokens, eos_token_id=self.pad_token_id)

        t0 = time.perf_counter()
        greedy = float(temperature) == 0.0
        per_query = 1 if greedy else num_samples
        encoded = self._encode([self.prompt_text(q, k, one_shot=one_shot, think=think) for q in queries])
        jobs = [(qi, s) for qi in range(len(queries)) for s in range(per_query)]
        order = sorted(range(len(jobs)), key=lambda j: -len(encoded[jobs[j][0]]))  # stable: ties keep order
        config = self._generation_config(float(temperature), float(top_p), max_new_tokens)
        results: list[GenerationOutput | None] = [None] * len(jobs)
        generate_s = 0.0
        n_batches = positions = 0
        rng_devices: list[int] = []
        if self.device.type == "cuda":
            rng_devices = [
                self.device.index if self.device.index is not None else torch.cuda.current_device()
            ]
        with contextlib.ExitStack() as stack:
            if seed is not None:
                stack.enter_context(torch.random.fork_rng(devices=rng_devices))
                torch.manual_seed(seed)
            stack.enter_context(torch.inference_mode())
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                input_ids, attention_mask = self._left_pad([encoded[jobs[j][0]] for j in batch])
                t1 = time.perf_counter()
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    logits_processor=self._processors(
                        float(repetition_penalty), input_ids.shape[1], constraint, max_new_tokens
                    ),
                )
                generate_s += time.perf_counter() - t1
                n_batches += 1
                positions += out.shape[0] * (out.shape[1] - input_ids.shape[1])
                new_tokens = out[:, input_ids.shape[1] :].tolist()
                for j, row in zip(batch, new_tokens, strict=True):
                    results[j] = self._finish(row, k)

        outputs: list[list[GenerationOutput]] = [[] for _ in queries]
        for (qi, _), res in zip(jobs, results, strict=True):
            assert res is not None  # every job ran exactly once (internal invariant, not user input)
            outputs[qi].append(res)
        if greedy and num_samples > 1:
            outputs = [row * num_samples for row in outputs]
        self.last_timing = GenerationTiming(
            n_queries=len(queries),
            n_sequences=len(jobs),
            batch_size=batch_size,
            n_batches=n_batches,
            wall_s=time.perf_counter() - t0,
            generate_s=generate_s,
            generated_tokens=sum(r.n_tokens for r in results if r is not None),
            decode_positions=positions,
        )
        return outputs

    def _finish(self, row: list[int], k: int) -> GenerationOutput:
        """Cut one generated row at its first end token, decode and parse it."""
        eos = set(self.eos_token_ids)
        end = next((i for i, tok in enumerate(row) if tok in eos), None)
        content = row if end is None else row[:end]
        text = self.tokenizer.decode(content, skip_special_tokens=True)
        parse = parse_subqueries(text, k)
        return GenerationOutput(
            text=text,
            subqueries=parse.queries,
            ok=parse.ok,
            n_tokens=len(row) if end is None else end + 1,
            finished=end is not None,
            parse=parse,
        )


# --------------------------------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyResult:
    """Latency of greedy fan-out at one batch size (see :func:`benchmark_latency`).

    Attributes:
        batch_size: queries per batch.
        batch_s: mean seconds per batch (the paper's "latency at batch B").
        per_query_s: ``batch_s / batch_size``.
        mean_new_tokens: mean generated tokens per sequence.
        parse_ok_rate: fraction of completions with at least one usable subquery.
        format_ok_rate: fraction that followed the strict format.
        batch_times_s: every measured batch.
    """

    batch_size: int
    batch_s: float
    per_query_s: float
    mean_new_tokens: float
    parse_ok_rate: float
    format_ok_rate: float
    batch_times_s: list[float] = field(default_factory=list)


def benchmark_latency(
    lm: FanOutLM,
    queries: Sequence[str],
    batch_sizes: Sequence[int] = (1, 8, 64),
    *,
    k: int = 10,
    max_new_tokens: int = 160,
    num_batches: int = 1,
    warmup: bool = True,
) -> list[LatencyResult]:
    """Time greedy generation of ``num_batches`` full batches at each batch size.

    Batches are filled by cycling through ``queries`` so every batch has exactly ``batch_size``
    queries. Generation stops when every sequence has ended or at ``max_new_tokens``, so report
    ``mean_new_tokens`` next to the times. One small untimed warm-up call runs first with ``warmup``.
    """
    queries = _check_queries(queries)
    if not queries:
        raise ValueError("queries: expected at least one query, got an empty list")
    num_batches = check_positive_int(num_batches, "num_batches")
    results: list[LatencyResult] = []
    if warmup:
        lm.generate(queries[:1], k=k, max_new_tokens=min(8, max_new_tokens), batch_size=1)
    cursor = 0
    for bs in batch_sizes:
        bs = check_positive_int(bs, "batch_sizes[i]")
        times: list[float] = []
        outs: list[GenerationOutput] = []
        for _ in range(num_batches):
            batch = [queries[(cursor + i) % len(queries)] for i in range(bs)]
            cursor += bs
            out = lm.generate(batch, k=k, max_new_tokens=max_new_tokens, batch_size=bs)
            timing = lm.last_timing
            if timing is None:  # pragma: no cover - generate always sets it
                raise RuntimeError("lm.last_timing: not set by generate")
            times.append(timing.wall_s)
            outs.extend(o[0] for o in out)
        mean_s = sum(times) / len(times)
        results.append(
            LatencyResult(
                batch_size=bs,
                batch_s=mean_s,
                per_query_s=mean_s / bs,
                mean_new_tokens=sum(o.n_tokens for o in outs) / len(outs),
                parse_ok_rate=sum(o.ok for o in outs) / len(outs),
                format_ok_rate=sum(o.parse.format_ok for o in outs) / len(outs),
                batch_times_s=times,
            )
        )
    return results
