"""Property-based tests: random rows, encodings and catalogs at the loaders, random payloads at
the server's update validator. Every failure must be the project's own clear error (a
DataError naming the file), never another exception; every reply is accounted for."""

from __future__ import annotations

import csv
import io
import logging
import tempfile
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.data import Catalog, DataError, split_by_user
from common.readers import load_catalog, load_dataset
from common.wire import SENT_AS, encode_update, update_shape
from server.strategy import FedRecAvg
from tests.test_strategy import reply as message  # node's reply to the message sent to it

FAST = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

ENCODINGS = ("utf-8", "utf-8-sig", "latin-1", "cp1252", "utf-16")


@pytest.fixture(autouse=True)
def quiet_logs():
    """The loaders warn about short users and empty texts: not what these tests look at."""
    quiet = ("common.data", "common.readers", "server.strategy")
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    yield
    for name in quiet:
        logging.getLogger(name).setLevel(logging.NOTSET)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------

ITEM_IDS = ("1", "2", "3", "4", "5")
junk = st.one_of(  # what a damaged or foreign file holds where a value should be
    st.sampled_from(["", " ", "-1", "-0.5", "1.0", "01", "１", "nan", "inf", "1e999", "1_0"]),
    st.sampled_from(["yesterday", "0x10", "9" * 5000, '"', "a,b", "a\tb", "a\nb", "\x00", "é"]),
    st.text(max_size=8),
)


@st.composite
def table(draw, data_format: str) -> tuple[list[list[str]], list[list[str]]]:
    """(item rows, interaction rows) as cells: valid rows of the format, then a few damaged.

    Half of the draws stay valid; the others get cells replaced by junk, cells added or
    dropped, or rows removed, so both paths (loaded, DataError) are exercised.
    """
    ids = draw(st.lists(st.sampled_from(ITEM_IDS), min_size=1, max_size=5, unique=True))
    titles = st.one_of(st.text(max_size=12), st.sampled_from(["Heat (1995)", "Amélie", ""]))
    genres = st.lists(st.sampled_from(["Drama", "Sci-Fi", "Children's"]), max_size=2)
    items = []
    for item in ids:
        title = draw(titles)
        if data_format == "ml-100k":
            flags = draw(st.lists(st.sampled_from("01"), min_size=19, max_size=19))
            items.append([item, title, "01-Jan-1995", "", "http://x", *flags])
        elif data_format == "ml-1m":
            items.append([item, title, "|".join(draw(genres))])
        elif data_format == "ml-csv":
            items.append([item, title, "|".join(draw(genres)) or "(no genres listed)"])
        elif data_format == "atomic":
            items.append([item, title, draw(st.sampled_from(["1995", "", "unkonwn"]))])
        else:
            items.append([item, title])
    users = st.sampled_from(["1", "2", "3"])
    stamp = st.one_of(st.integers(0, 2**33).map(str), st.floats(0, 1e10).map(repr))
    interactions = [
        [draw(users), draw(st.sampled_from(ids)), "4", draw(stamp)]
        for _ in range(draw(st.integers(0, 8)))
    ]
    if data_format in ("csv", "atomic"):  # no rating column
        interactions = [[u, i, t] for u, i, _, t in interactions]
    for rows in (items, interactions):
        for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
            if not rows:
                break
            row = draw(st.sampled_from(rows))
            action = draw(st.sampled_from(["replace", "replace", "add", "drop", "remove"]))
            if action == "replace":
                row[draw(st.integers(0, len(row) - 1))] = draw(junk)
            elif action == "add":
                row.append(draw(junk))
            elif action == "drop":
                row.pop()
            else:
                rows.remove(row)
    return items, interactions


FILES = {  # format -> (items file, header), (interactions file, header), separators
    "csv": (("items.csv", "item_id,text"), ("interactions.csv", "user_id,item_id,timestamp")),
    "ml-csv": (
        ("movies.csv", "movieId,title,genres"),
        ("ratings.csv", "userId,movieId,rating,timestamp"),
    ),
    "atomic": (
        ("x.item", "item_id:token\tmovie_title:token_seq\trelease_year:token"),
        ("x.inter", "user_id:token\titem_id:token\ttimestamp:float"),
    ),
    "ml-100k": (("u.item", None), ("u.data", None)),
    "ml-1m": (("movies.dat", None), ("ratings.dat", None)),
}
SEPARATORS = {"ml-100k": ("|", "\t"), "ml-1m": ("::", "::"), "atomic": ("\t", "\t")}


