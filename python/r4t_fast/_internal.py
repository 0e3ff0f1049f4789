"""Shared rules with one home: argument checks, atomic file/directory writes, crash-safe saved
directories (:func:`save_dir_atomically` / :func:`verify_dir`), row normalisation, the cache root and
the machine description recorded next to every number. Internal: every room imports from here (it
imports nothing of r4t_fast). Each check raises ``ValueError`` naming the argument, the rule, the value.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "MANIFEST_NAME",
    "MAX_K",
    "DirManifest",
    "SavedDirError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_choice",
    "check_float",
    "check_k",
    "check_non_negative_int",
    "check_positive_int",
    "check_save_target",
    "check_seed",
    "cpu_model",
    "default_cache_dir",
    "machine_description",
    "package_versions",
    "publish_dir",
    "save_dir_atomically",
    "sha256_file",
    "unit_rows",
    "verify_dir",
]

MAX_K = 64
"""Most subqueries / rows per set anywhere in the package (prompt, parser, rewards, baselines)."""

A = TypeVar("A")


# ----------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))


def check_positive_int(value: Any, name: str, upper: int | None = None) -> int:
    """``value`` as an int in ``[1, upper]``; bools, floats and strings are refused, numpy ints accepted."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name}: expected an int in [1, {upper}], got {value!r}")
    return int(value)


def check_non_negative_int(value: Any, name: str) -> int:
    """``value`` as an int ``>= 0`` (same type rules as ``check_positive_int``)."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    return int(value)


def check_k(k: Any, name: str = "k", upper: int = MAX_K) -> int:
    """The set size ``k``: an int in ``[1, upper]`` (default ``MAX_K``)."""
    if not _is_int(k) or not 1 <= k <= upper:
        raise ValueError(f"{name}: expected an int in [1, {upper}], got {k!r}")
    return int(k)


def check_seed(value: Any, name: str = "seed") -> int:
    """A random seed: a 64-bit int (numpy ints accepted, bools refused)."""
    if not _is_int(value) or not -(2**63) <= value < 2**64:  # torch.manual_seed's range
        what = "a 64-bit int in [-2**63, 2**64 - 1]" if _is_int(value) else "an int"
        raise ValueError(f"{name}: expected {what}, got {value!r:.40}")
    return int(value)


def check_float(
    value: Any, name: str, *, low: float | None = None, high: float | None = None, finite: bool = True
) -> float:
    """``value`` as a float in ``[low, high]`` (either bound optional); bools and strings are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    v = float(value)
    if finite and not np.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if (low is not None and v < low) or (high is not None and v > high):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name}: expected a number in [{lo}, {hi}], got {value!r}")
    return v


