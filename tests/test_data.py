"""Tests for common/readers.py (formats, validation messages) and common/data.py (the split
protocol, partitions)."""

from __future__ import annotations

import logging
import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from common import readers
from common.data import Catalog, DataError, Interactions, partition_users, split_by_user
from common.readers import ensure_ml100k, load_catalog, load_dataset, load_interactions, movie_text


def write(path: Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write text with '\\n' line ends (no newline translation) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def interactions(rows: list[tuple[str, int, float]], num_items: int = 10) -> Interactions:
    """Interactions from (user id, item index, timestamp) rows, users in order of appearance."""
    user_ids = list(dict.fromkeys(user for user, _, _ in rows))
    return Interactions(
        user=np.array([user_ids.index(user) for user, _, _ in rows], dtype=np.int64),
        item=np.array([item for _, item, _ in rows], dtype=np.int64),
        timestamp=np.array([ts for _, _, ts in rows], dtype=np.float64),
        user_ids=tuple(user_ids),
    )


# --------------------------------------------------------------------------------------------
# The split protocol
# --------------------------------------------------------------------------------------------


def test_split_orders_by_timestamp_then_file_row() -> None:
    rows = [
        ("a", 1, 5.0),
        ("b", 7, 1.0),
        ("a", 2, 3.0),
        ("a", 3, 5.0),  # same timestamp as item 1, later row -> after it
        ("b", 8, 1.0),
        ("a", 4, 5.0),  # last row among the ties -> test
        ("b", 9, 1.0),
    ]
    a, b = split_by_user(interactions(rows))
    assert a.user_id == "a"
    assert a.train.tolist() == [2, 1] and a.valid == 3 and a.test == 4
    # All three of b's timestamps are equal: file order alone decides.
    assert b.train.tolist() == [7] and b.valid == 8 and b.test == 9
    assert a.train.dtype == np.int64


def test_split_keeps_full_timestamp_precision() -> None:
    # 1_000_000_001 and 1_000_000_000 are the same float32; as float64 item 1 is the later one.
    rows = [("u", 0, 1.0), ("u", 1, 1_000_000_001.0), ("u", 2, 1_000_000_000.0)]
    (split,) = split_by_user(interactions(rows))
    assert (split.train.tolist(), split.valid, split.test) == ([0], 2, 1)


def test_split_rule_for_short_histories() -> None:
    rows = [("one", 5, 1.0), ("two", 6, 2.0), ("two", 7, 1.0), ("three", 1, 1.0)]
    rows += [("three", 2, 2.0), ("three", 3, 3.0)]
    base = interactions(rows)
    # A user with no rows at all (index 3) is allowed and gets an empty split.
    with_idle = Interactions(base.user, base.item, base.timestamp, base.user_ids + ("idle",))
    one, two, three, idle = split_by_user(with_idle)
    assert (one.train.tolist(), one.valid, one.test) == ([5], -1, -1)
    assert (two.train.tolist(), two.valid, two.test) == ([7], -1, 6)
    assert (three.train.tolist(), three.valid, three.test) == ([1], 2, 3)
    assert (idle.train.tolist(), idle.valid, idle.test) == ([], -1, -1)


def reference_split(inter: Interactions) -> list[tuple[list[int], int, int]]:
    """The protocol written naively: Python's sort on (timestamp, row) per user."""
    histories: list[list[tuple[float, int, int]]] = [[] for _ in inter.user_ids]
    columns = (inter.user.tolist(), inter.item.tolist(), inter.timestamp.tolist())
    for row, (user, item, ts) in enumerate(zip(*columns, strict=True)):
        histories[user].append((ts, row, item))
    result = []
    for history in histories:
        items = [item for _, _, item in sorted(history)]
        if len(items) >= 3:
            result.append((items[:-2], items[-2], items[-1]))
        elif len(items) == 2:
            result.append((items[:1], -1, items[1]))
        else:
            result.append((items, -1, -1))
    return result


def as_tuples(inter: Interactions) -> list[tuple[list[int], int, int]]:
    return [(s.train.tolist(), s.valid, s.test) for s in split_by_user(inter)]


def test_split_matches_a_naive_reference_on_random_ties() -> None:
    rng = np.random.default_rng(0)
    n = 2_000
    inter = Interactions(
        user=rng.integers(0, 50, n),
        item=rng.integers(0, 30, n),
        timestamp=rng.integers(0, 5, n).astype(np.float64),  # many ties
        user_ids=tuple(str(u) for u in range(50)),
    )
    assert as_tuples(inter) == reference_split(inter)


def test_duplicate_pairs_are_kept() -> None:
    rows = [("u", 1, 1.0), ("u", 1, 2.0), ("u", 1, 3.0), ("u", 2, 4.0)]
    (split,) = split_by_user(interactions(rows))
    assert (split.train.tolist(), split.valid, split.test) == ([1, 1], 1, 2)


def test_interactions_reject_float32_timestamps() -> None:
    with pytest.raises(ValueError, match="float32"):
        Interactions(
            user=np.zeros(2, dtype=np.int64),
            item=np.zeros(2, dtype=np.int64),
            timestamp=np.ones(2, dtype=np.float32),
            user_ids=("u",),
        )


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------

U_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "2|Café Society (1995)|01-Jan-1995||http://y|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0\n"
    "3|No Genre (1996)|01-Jan-1996||http://z|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
)