def file_text(rows: list[list[str]], header: str | None, separator: str, quoted: bool) -> str:
    """A file's text: CSV written by the csv module (quoted) or every format joined naively."""
    if separator == "," and quoted:
        out = io.StringIO()
        csv.writer(out).writerows([header.split(","), *rows])
        return out.getvalue()
    lines = [separator.join(row) for row in rows]
    return "\n".join(([header] if header is not None else []) + lines) + "\n"


def check_loaded(directory: Path, **options) -> bool:
    """Load a dataset: it loads and keeps every invariant, or fails with a DataError naming a
    file of the directory (one line). Whether it loaded."""
    try:
        ds = load_dataset(dataset="path", data_path=str(directory), cache_dir=directory, **options)
    except DataError as exc:
        assert str(directory) in str(exc), exc
        assert "\n" not in str(exc)
        return False
    catalog, inter = ds.catalog, ds.interactions
    assert len(catalog) >= 1 and all(text.strip() for text in catalog.texts)
    assert all(item_id and item_id == item_id.strip() for item_id in catalog.item_ids)
    assert len(inter) >= 1 and inter.timestamp.dtype == np.float64
    assert np.all(np.isfinite(inter.timestamp)) and np.all(inter.timestamp >= 0)
    assert inter.item.min() >= 0 and inter.item.max() < len(catalog)
    splits = split_by_user(inter)
    used = sum(len(s.train) + (s.valid >= 0) + (s.test >= 0) for s in splits)
    assert len(splits) == inter.num_users and used == len(inter)
    return True


@pytest.mark.parametrize("data_format", list(FILES))
@FAST
@given(data=st.data(), quoted=st.booleans(), encoding=st.sampled_from(ENCODINGS))
def test_rows_of_every_format_load_or_fail_with_a_data_error(
    data_format: str, data, quoted: bool, encoding: str
) -> None:
    items, interactions = data.draw(table(data_format))
    (item_file, item_header), (inter_file, inter_header) = FILES[data_format]
    item_sep, inter_sep = SEPARATORS.get(data_format, (",", ","))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        text = file_text(items, item_header, item_sep, quoted)
        (directory / item_file).write_bytes(text.encode(encoding, errors="replace"))
        text = file_text(interactions, inter_header, inter_sep, quoted)
        (directory / inter_file).write_bytes(text.encode(encoding, errors="replace"))
        check_loaded(directory, data_format=data_format)


def test_the_row_generator_reaches_both_outcomes() -> None:
    """The property above is not vacuous: valid draws load, damaged ones are refused."""
    outcomes = set()

    @settings(max_examples=40, deadline=None, database=None)
    @given(table("csv"))
    def load(drawn) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            (directory / "items.csv").write_text(file_text(drawn[0], "item_id,text", ",", True))
            header = "user_id,item_id,timestamp"
            (directory / "interactions.csv").write_text(file_text(drawn[1], header, ",", True))
            outcomes.add(check_loaded(directory, data_format="csv"))

    load()
    assert outcomes == {True, False}


@FAST
@given(
    data_format=st.sampled_from(["csv", "ml-100k", "ml-1m", "ml-csv", "atomic"]),
    items=st.binary(max_size=300),
    interactions=st.binary(max_size=300),
)
def test_random_bytes_load_or_fail_with_a_data_error(data_format, items, interactions) -> None:
    names = {
        "csv": ("items.csv", "interactions.csv"),
        "ml-100k": ("u.item", "u.data"),
        "ml-1m": ("movies.dat", "ratings.dat"),
        "ml-csv": ("movies.csv", "ratings.csv"),
        "atomic": ("x.item", "x.inter"),
    }[data_format]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / names[0]).write_bytes(items)
        (directory / names[1]).write_bytes(interactions)
        check_loaded(directory, data_format=data_format)


@FAST
@given(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=20)), max_size=8))
def test_a_catalog_is_valid_or_a_data_error(pairs) -> None:
    item_ids, texts = [i for i, _ in pairs], [t for _, t in pairs]
    try:
        catalog = Catalog(tuple(item_ids), tuple(texts))
    except DataError:
        assert len(set(item_ids)) < len(item_ids) or not all(t.strip() for t in texts)
        return
    assert (
        len(catalog) == len(pairs)
        and catalog.fingerprint() == Catalog(tuple(item_ids), tuple(texts)).fingerprint()
    )
    assert all(catalog.index_of(i) == k for k, i in enumerate(item_ids))


clean = st.text(min_size=1, max_size=12).map(str.strip).filter(bool)


