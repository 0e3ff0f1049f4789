"""Curated item sets: the data model and the loaders (reproducible splits: :mod:`r4t_fast.data.splits`).

A *set* is one human-curated collection (a Polyvore outfit, a playlist) whose title is the query and
whose items are the reference answer. Three sources are read:

- the common ``sets.jsonl`` format (any user's data), :func:`load_jsonl`;
- the original Polyvore file ``valid_no_dup.json`` + ``category_id.txt``, :func:`load_polyvore`
  (optionally with ``extra_items_polyvore_t_test.jsonl`` as extra catalog items);
- the original ``spotify_editorial_playlists_2021-05-09.json``, :func:`load_spotify`.

Loading the original files gives exactly the sets, ids and texts of the shipped ``sets.jsonl`` files.
Nothing is ever downloaded; :func:`load_dataset` resolves the names ``polyvore`` and ``spotify``
under a data directory and names the expected file and its public source when it is missing.

Rules for bad input
-------------------
Structural problems raise :class:`DataError` (a ``ValueError``) naming the file and the line (JSONL;
for whole-file JSON the line of a syntax error, else the entry's position and id); nothing fails
half-way with a ``KeyError``/``TypeError``:

- a line that is not valid UTF-8 or JSON, or is not a JSON object; a whole file that is not JSON;
- a set without ``set_id`` or ``items``; ``items`` not a list; an item that is not an object;
- an item without ``item_id`` or without its text field (``text``; Polyvore ``name`` and ``image``,
  Spotify ``track``): the field must exist, its value may be empty (see below);
- a field of the wrong type (ids and categories: string or integer; texts: string or null);
- two sets with the same ``set_id`` in one file (splits are keyed by set id);
- a malformed or duplicated line in ``category_id.txt``;
- a file that yields no usable set at all.

Data-quality problems are skipped and counted in ``Dataset.skipped`` (reason -> count):

- ``item_empty_text``: an item whose text is null, blank, or the placeholder ``<MISSING>`` (the
  Spotify archive's mark for an unavailable track) is dropped from its set;
- ``item_duplicate_in_set``: a repeated ``item_id`` within one set is dropped (first one kept);
- ``set_no_items``: a set left without items is dropped;
- ``query_missing``: a title that is null, absent, blank or has no letter or digit (``"."``, ``"♥"``):
  the set is kept (its items stay in the catalog and in splits) with ``query=None`` and is left out
  of :attr:`Dataset.query_sets`;
- ``query_untitled``: a title starting with the word "Untitled" ("Untitled", "Untitled #84",
  "Untitled #4311 A Top Art Set ..."): handled like ``query_missing``;
- ``category_unknown``: a Polyvore ``categoryid`` absent from ``category_id.txt``: the item is kept
  with ``category=None``;
- ``extra_item_empty_text`` / ``extra_item_duplicate``: extra catalog items dropped for the same
  reasons (a duplicate here is an id already seen among the extra items).

Blank lines in JSONL files are ignored. Titles are not otherwise cleaned (repeated titles and
Polyvore award suffixes such as "(Top Set)" are kept as written). When the same ``item_id`` appears in
several sets with different texts (315 Spotify tracks listed with different albums), the catalog keeps
the first occurrence.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r4t_fast.data._jsonl import MISSING_PLACEHOLDER as MISSING_PLACEHOLDER  # re-exported
from r4t_fast.data._jsonl import (
    DataError,
    MissingDataError,
    _expect_object,
    _get_id,
    _get_list,
    _get_opt_str,
    _get_text,
    _iter_jsonl,
    _load_json,
    _require_file,
    _resolve_file,
    _type_name,
)

__all__ = [
    "DATA_DIR_ENV",
    "DATASETS",
    "DataError",
    "Dataset",
    "Item",
    "ItemSet",
    "MissingDataError",
    "default_data_dir",
    "load_dataset",
    "load_jsonl",
    "load_polyvore",
    "load_spotify",
    "query_text",
]

DATA_DIR_ENV = "R4T_DATA_DIR"
"""Environment variable naming the data directory (holding ``polyvore/`` and ``spotify_editorial/``)."""

SPOTIFY_ITEM_ID_FORMAT = "{track} -- {artists}"
SPOTIFY_TEXT_FORMAT = "{track} by {artists} (album: {album})"

_POLYVORE_SOURCE = (
    "the Maryland Polyvore validation split: valid_no_dup.json from the GitHub repository "
    "tianyu-su/OCM-bi-lstm (data/label/valid_no_dup.json)"
)
_CATEGORY_SOURCE = "category_id.txt from the GitHub repository xthan/polyvore-dataset"
_EXTRA_SOURCE = (
    "extra_items_polyvore_t_test.jsonl: the Polyvore-T test outfits of the GitHub repository "
    "WangXin93/fashion_compatibility_mcn, converted to the sets.jsonl format"
)
_SPOTIFY_SOURCE = (
    "the 2021-05-09 snapshot of the GitHub repository mackorone/spotify-playlist-archive, "
    "collected into spotify_editorial_playlists_2021-05-09.json"
)

POLYVORE_FILE = "valid_no_dup.json"
POLYVORE_CATEGORIES_FILE = "category_id.txt"
POLYVORE_EXTRA_FILE = "extra_items_polyvore_t_test.jsonl"
SPOTIFY_FILE = "spotify_editorial_playlists_2021-05-09.json"

DATASETS: dict[str, tuple[str, str, str]] = {
    "polyvore": ("polyvore", POLYVORE_FILE, _POLYVORE_SOURCE),
    "spotify": ("spotify_editorial", SPOTIFY_FILE, _SPOTIFY_SOURCE),
}
"""Named datasets: name -> (sub-directory of the data dir, original file, public source)."""

_DATASET_ALIASES = {"spotify_editorial": "spotify"}
_UNTITLED = re.compile(r"untitled(\W.*)?", re.IGNORECASE | re.DOTALL)
_POLYVORE_TID = re.compile(r"[?&]tid=(\d+)")


# ----------------------------------------------------------------------------------------------
# Data model
# ----------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One catalog item.

    Attributes:
        item_id: unique id within the dataset (Polyvore: the image id; Spotify: "track -- artists").
        text: the item's name or description, embedded by the text encoder (never empty).
        category: fine category (Polyvore), coarse slot (Polyvore-T extra items) or ``None``.
        extra: any other fields of the source (price, likes, ...).
    """

    item_id: str
    text: str
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ItemSet:
    """One curated set: a title (the query), free-text context and its items (no duplicates).

    ``query`` is ``None`` when the set has no usable title (see the module docstring).
    """

    set_id: str
    query: str | None
    context: str
    items: list[Item]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def item_ids(self) -> list[str]:
        """The ids of the set's items, in order."""
        return [it.item_id for it in self.items]