def write_ml100k(directory: Path, u_data: str = "") -> Path:
    write(directory / "u.item", U_ITEM, encoding="latin-1")
    write(directory / "u.data", u_data or "10\t1\t5\t300\n20\t2\t3\t100\n10\t3\t4\t200\n")
    return directory


def test_ml100k_format_reads_latin1_and_genre_flags(tmp_path: Path) -> None:
    ds = load_dataset(dataset="path", data_path=str(write_ml100k(tmp_path)), cache_dir=tmp_path)
    assert ds.catalog.item_ids == ("1", "2", "3")
    assert ds.catalog.texts == (
        "Toy Story (1995). Genres: Animation, Children's, Comedy",
        "Café Society (1995). Genres: Drama",
        "No Genre (1996)",
    )
    inter = ds.interactions
    assert inter.user_ids == ("10", "20")
    assert inter.user.tolist() == [0, 1, 0] and inter.item.tolist() == [0, 1, 2]
    assert inter.timestamp.dtype == np.float64 and inter.timestamp.tolist() == [300, 100, 200]
    assert ds.name == tmp_path.name


def test_ml100k_genre_names_come_from_u_genre(tmp_path: Path) -> None:
    write(tmp_path / "u.item", "1|Film (1990)|||x|1|0|1\n")
    write(tmp_path / "u.data", "1\t1\t5\t1\n")
    write(tmp_path / "u.genre", "Odd|0\nNone|1\nEven|2\n\n")
    catalog = load_catalog(tmp_path, data_format="ml-100k")
    assert catalog.texts == ("Film (1990). Genres: Odd, Even",)


def test_ml1m_format(tmp_path: Path) -> None:
    write(
        tmp_path / "movies.dat",
        "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Amélie (2001)::Romance\n",
        encoding="latin-1",
    )
    write(tmp_path / "ratings.dat", "1::2::5::978300760\n1::1::3::978300761\n2::1::4::1\n")
    ds = load_dataset(dataset="path", data_path=str(tmp_path), cache_dir=tmp_path)
    assert ds.catalog.texts == (
        "Toy Story (1995). Genres: Animation, Children's, Comedy",
        "Amélie (2001). Genres: Romance",
    )
    assert ds.interactions.item.tolist() == [1, 0, 0]
    assert ds.interactions.user_ids == ("1", "2")