@FAST
@given(st.dictionaries(clean, clean, min_size=1, max_size=8), st.sampled_from(ENCODINGS[:2]))
def test_a_catalog_written_as_csv_reads_back_the_same(items: dict[str, str], encoding) -> None:
    out = io.StringIO()
    csv.writer(out).writerows([["item_id", "text"], *items.items()])  # "\r\n": quotes a "\r"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "items.csv"
        path.write_bytes(out.getvalue().encode(encoding))
        assert load_catalog(path) == Catalog(tuple(items), tuple(items.values()))


# --------------------------------------------------------------------------------------------
# The server's update validator
# --------------------------------------------------------------------------------------------

SHAPES = {"w": (2, 3), "b": (3,)}
NODES = (1, 2, 3, 4, 5, 6)


def validating_strategy(wire_dtype: str) -> FedRecAvg:
    """A strategy after configure_train of SHAPES, without a Flower run."""
    s = FedRecAvg(min_available_nodes=1, min_train_nodes=1, wire_dtype=wire_dtype)
    s._construct_messages = lambda record, node_ids, message_type: [
        SimpleNamespace(
            metadata=SimpleNamespace(message_id=f"q{n}", dst_node_id=n),
            content={"arrays": record["arrays"]},
        )
        for n in node_ids
    ]
    model = ArrayRecord(
        OrderedDict((k, Array(np.zeros(shape, np.float32))) for k, shape in SHAPES.items())
    )
    grid = SimpleNamespace(get_node_ids=lambda: list(NODES))
    s.configure_train(1, model, ConfigRecord(), grid)
    return s


numbers = st.one_of(
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 1e308, -0.0]),
)
DTYPES = ("float32", "float16", "float64", "int8", "int16", "int32", "uint8", "bool")