@dataclass
class Dataset:
    """Curated sets plus optional extra catalog items.

    Attributes:
        name: short name ("polyvore", "spotify" or the file's name).
        sets: the sets, in file order.
        extra_items: items that belong to the catalog but to no set here (e.g. Polyvore-T test items).
        skipped: reason -> count of what the loader dropped or blanked (see the module docstring).
        source: the file(s) read.
    """

    name: str
    sets: list[ItemSet]
    extra_items: list[Item] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.sets)

    def __iter__(self) -> Iterator[ItemSet]:
        return iter(self.sets)

    @property
    def catalog_items(self) -> list[Item]:
        """All items of all sets, then the extra items, unique by ``item_id`` (first occurrence wins,
        stable order)."""
        seen: set[str] = set()
        out: list[Item] = []
        for it in self._all_items():
            if it.item_id not in seen:
                seen.add(it.item_id)
                out.append(it)
        return out

    @property
    def query_sets(self) -> list[ItemSet]:
        """The sets with a usable title (``query is not None``), in order."""
        return [s for s in self.sets if s.query is not None]

    def get_set(self, set_id: str) -> ItemSet:
        """Return the set with this id; ``KeyError`` naming the id if there is none."""
        for s in self.sets:
            if s.set_id == set_id:
                return s
        raise KeyError(f"set_id: no set {set_id!r} in dataset {self.name!r}")

    def subset(self, set_ids: Iterable[str]) -> Dataset:
        """A dataset with only the given sets (in this dataset's order) and the same extra items.

        Raises ``KeyError`` naming the first id that is not in the dataset.
        """
        wanted = set(set_ids)
        known = {s.set_id for s in self.sets}
        unknown = sorted(wanted - known)
        if unknown:
            raise KeyError(f"set_ids: {len(unknown)} id(s) not in dataset {self.name!r}, e.g. {unknown[0]!r}")
        return Dataset(
            name=self.name,
            sets=[s for s in self.sets if s.set_id in wanted],
            extra_items=list(self.extra_items),
            skipped=dict(self.skipped),
            source=self.source,
        )

    def summary(self) -> dict[str, Any]:
        """Counts for reports: sets, sets with a query, item occurrences, distinct items, set sizes."""
        sizes = [len(s.items) for s in self.sets]
        distinct_in_sets = len({it.item_id for s in self.sets for it in s.items})
        return {
            "name": self.name,
            "sets": len(self.sets),
            "query_sets": len(self.query_sets),
            "item_occurrences": sum(sizes),
            "distinct_set_items": distinct_in_sets,
            "extra_items": len(self.extra_items),
            "catalog_items": len(self.catalog_items),
            "min_set_size": min(sizes) if sizes else 0,
            "max_set_size": max(sizes) if sizes else 0,
            "mean_set_size": (sum(sizes) / len(sizes)) if sizes else 0.0,
            "skipped": dict(sorted(self.skipped.items())),
        }

    def _all_items(self) -> Iterator[Item]:
        for s in self.sets:
            yield from s.items
        yield from self.extra_items