def test_ml_csv_format_with_quoted_title(tmp_path: Path) -> None:
    write(
        tmp_path / "movies.csv",
        "movieId,title,genres\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        "12,Unknown Film,(no genres listed)\n",
    )
    write(
        tmp_path / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,12,4.0,1112486027\n1,11,3.5,1112484676\n",
    )
    ds = load_dataset(dataset="path", data_path=str(tmp_path), cache_dir=tmp_path)
    assert ds.catalog.texts == (
        "American President, The (1995). Genres: Comedy, Drama, Romance",
        "Unknown Film",
    )
    assert ds.interactions.item.tolist() == [1, 0]
    assert ds.interactions.timestamp.tolist() == [1112486027, 1112484676]


def test_atomic_format(tmp_path: Path) -> None:
    write(
        tmp_path / "toy.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n"
        "2\tunkonwn\tunkonwn\tunknown\n"
        "3\tNo Year\t\tSci-Fi\n"
        "4\t\t\t\n",
    )
    write(
        tmp_path / "toy.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "u1\t1\t3\t881250949\nu2\t4\t1\t891717742\nu1\t3\t1\t878887116.5\n",
    )
    ds = load_dataset(dataset="path", data_path=str(tmp_path), cache_dir=tmp_path)
    assert ds.name == "toy"
    assert ds.catalog.texts == (
        "Toy Story (1995). Genres: Animation, Children's, Comedy",
        "unkonwn. Genres: unknown",
        "No Year. Genres: Sci-Fi",
        "4",
    )
    assert ds.interactions.timestamp.tolist() == [881250949.0, 891717742.0, 878887116.5]
    # Passing the .inter file itself, and the format explicitly, reads the same data.
    again = load_dataset(
        dataset="path",
        data_path=str(tmp_path / "toy.inter"),
        data_format="atomic",
        cache_dir=tmp_path,
    )
    assert again.catalog == ds.catalog
    assert np.array_equal(again.interactions.item, ds.interactions.item)


def test_generic_csv_format(tmp_path: Path) -> None:
    write(
        tmp_path / "items.csv",
        'item_id,text,price\nsku-1,"A red mug, 300 ml",4\nsku-2,,5\n',
    )
    write(
        tmp_path / "interactions.csv",
        "user_id,session,item_id,timestamp\nalice,s1,sku-2,2.5\nbob,s2,sku-1,1\n",
    )
    ds = load_dataset(
        dataset="path", data_path=str(tmp_path), data_format="csv", cache_dir=tmp_path
    )
    assert ds.catalog.item_ids == ("sku-1", "sku-2")
    assert ds.catalog.texts == ("A red mug, 300 ml", "sku-2")
    assert ds.interactions.user_ids == ("alice", "bob")
    assert ds.interactions.item.tolist() == [1, 0]


def test_crlf_bom_and_latin1_control_bytes(tmp_path: Path) -> None:
    # latin-1 byte 0x85 decodes to U+0085, which str.splitlines would treat as a line break.
    grouplens = tmp_path / "gl"
    item = U_ITEM.splitlines()[0].replace("Toy Story", "Toy\x85Story") + "\r\n"
    write(grouplens / "u.item", item, encoding="latin-1")
    write(grouplens / "u.data", "1\t1\t5\t1\r\n1\t1\t5\t2\r\n")
    ds = load_dataset(dataset="path", data_path=str(grouplens), cache_dir=tmp_path)
    assert ds.catalog.texts == ("Toy\x85Story (1995). Genres: Animation, Children's, Comedy",)
    assert ds.interactions.timestamp.tolist() == [1, 2]
    generic = tmp_path / "csv"
    write(generic / "items.csv", "\ufeffitem_id,text\r\ni1,one\r\n")
    write(generic / "interactions.csv", "\ufeffuser_id,item_id,timestamp\r\nu,i1,7\r\n")
    ds = load_dataset(dataset="path", data_path=str(generic), cache_dir=tmp_path)
    assert ds.catalog.item_ids == ("i1",) and ds.interactions.timestamp.tolist() == [7]


def test_client_reads_its_own_interactions_against_a_shared_catalog(tmp_path: Path) -> None:
    catalog = load_catalog(write_ml100k(tmp_path / "catalog") / "u.item")
    own = write(tmp_path / "device" / "u.data", "7\t3\t5\t10\n7\t1\t5\t20\n")
    inter = load_interactions(own, catalog=catalog)
    assert inter.user_ids == ("7",) and inter.item.tolist() == [2, 0]