def check_choice(value: Any, choices: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``choices``; the error lists the valid choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------------
def unit_rows(x: A) -> A:
    """L2-normalise the last axis of a torch tensor or numpy array; all-zero rows stay zero.

    The one normalisation rule of the package (also the ``set_stats`` kernel's convention). Callers that
    must refuse zero rows (a catalog) check for them before calling.
    """
    if isinstance(x, np.ndarray):
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        return x / np.where(norm > 0, norm, np.ones_like(norm))  # type: ignore[return-value]
    import torch

    if isinstance(x, torch.Tensor):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return x / torch.where(norm > 0, norm, torch.ones_like(norm))  # type: ignore[return-value]
    raise ValueError(f"x: expected a torch tensor or numpy array, got {type(x).__name__}")


# ----------------------------------------------------------------------------------------------------
# atomic IO
# ----------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # platforms without directory fds or fsync on them
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Replace file ``path`` atomically: ``write(tmp)`` fills a temporary sibling, which is fsynced and
    renamed onto ``path`` (same directory, so the rename is atomic). On any error the old file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes it 0600; a saved file reads like any other
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """``atomic_write`` of a bytes payload."""
    atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """``atomic_write`` of UTF-8 text."""
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def publish_dir(
    target: str | os.PathLike[str],
    write: Callable[[Path], None],
    is_complete: Callable[[Path], bool] | None = None,
) -> Path:
    """Create or replace directory ``target``: ``write(tmp)`` fills a temporary sibling, which is renamed.

    An interrupted writer never leaves a half-written ``target``. If ``target`` already exists it is kept
    when ``is_complete(target)`` is true (a concurrent writer won the race) and otherwise replaced: moved
    aside to a ``.old`` sibling, the new one renamed in, the old one removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a saved dir should be readable like any
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # target exists and is not empty
            if is_complete is not None and is_complete(target):
                return target
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------------
# crash-safe saved directories
# ----------------------------------------------------------------------------------------------------
MANIFEST_NAME = "manifest.json"
_RESERVED_KEYS = ("format", "format_version", "nested", "files")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class SavedDirError(ValueError):
    """A saved directory is missing, incomplete, edited or of another format; the message names the
    file (and the manifest field) at fault."""


@dataclass(frozen=True)
class DirManifest:
    """What :func:`verify_dir` found. ``path`` is the resolved version directory: read every file from
    there, not through the published name, so a concurrent save cannot switch versions under a load.
    ``meta`` holds the writer's own fields; ``files`` maps relative POSIX paths to ``{"bytes", "sha256"}``;
    ``nested`` lists nested saved directories (each verified through its own manifest)."""

    path: Path
    format: str
    format_version: int
    meta: dict[str, Any]
    files: dict[str, dict[str, Any]]
    nested: tuple[str, ...]


def _version_re(name: str, kinds: str = r"v(\d+)") -> re.Pattern[str]:
    """``.<name>.v<N>`` (a version), or with ``kinds`` any name the mechanism keeps beside ``name``."""
    return re.compile(rf"\.{re.escape(name)}\.(?:{kinds})")


def _versions(parent: Path, name: str) -> list[int]:
    pat, out = _version_re(name), []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(parent):
            m = pat.fullmatch(entry.name)
            if m and entry.is_dir(follow_symlinks=False):
                out.append(int(m.group(1)))
    return sorted(out)


def _hash_and_sync(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _read_manifest(mpath: Path, error: type[Exception] = SavedDirError) -> dict[str, Any]:
    try:
        obj = json.loads(mpath.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise error(f"{mpath}: unreadable ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise error(f"{mpath}: corrupt manifest (not valid UTF-8 at byte {exc.start})") from None
    except RecursionError:
        raise error(f"{mpath}: corrupt manifest (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, and over-long integer literals
        raise error(f"{mpath}: corrupt manifest ({exc})") from None
    if not isinstance(obj, dict):
        raise error(f"{mpath}: corrupt manifest (expected a JSON object, got {type(obj).__name__})")
    return obj


def _manifest_format(path: Path) -> str | None:
    """The ``format`` of ``path``'s manifest; ``""`` if the manifest is corrupt, None if absent."""
    if not (path / MANIFEST_NAME).is_file():
        return None
    try:
        found = _read_manifest(path / MANIFEST_NAME).get("format")
    except SavedDirError:
        return ""
    return found if isinstance(found, str) else ""


def _scan(root: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Size + sha256 of every file under ``root`` (fsynced), and the nested saved directories (unhashed)."""
    files: dict[str, dict[str, Any]] = {}
    nested: list[str] = []

    def visit(d: Path, rel: str) -> None:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
        skip: list[re.Pattern[str]] = []
        for e in entries:  # a nested published directory: symlink <name> -> .<name>.v<N>
            if e.is_symlink():
                target = os.readlink(e.path)
                if not (_version_re(e.name).fullmatch(target) and (d / target).is_dir()):
                    raise ValueError(f"write: {rel}{e.name} is a symlink; write files or nested saved dirs")
                nested.append(rel + e.name)
                skip.append(_version_re(e.name, r"v\d+|tmp-.+|link-.+|lock"))
        for e in entries:
            if e.is_symlink() or any(p.fullmatch(e.name) for p in skip):
                continue
            if not rel and e.name == MANIFEST_NAME:
                raise ValueError(f"write: {MANIFEST_NAME} is reserved for the directory's manifest")
            if e.is_dir(follow_symlinks=False):
                if _manifest_format(Path(e.path)):  # e.g. a saved catalog copied in as a plain directory
                    nested.append(rel + e.name)
                else:
                    visit(Path(e.path), f"{rel}{e.name}/")
                    _fsync_dir(Path(e.path))
            elif e.is_file(follow_symlinks=False):
                files[rel + e.name] = _hash_and_sync(Path(e.path))
            else:
                raise ValueError(f"write: {rel}{e.name} is not a regular file or directory")

    visit(root, "")
    return files, nested


@contextlib.contextmanager
def _dir_lock(parent: Path, name: str) -> Iterator[None]:
    """Serialise saves of ``parent/name``: an advisory ``flock`` on ``.<name>.lock`` (POSIX), released
    when the file is closed, also by a killed process."""
    with open(parent / f".{name}.lock", "a+b") as f:
        if sys.platform != "win32":
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def save_dir_atomically(
    path: str | os.PathLike[str],
    write: Callable[[Path], None],
    *,
    format: str,
    format_version: int = 1,
    meta: dict[str, Any] | None = None,
    keep: int = 2,
    legacy: Callable[[Path], bool] | None = None,
) -> Path:
    """Save a directory so that a crash at any point leaves the previous version or the new one.

    The one mechanism of every saved directory (catalog, retriever, diffusion model, policy, synthesis
    shards). ``write(tmp)`` fills an empty temporary sibling with plain files (and nested saved
    directories, made by calling this function on ``tmp / "sub"``); it need not fsync anything. Then

    1. every file is fsynced and hashed, and ``tmp/manifest.json`` records ``format``,
       ``format_version``, the ``meta`` fields, ``nested`` and ``files`` (``{path: {"bytes", "sha256"}}``);
    2. ``tmp`` is renamed to the hidden version ``.<name>.v<N>`` (N = 1 + the newest version there);
    3. ``path`` is a relative *symlink* to the current version, switched by one atomic ``os.replace``
       of a new symlink (rename(2) cannot replace a non-empty directory; a symlink it can), so
       readers see the old version or the new one, never a mix;
    4. versions beyond the ``keep`` newest are removed (a reader that resolved the previous version
       just before the switch can still finish).

    Saves to one ``path`` are serialised by a lock file ``.<name>.lock``; what a killed save left is
    removed by the next one. A plain directory with a ``manifest.json`` (written by r4t_fast 0.1, or a
    copy) becomes the previous version (renamed to ``.<name>.v<N>``; if a crash falls just after that
    rename, :func:`verify_dir` uses the newest complete version). An empty directory is replaced; a
    non-empty one without a manifest, one of another ``format``, a foreign symlink or a file is refused.

    Args:
        path: the directory to publish (parents created).
        write: fills the directory it is given; an exception aborts the save, the previous version
            untouched and the temporary removed.
        format: the format name recorded and checked on load, e.g. ``"r4t_fast.catalog"``.
        format_version: the writer's layout version (int >= 0).
        meta: extra manifest fields, strict JSON (no NaN), not the reserved ``format``,
            ``format_version``, ``nested``, ``files``; checked before anything is written.
        keep: versions kept on disk, the current one included (>= 1).
        legacy: recognises a plain directory of the writer's older layout without a manifest (say,
            ``lambda p: (p / "retriever.json").is_file()``); it is then replaced like a saved one.

    Returns:
        ``path`` (absolute). Load with :func:`verify_dir` and read files from ``DirManifest.path``.
    """
    if not isinstance(format, str) or not format:
        raise ValueError(f"format: expected a non-empty str, got {format!r}")
    format_version = check_non_negative_int(format_version, "format_version")
    keep = check_positive_int(keep, "keep")
    meta = dict(meta or {})
    try:
        if set(meta) & set(_RESERVED_KEYS):
            raise ValueError(f"the keys {sorted(set(meta) & set(_RESERVED_KEYS))} are reserved")
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta: {exc} (manifest fields must be strict JSON)") from None
    path = Path(os.path.abspath(path))
    name, parent = path.name, path.parent
    if not name or name in (".", ".."):
        raise ValueError(f"path: expected a directory path with a name, got {str(path)!r}")
    parent.mkdir(parents=True, exist_ok=True)
    with _dir_lock(parent, name):
        state = check_save_target(path, format, legacy)
        for entry in os.scandir(parent):  # leftovers of a killed save (we hold the lock)
            if _version_re(name, "tmp-.+|link-.+").fullmatch(entry.name):
                _remove(Path(entry.path))
        n = (_versions(parent, name) or [0])[-1] + 1
        if state == "legacy":  # a plain saved directory becomes the previous version
            os.rename(path, parent / f".{name}.v{n}")
            n += 1
        elif state == "empty":
            os.rmdir(path)
        token = secrets.token_hex(4)
        tmp = parent / f".{name}.tmp-{n}-{token}"
        os.mkdir(tmp)
        try:
            write(tmp)
            files, nested = _scan(tmp)
            manifest = {"format": format, "format_version": format_version, **meta}
            manifest.update({"nested": nested} if nested else {})
            manifest["files"] = files
            with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as f:
                f.write(json.dumps(manifest, indent=1, allow_nan=False, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, parent / f".{name}.v{n}")
        except BaseException:
            _remove(tmp)
            raise
        _fsync_dir(parent)
        link = parent / f".{name}.link-{n}-{token}"
        os.symlink(f".{name}.v{n}", link)
        os.replace(link, path)  # the switch
        _fsync_dir(parent)
        for old in _versions(parent, name)[:-keep]:
            _remove(parent / f".{name}.v{old}")
    return path


def check_save_target(path: Path, format: str, legacy: Any = None, name: str = "path") -> str:
    """``"new"``, ``"managed"`` (ours), ``"empty"`` or ``"legacy"`` (a plain saved directory); anything else
    is refused, naming ``name``. Reads only: a command checks ``--out`` with it before a long run."""
    if path.is_symlink():
        if not _version_re(path.name).fullmatch(os.readlink(path)):
            raise ValueError(
                f"{name}: {path} is a symlink not made by r4t_fast (to {os.readlink(path)!r}); "
                "remove it or save elsewhere"
            )
        state = "managed"
    elif not path.exists():
        return "new"
    elif not path.is_dir():
        raise ValueError(f"{name}: {path} exists and is not a directory")
    elif not any(path.iterdir()):
        return "empty"
    elif _manifest_format(path) is None and not (legacy is not None and legacy(path)):
        raise ValueError(
            f"{name}: {path} is a non-empty directory without {MANIFEST_NAME} (not a saved "
            "directory); refusing to replace it: remove it or save elsewhere"
        )
    else:
        state = "legacy"
    found = _manifest_format(path)
    if found and found != format:  # a corrupt or missing manifest is ours to replace
        raise ValueError(f"{name}: {path} holds a saved {found!r}, not {format!r}; refusing to replace it")
    return state


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        return shutil.rmtree(path, ignore_errors=True)
    path.unlink(missing_ok=True)


def _resolve(path: Path, error: type[Exception]) -> Path:
    """The directory holding the files of the saved directory published at ``path``."""
    if path.is_symlink():
        target = os.readlink(path)
        own = _version_re(path.name).fullmatch(target)
        real = Path(os.path.abspath(path.parent / target)) if own else path.resolve()
        if not real.is_dir():
            raise error(f"path: {path} is a dangling link (to {target!r})")
        return real
    if path.is_dir():
        if not (path / MANIFEST_NAME).is_file():
            raise error(f"path: {path} is not a saved directory (missing {MANIFEST_NAME})")
        return Path(os.path.abspath(path))
    if path.exists():
        raise error(f"path: {path} is not a directory")
    for n in reversed(_versions(path.parent, path.name)):  # a save killed just after moving a plain dir
        candidate = path.parent / f".{path.name}.v{n}"
        if (candidate / MANIFEST_NAME).is_file():
            return Path(os.path.abspath(candidate))
    raise error(f"path: no saved directory at {path} (missing {MANIFEST_NAME})")


def _safe_relpath(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or "\\" in rel or rel.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def verify_dir(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    format_versions: Sequence[int] | None = None,
    verify: bool = True,
    nested: bool = True,
    error: type[Exception] = SavedDirError,
) -> DirManifest:
    """Check a directory written by :func:`save_dir_atomically` (or a plain copy of one) and return its
    manifest.

    Always checked: the manifest parses and its reserved fields are well-typed (``files``: safe
    relative paths -> ``{"bytes": int >= 0, "sha256": 64 hex digits}``), every listed file exists
    with its size, every nested saved directory exists. ``verify=True`` (default) compares the sha256
    of every file too (~1 GB/s); ``verify=False`` is for trusted fast loads (a flipped byte then goes
    unnoticed). Files not in the manifest are ignored.

    Args:
        path: the published directory.
        format: if given, the manifest's ``format`` must equal it.
        format_versions: if given, the manifest's ``format_version`` must be one of them.
        verify: compare sha256 checksums (sizes are always compared).
        nested: verify nested saved directories too (otherwise only that they exist).
        error: the exception class to raise, e.g. ``CatalogError`` (a subclass of SavedDirError).

    Raises:
        ``error``: naming the file, and for the manifest the field, at fault.
    """
    path = Path(path)
    real = _resolve(path, error)
    mpath = path / MANIFEST_NAME
    obj = _read_manifest(real / MANIFEST_NAME, error)

    def check(ok: bool, field: str, expected: str, got: Any) -> None:
        if not ok:
            raise error(f"{mpath}: field {field}: expected {expected}, got {got!r}")

    fmt, version, files = obj.get("format"), obj.get("format_version"), obj.get("files")
    check(isinstance(fmt, str), "'format'", "a str", fmt)
    check(format is None or fmt == format, "'format'", f"{format!r} (not a saved {format})", fmt)
    check(_is_int(version), "'format_version'", "an int", version)
    known = f"one of [{', '.join(str(v) for v in format_versions or ())}] (the versions this r4t_fast reads)"
    check(format_versions is None or version in format_versions, "'format_version'", known, version)
    check(isinstance(files, dict), "'files'", "an object", files)
    for rel, entry in files.items():
        check(_safe_relpath(rel), "'files' key", "a relative path inside the directory", rel)
        check(isinstance(entry, dict), f"'files'[{rel!r}]", 'an object {"bytes", "sha256"}', entry)
        size, digest = entry.get("bytes"), entry.get("sha256")
        check(_is_int(size) and size >= 0, f"'files'[{rel!r}]['bytes']", "a non-negative int", size)
        ok = isinstance(digest, str) and _SHA256_RE.fullmatch(digest) is not None
        check(ok, f"'files'[{rel!r}]['sha256']", "64 lowercase hex digits", digest)
    subdirs = obj.get("nested", [])
    ok = isinstance(subdirs, list) and all(_safe_relpath(r) for r in subdirs)
    check(ok, "'nested'", "a list of relative paths", subdirs)
    for rel, entry in files.items():
        p, shown = real / rel, path / rel
        if p.is_symlink() or not p.is_file():
            raise error(f"{shown}: missing (listed in {mpath})")
        if (size := p.stat().st_size) != entry["bytes"]:
            raise error(f"{shown}: size {size} bytes, manifest says {entry['bytes']} (truncated?)")
        if verify and sha256_file(p) != entry["sha256"]:
            raise error(f"{shown}: checksum mismatch (file edited or corrupt)")
    for rel in subdirs:
        if nested:
            verify_dir(real / rel, verify=verify, nested=True, error=error)
        elif not (real / rel).is_dir():
            raise error(f"{path / rel}: missing nested saved directory (listed in {mpath})")
    meta = {k: v for k, v in obj.items() if k not in _RESERVED_KEYS}
    return DirManifest(real, fmt, int(version), meta, dict(files), tuple(subdirs))


# ----------------------------------------------------------------------------------------------------
# cache and environment
# ----------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """Root of r4t_fast's cache: ``$R4T_CACHE_DIR`` if set, else ``~/.cache/r4t_fast``."""
    env = os.environ.get("R4T_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "r4t_fast"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``, else ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_description() -> dict[str, Any]:
    """What ran a measurement: CPU model, cores, threads, memory, GPU, platform, load average."""
    import torch

    machine: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
    }
    try:
        machine["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        pass
    machine["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        machine["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        pass
    return machine


def package_versions(packages: Sequence[str]) -> dict[str, str]:
    """``{"python": ..., pkg: version or "not installed"}`` for each distribution in ``packages``."""
    out = {"python": sys.version.split()[0]}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