def query_text(item_set: ItemSet, with_context: bool = False) -> str:
    """The query of a set: its title, optionally followed by its description.

    With ``with_context=True`` and a non-empty context the result is ``"<title>. <context>"`` (no
    extra period when the title already ends in ``.``, ``!`` or ``?``).

    Raises:
        ValueError: the set has no usable title (``query is None``).
    """
    if not isinstance(item_set, ItemSet):
        raise TypeError(f"item_set: expected an ItemSet, got {type(item_set).__name__}")
    if item_set.query is None:
        raise ValueError(
            f"item_set: set {item_set.set_id!r} has no usable title (query is None); "
            "use Dataset.query_sets to select sets with a query"
        )
    title = item_set.query.strip()
    context = item_set.context.strip() if with_context else ""
    if not context:
        return title
    sep = " " if title.endswith((".", "!", "?")) else ". "
    return f"{title}{sep}{context}"


# ----------------------------------------------------------------------------------------------
# Parsing helpers (shared by all loaders)
# ----------------------------------------------------------------------------------------------


class _Builder:
    """Accumulates sets and skip counts with the rules of the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sets: list[ItemSet] = []
        self.skipped: Counter[str] = Counter()
        self._set_where: dict[str, str] = {}

    def title(self, raw: str | None) -> str | None:
        if raw is None or not any(ch.isalnum() for ch in raw):
            self.skipped["query_missing"] += 1
            return None
        if _UNTITLED.fullmatch(raw.strip()):
            self.skipped["query_untitled"] += 1
            return None
        return raw

    def add_set(
        self,
        where: str,
        set_id: str,
        query: str | None,
        context: str,
        items: list[Item | None],
        extra: dict[str, Any],
    ) -> None:
        """``items`` holds ``None`` for an item whose text was blank (already known to be skipped)."""
        if set_id in self._set_where:
            raise DataError(
                f"{where}: duplicate set_id {set_id!r} (first seen at {self._set_where[set_id]}); "
                "set ids must be unique"
            )
        self._set_where[set_id] = where
        kept: list[Item] = []
        seen: set[str] = set()
        for it in items:
            if it is None:
                self.skipped["item_empty_text"] += 1
            elif it.item_id in seen:
                self.skipped["item_duplicate_in_set"] += 1
            else:
                seen.add(it.item_id)
                kept.append(it)
        if not kept:
            self.skipped["set_no_items"] += 1
            return
        query = self.title(query)
        self.sets.append(ItemSet(set_id=set_id, query=query, context=context, items=kept, extra=extra))

    def finish(self, name: str, source: str, extra_items: list[Item] | None = None) -> Dataset:
        if not self.sets:
            raise DataError(f"{self.path}: no usable set (skipped: {dict(self.skipped) or 'nothing'})")
        return Dataset(
            name=name,
            sets=self.sets,
            extra_items=extra_items or [],
            skipped=dict(sorted(self.skipped.items())),
            source=source,
        )


def _jsonl_set(where: str, obj: dict[str, Any]) -> tuple[str, str | None, str, list[Item | None]]:
    """Parse one sets.jsonl object into (set_id, query, context, items-or-None)."""
    set_id = _get_id(obj, "set_id", where)
    where = f"{where} (set {set_id!r})"
    query = _get_opt_str(obj, "query", where)
    context = _get_opt_str(obj, "context", where) or ""
    raw_items = _get_list(obj, "items", where)
    items: list[Item | None] = []
    for k, raw in enumerate(raw_items):
        iwhere = f"{where}, item {k}"
        raw = _expect_object(raw, iwhere)
        item_id = _get_id(raw, "item_id", iwhere)
        text = _get_text(raw, "text", iwhere)
        category = _get_opt_str(raw, "category", iwhere, allow_int=True)
        extra = {key: v for key, v in raw.items() if key not in ("item_id", "text", "category")}
        items.append(None if text is None else Item(item_id, text, category, extra))
    return set_id, query, context, items


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------


def load_jsonl(path: str | os.PathLike[str], *, name: str | None = None) -> Dataset:
    """Load sets in the common ``sets.jsonl`` format (one JSON object per line).

    Each line: ``{"set_id", "query" (optional, may be null), "context" (optional), "items": [{"item_id",
    "text", "category" (optional), ...extra fields}], ...extra set fields}``.

    Args:
        path: the ``.jsonl`` file.
        name: dataset name; default: the parent directory's name for ``sets.jsonl``, else the file stem.

    Raises:
        MissingDataError: the file does not exist.
        DataError: malformed content (see the module docstring).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"path: {path} is not a file")
    builder = _Builder(path)
    for lineno, obj in _iter_jsonl(path):
        where = f"{path}:{lineno}"
        set_id, query, context, items = _jsonl_set(where, obj)
        extra = {k: v for k, v in obj.items() if k not in ("set_id", "query", "context", "items")}
        builder.add_set(where, set_id, query, context, items, extra)
    if name is None:
        name = path.parent.name if path.stem == "sets" and path.parent.name else path.stem
    return builder.finish(name, str(path))