def test_movie_text_rules() -> None:
    assert movie_text("Heat", year="1995", genres=["Crime"], fallback="9") == (
        "Heat (1995). Genres: Crime"
    )
    assert movie_text("Heat (1995)", year="1995", fallback="9") == "Heat (1995)"
    assert movie_text("Land Before Time III (1995)", year="V", fallback="9") == (
        "Land Before Time III (1995)"
    )
    assert movie_text("  ", genres=["Drama"], fallback="9") == "9. Genres: Drama"


# --------------------------------------------------------------------------------------------
# Bad input: every message names the file and the 1-based line
# --------------------------------------------------------------------------------------------


def load_path(path: Path, data_format: str = "auto") -> None:
    load_dataset(dataset="path", data_path=str(path), data_format=data_format, cache_dir=path)


def test_wrong_field_count_names_file_and_line(tmp_path: Path) -> None:
    write_ml100k(tmp_path, u_data="10\t1\t5\t300\n\n10\t2\t3\n")
    with pytest.raises(DataError) as info:
        load_path(tmp_path)
    assert (
        str(info.value) == f"{tmp_path / 'u.data'}, line 3: expected 4 tab-separated fields, got 3"
    )


def test_non_numeric_user_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "movies.dat", "1::Film (1990)::Drama\n")
    write(tmp_path / "ratings.dat", "1::1::5::10\nbob::1::5::10\n")
    with pytest.raises(DataError, match=r"ratings\.dat, line 2: user id 'bob' is not an integer"):
        load_path(tmp_path)


def test_non_numeric_timestamp_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "items.csv", "item_id,text\ni1,one\n")
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\nu,i1,1\nu,i1,yesterday\n")
    with pytest.raises(DataError, match=r"interactions\.csv, line 3: timestamp 'yesterday'"):
        load_path(tmp_path)


def test_unknown_item_names_the_id(tmp_path: Path) -> None:
    write_ml100k(tmp_path, u_data="10\t1\t5\t300\n10\t99\t5\t300\n")
    with pytest.raises(DataError, match=r"u\.data, line 2: item id '99' is not in the catalog"):
        load_path(tmp_path)


def test_missing_column_in_atomic_header(tmp_path: Path) -> None:
    write(tmp_path / "x.item", "item_id:token\tmovie_title:token_seq\n1\tFilm\n")
    write(tmp_path / "x.inter", "user_id:token\titem_id:token\trating:float\n1\t1\t3\n")
    with pytest.raises(DataError, match=r"x\.inter, line 1: missing required column 'timestamp'"):
        load_path(tmp_path)


def test_missing_column_in_csv_header(tmp_path: Path) -> None:
    write(tmp_path / "movies.csv", "movieId,name,genres\n1,Film,Drama\n")
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4,1\n")
    with pytest.raises(DataError, match=r"movies\.csv, line 1: missing required column 'title'"):
        load_path(tmp_path)


def test_atomic_row_with_wrong_field_count(tmp_path: Path) -> None:
    write(tmp_path / "x.item", "item_id:token\tmovie_title:token_seq\n1\tFilm\n2\n")
    write(tmp_path / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t1\t3\n")
    with pytest.raises(DataError, match=r"x\.item, line 3: expected 2 tab-separated fields, got 1"):
        load_path(tmp_path)


def test_csv_row_with_wrong_field_count(tmp_path: Path) -> None:
    write(tmp_path / "items.csv", "item_id,text\ni1,one\ni2\n")
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\nu,i1,1\n")
    with pytest.raises(DataError, match=r"items\.csv, line 3: expected 2 comma-separated fields"):
        load_path(tmp_path)


def test_undecodable_utf8_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "items.csv", "item_id,text\ni1,one\n")
    (tmp_path / "interactions.csv").write_bytes(
        b"user_id,item_id,timestamp\nu,i1,1\nu,i1,2\n\xe9t\xe9,i1,3\n"
    )
    with pytest.raises(DataError, match=r"interactions\.csv, line 4: bytes are not valid utf-8"):
        load_path(tmp_path)