@st.composite
def tensors(draw, wire_dtype: str):
    """A tensor: mostly of the shape and dtype the wire expects, sometimes not."""
    name = draw(st.sampled_from([*SHAPES, "extra"]))
    shape = update_shape(SHAPES.get(name, (1,)), wire_dtype)
    expected = SENT_AS[wire_dtype][1]
    dtype = draw(st.sampled_from([expected, expected, expected, *DTYPES]))
    if draw(st.integers(0, 4)) == 0:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    size = int(np.prod(shape))
    if dtype.startswith("float"):
        element = st.floats(width=16 if dtype == "float16" else 32)
    elif dtype == "bool":
        element = st.booleans()
    else:
        element = st.integers(int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    values = draw(st.lists(element, min_size=size, max_size=size))
    return name, np.array(values, dtype=dtype).reshape(shape)


MUTATIONS = (
    "error",
    "declined",
    "bad count",
    "no count",
    "two metric records",
    "no metric record",
    "drop tensor",
    "extra tensor",
    "random tensor",
    "two array records",
    "no array record",
    "non-finite",
)


@st.composite
def replies(draw, wire_dtype: str):
    """A node's reply: a valid update of random values, then none to three mutations (an
    error, odd counts, missing, extra or foreign tensors, NaN, records added or removed)."""
    node = draw(st.sampled_from(NODES))
    mutations = draw(st.lists(st.sampled_from(MUTATIONS), max_size=3))
    if "error" in mutations:
        return message(node, error=Error(code=5, reason="Node Unavailable"))
    scale = draw(st.sampled_from([1e-6, 1.0, 1e4]))
    delta = {
        k: np.array(draw(st.lists(st.floats(-1, 1), min_size=n, max_size=n)), np.float32).reshape(
            shape
        )
        * np.float32(scale)
        for k, shape in SHAPES.items()
        for n in [int(np.prod(shape))]
    }
    if "non-finite" in mutations:
        name = draw(st.sampled_from(list(SHAPES)))
        delta[name].flat[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38]))
    zeros = {k: np.zeros(v, np.float32) for k, v in SHAPES.items()}
    with np.errstate(over="ignore", invalid="ignore"):
        arrays = OrderedDict(encode_update(delta, zeros, wire_dtype).items())
    if "drop tensor" in mutations:
        arrays.pop(draw(st.sampled_from(list(arrays))))
    if "extra tensor" in mutations or "random tensor" in mutations:
        name, value = draw(tensors(wire_dtype))
        arrays[name if "random tensor" in mutations else "extra"] = Array(value)
    metrics = {"num-examples": draw(st.integers(1, 1000)), "declined": 0}
    if "declined" in mutations:
        metrics["declined"] = 1
    if "bad count" in mutations:
        metrics["num-examples"] = draw(numbers)
    if "no count" in mutations:
        del metrics["num-examples"]
    content = {"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}
    # (a lone record under another name is test_renamed_records_or_other_metric_keys_...)
    if "no metric record" in mutations:
        del content["metrics"]
    elif "two metric records" in mutations:
        content["more-metrics"] = MetricRecord({"num-examples": 1})
    if "no array record" in mutations:
        del content["arrays"]
    elif "two array records" in mutations:
        content["more-arrays"] = ArrayRecord(arrays)
    return message(node, RecordDict(content))


def assert_validated(s: FedRecAvg, batch: list) -> None:
    """aggregate_train never raises; what it returns is finite float32 of the global shapes;
    every node sent work is counted once: trained, rejected, declined or lost."""
    arrays, _ = s.aggregate_train(1, batch)
    if arrays is not None:
        for name, shape in SHAPES.items():
            value = arrays[name].numpy()
            assert value.shape == shape and value.dtype == np.float32
            assert np.all(np.isfinite(value))
    stats = s.stats[1]
    counted = stats.clients_train + stats.clients_rejected + stats.clients_declined
    assert counted + stats.clients_failed == len(NODES)


@pytest.mark.parametrize("wire_dtype", ["float32", "half", "int8", "int8-down"])
@FAST
@given(data=st.data())
def test_random_replies_are_averaged_or_rejected_never_fatal(wire_dtype, data) -> None:
    s = validating_strategy(wire_dtype)
    unique = {"unique_by": lambda m: m.metadata.src_node_id}
    batch = data.draw(st.lists(replies(wire_dtype), max_size=len(NODES), **unique))
    assert_validated(s, batch)


def test_the_reply_generator_reaches_both_outcomes() -> None:
    """The property above is not vacuous: some updates are averaged, others rejected."""
    seen = {"trained": 0, "rejected": 0}

    @settings(max_examples=30, deadline=None, database=None)
    @given(
        st.lists(
            replies("int8"),
            min_size=1,
            max_size=len(NODES),
            unique_by=lambda m: m.metadata.src_node_id,
        )
    )
    def aggregate(batch) -> None:
        s = validating_strategy("int8")
        assert_validated(s, batch)
        seen["trained"] += s.stats[1].clients_train
        seen["rejected"] += s.stats[1].clients_rejected

    aggregate()
    assert seen["trained"] > 0 and seen["rejected"] > 0


def npy(value: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, value, allow_pickle=False)
    return out.getvalue()


@pytest.mark.parametrize("wire_dtype", ["float32", "half", "int8", "int8-down"])
@pytest.mark.parametrize("payload", ["garbage", "fewer-rows"])
def test_a_forged_array_whose_bytes_disagree_with_its_header_is_rejected(
    wire_dtype: str, payload: str
) -> None:
    s = validating_strategy(wire_dtype)
    forged = OrderedDict()
    for name, (shape, dtype) in s._expected.items():
        data = b"garbage" if payload == "garbage" else npy(np.ones(shape[-1:], dtype=dtype))
        forged[name] = Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)
    good = ArrayRecord(
        OrderedDict((k, Array(np.zeros(v[0], v[1]))) for k, v in s._expected.items())
    )
    batch = [
        message(
            1,
            RecordDict(
                {"arrays": ArrayRecord(forged), "metrics": MetricRecord({"num-examples": 5})}
            ),
        ),
        message(2, RecordDict({"arrays": good, "metrics": MetricRecord({"num-examples": 5})})),
    ]
    assert_validated(s, batch)
    assert s.stats[1].clients_rejected == 1 and s.stats[1].clients_train == 1


@pytest.mark.parametrize("odd", ["arrays renamed", "metrics renamed", "extra metric"])
def test_renamed_records_or_other_metric_keys_are_not_fatal(odd: str) -> None:
    s = validating_strategy("float32")
    zeros = {k: np.zeros(v, np.float32) for k, v in SHAPES.items()}

    def content(**metrics) -> RecordDict:
        update = encode_update(zeros, zeros, "float32")
        return RecordDict(
            {"arrays": update, "metrics": MetricRecord({"num-examples": 5, **metrics})}
        )

    peculiar = content(**({"peak-rss-mb": 1.0} if odd == "extra metric" else {}))
    if odd != "extra metric":
        kind = odd.split()[0]
        peculiar = RecordDict({("other" if k == kind else k): v for k, v in peculiar.items()})
    assert_validated(s, [message(1, peculiar), message(2, content())])