def _load_categories(path: Path) -> dict[int, str]:
    cats: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise DataError(f"{path}:{lineno}: expected '<integer id> <category name>', got {line!r}")
            cid = int(parts[0])
            if cid in cats:
                raise DataError(f"{path}:{lineno}: duplicate category id {cid}")
            cats[cid] = parts[1]
    return cats


def _load_extra_items(path: Path, skipped: Counter[str]) -> list[Item]:
    """Flatten the sets of a sets.jsonl file into extra catalog items (``extra`` records the outfit)."""
    out: list[Item] = []
    seen: set[str] = set()
    for lineno, obj in _iter_jsonl(path):
        where = f"{path}:{lineno}"
        set_id, _, _, items = _jsonl_set(where, obj)
        for it in items:
            if it is None:
                skipped["extra_item_empty_text"] += 1
            elif it.item_id in seen:
                skipped["extra_item_duplicate"] += 1
            else:
                seen.add(it.item_id)
                it.extra.setdefault("outfit_id", set_id)
                out.append(it)
    return out


def load_polyvore(
    path_or_dir: str | os.PathLike[str],
    *,
    include_extra: bool = False,
    categories_path: str | os.PathLike[str] | None = None,
    extra_path: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Load the original Maryland Polyvore outfits (``valid_no_dup.json`` + ``category_id.txt``).

    Set: ``set_id``; query = ``name`` (the outfit title); context = ``desc``; extra = views, likes, date.
    Item: item_id = the image id (``tid=`` of the item's ``image`` URL, as in ``sets.jsonl``);
    text = ``name``; category = the fine category name of ``categoryid``; extra = index, price, likes,
    category_id.

    Args:
        path_or_dir: ``valid_no_dup.json`` or the directory holding it.
        include_extra: also read ``extra_items_polyvore_t_test.jsonl`` (Polyvore-T test items, coarse
            slot as category, ``extra["outfit_id"]``) into ``Dataset.extra_items``.
        categories_path: ``category_id.txt``; default: next to the outfits file.
        extra_path: the extra items file; default: next to the outfits file.

    Raises:
        MissingDataError: a needed file is absent (the message names its public source).
        DataError: malformed content (see the module docstring).
    """
    path = _resolve_file(path_or_dir, POLYVORE_FILE, _POLYVORE_SOURCE)
    cat_path = _require_file(
        Path(categories_path) if categories_path is not None else path.parent / POLYVORE_CATEGORIES_FILE,
        _CATEGORY_SOURCE,
    )
    categories = _load_categories(cat_path)
    outfits = _load_json(path)
    if not isinstance(outfits, list):
        raise DataError(f"{path}: expected a JSON list of outfits, got {_type_name(outfits)}")
    builder = _Builder(path)
    for pos, raw in enumerate(outfits):
        where = f"{path}: outfit {pos}"
        raw = _expect_object(raw, where)
        set_id = _get_id(raw, "set_id", where)
        where = f"{where} (set {set_id!r})"
        query = _get_opt_str(raw, "name", where)
        context = _get_opt_str(raw, "desc", where) or ""
        items: list[Item | None] = []
        for k, it in enumerate(_get_list(raw, "items", where)):
            iwhere = f"{where}, item {k}"
            it = _expect_object(it, iwhere)
            image = _get_opt_str(it, "image", iwhere)
            match = _POLYVORE_TID.search(image or "")
            if match is None:
                raise DataError(f"{iwhere}: field 'image' must be a URL with a 'tid=<digits>' parameter")
            text = _get_text(it, "name", iwhere)
            if text is None:
                items.append(None)
                continue
            cid = it.get("categoryid")
            category = categories.get(cid) if isinstance(cid, int) and not isinstance(cid, bool) else None
            if category is None:
                builder.skipped["category_unknown"] += 1
            extra = {"category_id": cid, **{key: it[key] for key in ("index", "price", "likes") if key in it}}
            items.append(Item(match.group(1), text, category, extra))
        extra_set = {key: raw[key] for key in ("views", "likes", "date") if key in raw}
        builder.add_set(where, set_id, query, context, items, extra_set)

    extra_items: list[Item] = []
    sources = [str(path), str(cat_path)]
    if include_extra:
        xpath = _require_file(
            Path(extra_path) if extra_path is not None else path.parent / POLYVORE_EXTRA_FILE, _EXTRA_SOURCE
        )
        extra_items = _load_extra_items(xpath, builder.skipped)
        sources.append(str(xpath))
    return builder.finish("polyvore", ", ".join(sources), extra_items)


def load_spotify(
    path_or_dir: str | os.PathLike[str],
    *,
    text_format: str = SPOTIFY_TEXT_FORMAT,
) -> Dataset:
    """Load the original Spotify editorial playlists (``spotify_editorial_playlists_2021-05-09.json``).

    Set: set_id = ``playlist_id``; query = ``title``; context = ``description``.
    Item: item_id = ``"{track} -- {artists}"`` (as in ``sets.jsonl``); text = ``text_format`` filled
    with track, artists and album (default ``"{track} by {artists} (album: {album})"``, the text of
    the shipped ``sets.jsonl``); category = ``None``; extra = track, artists, album.

    Args:
        path_or_dir: the playlists file or the directory holding it.
        text_format: ``str.format`` template with the fields ``track``, ``artists``, ``album``.

    Raises:
        MissingDataError: the file is absent (the message names its public source).
        DataError: malformed content (see the module docstring).
    """
    if not isinstance(text_format, str):
        raise TypeError(f"text_format: expected str, got {type(text_format).__name__}")
    try:
        text_format.format(track="", artists="", album="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"text_format: must be a str.format template using only {{track}}, {{artists}}, {{album}}; "
            f"got {text_format!r} ({exc!r})"
        ) from None
    path = _resolve_file(path_or_dir, SPOTIFY_FILE, _SPOTIFY_SOURCE)
    playlists = _load_json(path)
    if not isinstance(playlists, list):
        raise DataError(f"{path}: expected a JSON list of playlists, got {_type_name(playlists)}")
    builder = _Builder(path)
    for pos, raw in enumerate(playlists):
        where = f"{path}: playlist {pos}"
        raw = _expect_object(raw, where)
        set_id = _get_id(raw, "playlist_id", where)
        where = f"{where} (playlist {set_id!r})"
        query = _get_opt_str(raw, "title", where)
        context = _get_opt_str(raw, "description", where) or ""
        items: list[Item | None] = []
        for k, tr in enumerate(_get_list(raw, "tracks", where)):
            iwhere = f"{where}, track {k}"
            tr = _expect_object(tr, iwhere)
            track = _get_text(tr, "track", iwhere)
            if track is None:
                items.append(None)
                continue
            fields = {
                "track": track,
                "artists": _get_opt_str(tr, "artists", iwhere) or "",
                "album": _get_opt_str(tr, "album", iwhere) or "",
            }
            item_id = SPOTIFY_ITEM_ID_FORMAT.format(**fields)
            items.append(Item(item_id, text_format.format(**fields), None, fields))
        builder.add_set(where, set_id, query, context, items, {})
    return builder.finish("spotify", str(path))


def default_data_dir() -> Path | None:
    """The data directory: ``$R4T_DATA_DIR`` if set, else the first existing of
    ``<repository root>/../shared/data`` and ``<cwd>/../shared/data``; ``None`` if none exists."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[3]
    for candidate in (repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def load_dataset(
    name_or_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Dataset:
    """Load a named dataset (``"polyvore"``, ``"spotify"``) or a ``sets.jsonl`` file.

    Args:
        name_or_path: a name from :data:`DATASETS` (``"spotify_editorial"`` is an alias of
            ``"spotify"``), or a path ending in ``.jsonl``.
        data_dir: where the named datasets live (``<data_dir>/polyvore/``, ``<data_dir>/spotify_editorial/``);
            default :func:`default_data_dir`.
        **kwargs: passed to the loader (e.g. ``include_extra=True`` for Polyvore).

    Raises:
        MissingDataError: the data directory or file is absent (the message names the expected file
            and its public source; nothing is downloaded).
        ValueError: an unknown name (the message lists the valid choices).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path: expected str or path, got {type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    if text.endswith(".jsonl"):
        return load_jsonl(text, **kwargs)
    key = _DATASET_ALIASES.get(text.lower(), text.lower())
    if key not in DATASETS:
        choices = ", ".join(repr(n) for n in [*DATASETS, *_DATASET_ALIASES])
        raise ValueError(
            f"name_or_path: unknown dataset {text!r}; expected one of {choices} or a .jsonl path"
        )
    subdir, filename, source = DATASETS[key]
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if root is None:
        raise MissingDataError(
            f"data_dir: no data directory found for dataset {key!r}: set ${DATA_DIR_ENV} or pass data_dir "
            f"(looked for ../shared/data next to the repository and the working directory). "
            f"Expected <data_dir>/{subdir}/{filename}, from {source}."
        )
    path = root / subdir / filename
    if not path.is_file():
        raise MissingDataError(f"{path}: file not found. Expected {filename}, from {source}.")
    if key == "polyvore":
        return load_polyvore(path, **kwargs)
    return load_spotify(path, **kwargs)