def test_duplicate_item_id_in_items_file(tmp_path: Path) -> None:
    write(tmp_path / "movies.dat", "1::A (1990)::Drama\n2::B (1991)::Drama\n1::C (1992)::Drama\n")
    write(tmp_path / "ratings.dat", "1::1::5::10\n")
    with pytest.raises(DataError, match=r"movies\.dat, line 3: item id '1' appears again"):
        load_path(tmp_path)


def test_bad_genre_flag(tmp_path: Path) -> None:
    write(tmp_path / "u.item", U_ITEM.replace("|0\n", "|x\n", 1), encoding="latin-1")
    write(tmp_path / "u.data", "1\t1\t5\t1\n")
    with pytest.raises(DataError, match=r"u\.item, line 1: genre flags"):
        load_path(tmp_path)


def test_missing_items_file_names_the_path(tmp_path: Path) -> None:
    write(tmp_path / "u.data", "1\t1\t5\t1\n")
    with pytest.raises(DataError, match=r"u\.item: file not found; expected the ml-100k items"):
        load_path(tmp_path)


def test_missing_or_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        load_path(tmp_path / "absent")
    with pytest.raises(DataError, match=r"found no dataset files; expected .*u\.data"):
        load_path(tmp_path)


def test_bad_arguments_fail_with_a_sentence(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dataset must be"):
        load_dataset(dataset="ml-2k", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="needs data_path"):
        load_dataset(dataset="path", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="Unknown data_format"):
        load_path(write_ml100k(tmp_path), data_format="parquet")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("interactions.csv", "user_id,item_id,timestamp\n"),  # only its header
        ("interactions.csv", "user_id,item_id,timestamp\n\n  \n"),  # and blank lines
        ("x.inter", "user_id:token\titem_id:token\ttimestamp:float\n"),
        ("u.data", ""),  # GroupLens files have no header: empty
    ],
)
def test_an_interactions_file_without_rows_is_an_error_naming_it(
    tmp_path: Path, name: str, text: str
) -> None:
    write(tmp_path / "items.csv", "item_id,text\n1,One\n")
    write(tmp_path / "x.item", "item_id:token\tmovie_title:token_seq\n1\tOne\n")
    write(tmp_path / "u.item", U_ITEM, encoding="latin-1")
    path = write(tmp_path / name, text)
    items = {"u.data": "u.item", "x.inter": "x.item"}.get(name, "items.csv")
    catalog = load_catalog(tmp_path / items)
    with pytest.raises(DataError, match="holds no interactions") as info:
        load_interactions(path, catalog=catalog)
    assert str(info.value).startswith(f"{path}: ")


def test_a_catalog_without_items_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path / "items.csv", "item_id,text\n")
    with pytest.raises(DataError, match=r"items\.csv: holds no items"):
        load_catalog(path)


def test_an_empty_item_text_is_a_warning_naming_its_lines(tmp_path: Path, caplog) -> None:
    path = write(tmp_path / "items.csv", "item_id,text\ni1,one\ni2,\ni3,  \ni4,four\n")
    with caplog.at_level(logging.WARNING, logger="common.readers"):
        catalog = load_catalog(path)
    assert catalog.texts == ("one", "i2", "i3", "four")  # the id stands in for the text
    (record,) = caplog.records
    assert f"{path}: 2 item(s) have an empty text or title (line(s) 3, 4)" in record.getMessage()
    caplog.clear()
    write(tmp_path / "ml" / "movies.dat", "1::Film (1990)::Drama\n2::::Drama\n")
    with caplog.at_level(logging.WARNING, logger="common.readers"):
        assert load_catalog(tmp_path / "ml").texts[1] == "2. Genres: Drama"
    assert "movies.dat: 1 item(s) have an empty text or title (line(s) 2)" in caplog.text


def test_a_negative_timestamp_is_refused_with_its_line(tmp_path: Path) -> None:
    write(tmp_path / "items.csv", "item_id,text\ni1,one\n")
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\nu,i1,0\nu,i1,-5\n")
    with pytest.raises(DataError, match=r"interactions\.csv, line 3: timestamp '-5' is negative"):
        load_path(tmp_path)


def test_a_utf16_file_is_named_with_what_to_do(tmp_path: Path) -> None:
    write(tmp_path / "items.csv", "item_id,text\ni1,one\n", encoding="utf-16")
    with pytest.raises(DataError, match=r"items\.csv: the file is UTF-16 encoded; save it as"):
        load_catalog(tmp_path / "items.csv")


def test_users_too_short_to_evaluate_are_counted_in_a_warning(caplog) -> None:
    rows = [("one", 1, 1.0), ("two", 1, 1.0), ("two", 2, 2.0), ("three", 1, 1.0)]
    rows += [("three", 2, 2.0), ("three", 3, 3.0), ("lone", 4, 1.0)]
    with caplog.at_level(logging.WARNING, logger="common.readers"):
        split_by_user(interactions(rows))
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "2 of 4 user(s) have fewer than 2 interactions and are skipped from evaluation"
    )
    assert "1 more have 2 and are skipped from validation" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="common.readers"):
        split_by_user(interactions([("a", 1, 1.0), ("a", 2, 2.0), ("a", 3, 3.0)]))
    assert not caplog.records  # everyone evaluable: nothing to say


def test_join_refuses_an_interactions_file_without_rows(tmp_path: Path, capsys) -> None:
    from client.device import main

    catalog = write(tmp_path / "items.csv", "item_id,text\ni1,one\n")
    data = write(tmp_path / "mine.csv", "user_id,item_id,timestamp\n")
    args = ["join", "--superlink", "127.0.0.1:1", "--insecure", "--data", str(data)]
    code = main([*args, "--catalog", str(catalog), "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"fedrec-client: error: {data}: holds no interactions; " + (
        "expected one row per interaction (user, item, timestamp).\n"
    )
    assert not (tmp_path / "state").exists()  # refused before anything was started


# --------------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------------


def test_catalog_with_items_and_fingerprint() -> None:
    catalog = Catalog(("1", "2"), ("One", "Two"))
    assert len(catalog) == 2 and catalog.index_of("2") == 1
    grown = catalog.with_items({"new": "A new film", "blank": " "})
    assert grown.item_ids == ("1", "2", "new", "blank")
    assert grown.texts[2:] == ("A new film", "blank")
    assert grown.index_of("new") == 2 and len(catalog) == 2  # the original is unchanged
    assert grown.fingerprint() != catalog.fingerprint()
    assert Catalog(("1", "2"), ("One", "Two")).fingerprint() == catalog.fingerprint()
    assert Catalog(("1", "2"), ("One", "Tw0")).fingerprint() != catalog.fingerprint()
    # Ids and texts are hashed with length prefixes: moving a character between them differs.
    assert Catalog(("12",), ("x",)).fingerprint() != Catalog(("1",), ("2x",)).fingerprint()
    assert len(catalog.fingerprint()) == 64


def test_catalog_rejects_duplicates_and_unknown_ids() -> None:
    catalog = Catalog(("1",), ("One",))
    with pytest.raises(DataError, match="'1' is already in the catalog"):
        catalog.with_items({"1": "again"})
    with pytest.raises(DataError, match="appears twice"):
        Catalog(("1", "1"), ("a", "b"))
    with pytest.raises(KeyError, match="'9' is not in the catalog"):
        catalog.index_of("9")


# --------------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------------


def test_partition_one_user_per_client() -> None:
    parts = partition_users(5, scheme="user", num_partitions=0, seed=0)
    assert [p.tolist() for p in parts] == [[0], [1], [2], [3], [4]]


@pytest.mark.parametrize(("num_users", "num_partitions"), [(10, 3), (943, 10), (7, 7), (5, 1)])
def test_partition_iid_covers_every_user_once(num_users: int, num_partitions: int) -> None:
    parts = partition_users(num_users, scheme="iid", num_partitions=num_partitions, seed=1)
    assert len(parts) == num_partitions
    assert sorted(np.concatenate(parts).tolist()) == list(range(num_users))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    again = partition_users(num_users, scheme="iid", num_partitions=num_partitions, seed=1)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))


def test_partition_iid_depends_on_seed_and_validates() -> None:
    first = partition_users(100, scheme="iid", num_partitions=4, seed=1)
    second = partition_users(100, scheme="iid", num_partitions=4, seed=2)
    assert any(not np.array_equal(p, q) for p, q in zip(first, second, strict=True))
    with pytest.raises(ValueError, match="leaving some empty"):
        partition_users(3, scheme="iid", num_partitions=4, seed=0)
    with pytest.raises(ValueError, match="num_partitions >= 1"):
        partition_users(3, scheme="iid", num_partitions=0, seed=0)
    with pytest.raises(ValueError, match="Unknown partition scheme"):
        partition_users(3, scheme="dirichlet", num_partitions=2, seed=0)


# --------------------------------------------------------------------------------------------
# Fetching MovieLens-100K (offline: pip and the wheel are faked)
# --------------------------------------------------------------------------------------------


def test_ensure_ml100k_extracts_the_three_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in ("ml-100k.inter", "ml-100k.item", "ml-100k.user", "ml-100k.kg"):
            archive.writestr(f"recbole/dataset_example/ml-100k/{name}", f"{name}\n")
    calls = []

    def fetch(destination: Path) -> Path:
        calls.append(destination)
        return wheel

    monkeypatch.setattr(readers, "_download_recbole_wheel", fetch)
    cache = tmp_path / "cache"
    target = ensure_ml100k(cache)
    assert target == cache / "ml-100k"
    assert sorted(p.name for p in target.iterdir()) == [
        "ml-100k.inter",
        "ml-100k.item",
        "ml-100k.user",
    ]
    assert [p.name for p in cache.iterdir()] == ["ml-100k"]  # the staging directory is gone
    assert ensure_ml100k(cache) == target and len(calls) == 1  # cached: no second download


def test_ensure_ml100k_explains_a_failed_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(readers.subprocess, "run", offline)
    with pytest.raises(RuntimeError, match="dataset='path'") as info:
        ensure_ml100k(tmp_path)
    assert "No matching distribution" in str(info.value)
    assert not (tmp_path / "ml-100k").exists()


# --------------------------------------------------------------------------------------------
# The real MovieLens-100K (runs when the cache holds it; never downloads)
# --------------------------------------------------------------------------------------------


def test_real_ml100k_matches_the_protocol() -> None:
    cache = Path(os.environ.get("FEDREC_CACHE", "~/.cache/fedrec")).expanduser()
    if not all(
        (cache / "ml-100k" / f"ml-100k.{ext}").is_file() for ext in ("inter", "item", "user")
    ):
        pytest.skip(
            f"MovieLens-100K is not cached in {cache / 'ml-100k'}; run "
            "`python -c 'from pathlib import Path; from common.readers import ensure_ml100k; "
            f'ensure_ml100k(Path("{cache}"))\'` once (needs the package index).'
        )
    ds = load_dataset(dataset="ml-100k", cache_dir=cache)
    inter = ds.interactions
    assert (inter.num_users, len(ds.catalog), len(inter)) == (943, 1682, 100_000)
    assert ds.catalog.texts[0] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    splits = split_by_user(inter)
    assert sum(len(s.train) for s in splits) == 98_114
    assert sum(s.valid >= 0 for s in splits) == 943 and sum(s.test >= 0 for s in splits) == 943
    assert as_tuples(inter) == reference_split(inter)
    # Test and validation share a timestamp for 415 users: file order decides "last" there.
    last_two: list[list[float]] = [[] for _ in inter.user_ids]
    for user, ts in sorted(zip(inter.user.tolist(), inter.timestamp.tolist(), strict=True)):
        last_two[user] = [*last_two[user][-1:], ts]
    assert sum(a == b for a, b in last_two) == 415
