"""The HTTP service, in-process: endpoints, validation limits, freshness, write credentials,
added items kept across restarts, and a property-based test generated from its OpenAPI schema
that finds no server error."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import stat
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from client.installed import install
from client.recommender import ADDED_ITEMS_FILE, LocalRecommender
from client.service import TOKEN_ENV, TOKEN_FILE, Limits, create_service, service_token
from common.data import DataError
from common.weights import load_model_dir
from tests.test_recommender import catalog_of, trained

LIMITS = Limits(
    history=20,
    k=25,
    batch=4,
    items=5,
    total_added_items=8,
    item_id_chars=16,
    text_chars=200,
    body_bytes=20_000,
)
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_backbone) -> tuple[Path, object]:
    return trained(tmp_path_factory.mktemp("service"), tiny_backbone, item_id_embedding=False)


def serving(model, state_dir: Path, *, limits: Limits = LIMITS) -> TestClient:
    """A test client of a service over the model installed in state_dir (installed if absent)."""
    model_dir, cfg = model
    if not (state_dir / "models").exists():
        state, meta = load_model_dir(model_dir)
        install(state_dir, state=state, cfg=cfg, metadata={**meta, "version": "r0001-a"})
    rec = LocalRecommender.installed(state_dir, catalog=catalog_of(cfg), device="cpu")
    test_client = TestClient(create_service(rec, limits=limits, token=TOKEN))
    test_client.state_dir, test_client.cfg = state_dir, cfg
    return test_client


@pytest.fixture
def client(model, tmp_path: Path) -> TestClient:
    with serving(model, tmp_path) as test_client:
        yield test_client


def test_recommend_health_and_model(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health == {"status": "ok", "items": 60, "model_version": "r0001-a"}
    assert client.get("/model").json()["version"] == "r0001-a"
    body = client.post("/recommend", json={"history": ["i0", "i6"], "k": 5}).json()
    assert body["model_version"] == "r0001-a" and len(body["items"]) == 5
    assert {"item_id", "title", "score"} <= set(body["items"][0])
    assert not {"i0", "i6"} & {i["item_id"] for i in body["items"]}
    batch = client.post(
        "/recommend/batch", json={"requests": [{"history": ["i0", "i6"], "k": 5}, {"k": 2}]}
    ).json()
    assert batch["results"][0] == body["items"] and len(batch["results"][1]) == 2


def test_unknown_ids_and_limits_are_4xx_that_say_why(client: TestClient) -> None:
    res = client.post("/recommend", json={"history": ["i0", "ghost"]})
    assert res.status_code == 422
    assert res.json()["unknown_items"] == ["ghost"] and "'ghost'" in res.json()["detail"]
    too_long = {"history": ["i0"] * (LIMITS.history + 1)}
    assert client.post("/recommend", json=too_long).status_code == 422
    assert client.post("/recommend", json={"history": [], "k": LIMITS.k + 1}).status_code == 422
    assert client.post("/recommend", json={"history": [], "k": 0}).status_code == 422
    assert client.post("/recommend", json={"history": [], "bogus": 1}).status_code == 422
    long_text = {"items": [{"item_id": "x", "text": "a" * (LIMITS.text_chars + 1)}]}
    assert client.post("/items", json=long_text, headers=AUTH).status_code == 422
    blank = {"items": [{"item_id": "x", "text": "   "}]}
    assert client.post("/items", json=blank, headers=AUTH).status_code == 422
    blank_id = {"items": [{"item_id": " ", "text": "a text"}]}  # found by the property test
    assert client.post("/items", json=blank_id, headers=AUTH).status_code == 422
    huge = client.post(
        "/items",
        content=b"{" + b" " * LIMITS.body_bytes + b"}",
        headers={"content-type": "application/json", **AUTH},
    )
    assert huge.status_code == 413


def test_an_item_added_through_the_api_is_recommended_next(client: TestClient) -> None:
    history = {"history": ["i0", "i6", "i12"], "k": 10}
    best = client.post("/recommend", json=history).json()["items"][0]
    catalog = catalog_of(client.cfg)
    text = catalog.texts[catalog.index_of(best["item_id"])]
    added = client.post(
        "/items", json={"items": [{"item_id": "fresh", "text": text}]}, headers=AUTH
    )
    assert added.json() == {"added": 1, "updated": 0, "items": 61}
    top2 = [i["item_id"] for i in client.post("/recommend", json=history).json()["items"][:2]]
    assert "fresh" in top2
    # and a new interaction changes the next answer
    longer = {"history": [*history["history"], best["item_id"]], "k": 10}
    assert client.post("/recommend", json=longer).json()["items"] != top2


def test_reload_picks_up_a_newer_install(client: TestClient, model) -> None:
    model_dir, cfg = model
    state, meta = load_model_dir(model_dir)
    install(client.state_dir, state=state, cfg=cfg, metadata={**meta, "version": "r0002-b"})
    assert client.post("/reload", headers=AUTH).json()["model_version"] == "r0002-b"


def test_writes_need_the_token_and_reads_do_not(client: TestClient, model) -> None:
    new = {"items": [{"item_id": "fresh", "text": "space rocket planet"}]}
    for path, body in (("/items", new), ("/reload", None)):
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"X": "y"}):
            refused = client.post(path, json=body, headers=headers)
            assert refused.status_code == 401, (path, headers)
            assert refused.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer" in refused.json()["detail"]
    # an unauthenticated request learns nothing about its body: 401 before validation
    assert client.post("/items", json={"bogus": 1}).status_code == 401
    assert client.get("/health").json()["items"] == 60  # nothing was added
    assert client.post("/items", json=new, headers=AUTH).status_code == 200
    assert client.post("/reload", headers=AUTH).status_code == 200
    assert client.post("/recommend", json={"history": ["fresh"]}).status_code == 200  # open
    # a service created without a token refuses every write
    model_dir, cfg = model
    rec = LocalRecommender.load(model_dir, catalog=catalog_of(cfg), device="cpu")
    with TestClient(create_service(rec, limits=LIMITS)) as tokenless:
        for path, body in (("/items", new), ("/reload", None)):
            refused = tokenless.post(path, json=body, headers=AUTH)
            assert refused.status_code == 403 and "without a token" in refused.json()["detail"]
    with pytest.raises(ValueError, match="at least 16"):
        create_service(rec, token="short")


def test_the_token_comes_from_a_file_the_environment_or_a_new_private_file(
    tmp_path: Path,
) -> None:
    given = tmp_path / "given.token"
    given.write_text(TOKEN + "\n")
    given.chmod(0o600)
    assert service_token(token_file=given, state_dir=tmp_path, environ={}) == (TOKEN, str(given))
    from_env = service_token(token_file=None, state_dir=tmp_path, environ={TOKEN_ENV: TOKEN})
    assert from_env == (TOKEN, f"${TOKEN_ENV}")
    token, kept_in = service_token(token_file=None, state_dir=tmp_path, environ={})
    path = tmp_path / TOKEN_FILE
    assert kept_in == str(path) and path.read_text().strip() == token and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert service_token(token_file=None, state_dir=None, environ={})[1] is None
    with pytest.raises(ValueError, match="does not exist"):
        service_token(token_file=tmp_path / "missing", state_dir=None, environ={})
    given.write_text("short")
    with pytest.raises(ValueError, match="at least 16"):
        service_token(token_file=given, state_dir=None, environ={})


def test_replacing_an_items_text_must_be_asked_for(client: TestClient) -> None:
    catalog_ids = [{"item_id": f"i{n}", "text": "space rocket planet"} for n in range(3)]
    refused = client.post("/items", json={"items": catalog_ids}, headers=AUTH)
    assert refused.status_code == 409
    assert refused.json()["existing_items"] == ["i0", "i1", "i2"]
    assert (
        "'i0', 'i1', 'i2'" in refused.json()["detail"]
        and '"replace": true' in (refused.json()["detail"])
    )
    assert client.get("/model").json()["added_items"] == 0  # nothing was added
    replaced = client.post("/items", json={"items": catalog_ids, "replace": True}, headers=AUTH)
    assert replaced.json() == {"added": 0, "updated": 3, "items": 60}
    again = {"items": [{"item_id": "i0", "text": "another text"}]}  # added ids too
    assert client.post("/items", json=again, headers=AUTH).status_code == 409


def test_a_chunked_body_over_the_limit_is_refused(client: TestClient) -> None:
    def chunks():  # no Content-Length: Transfer-Encoding chunked
        yield b'{"history": ["'
        yield b"x" * (2 * LIMITS.body_bytes)
        yield b'"]}'

    res = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in res.request.headers
    assert res.status_code == 413 and len(res.content) < 200


def test_the_body_limit_counts_bytes_read_and_stops_reading(client: TestClient) -> None:
    """Driven over raw ASGI: 1 KB chunks, no Content-Length; reading ends at the limit."""
    chunk, total = 1000, 200
    read = 0

    async def receive():
        nonlocal read
        read += 1
        return {"type": "http.request", "body": b" " * chunk, "more_body": read < total}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/recommend",
        "raw_path": b"/recommend",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "server": ("test", 80),
        "client": ("test", 1),
    }
    asyncio.run(client.app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert read == LIMITS.body_bytes // chunk + 1  # not one chunk more


def test_adds_are_capped_per_request_and_in_total(client: TestClient) -> None:
    def items(*names: str) -> dict:
        return {"items": [{"item_id": n, "text": f"space rocket {n}"} for n in names]}

    too_many = client.post("/items", json=items(*"abcdef"), headers=AUTH)  # 6 > 5 per request
    assert too_many.status_code == 413 and "at most 5" in too_many.json()["detail"]
    assert client.post("/items", json=items(*"abcde"), headers=AUTH).status_code == 200
    full = client.post("/items", json=items("f", "g", "h", "i"), headers=AUTH)  # 9 > 8 in all
    assert full.status_code == 429 and "cap of 8" in full.json()["detail"]
    assert client.get("/model").json()["added_items"] == 5  # nothing of it was added
    assert client.post("/items", json=items("f", "g", "h"), headers=AUTH).status_code == 200
    # replacing an added item's text adds no item, so it is still allowed at the cap
    replace = {**items("a"), "replace": True}
    assert client.post("/items", json=replace, headers=AUTH).json()["updated"] == 1


def test_a_422_never_echoes_the_input(model, tmp_path: Path) -> None:
    big = "x" * 500_000
    with serving(model, tmp_path, limits=Limits()) as client:
        for path, body in (
            ("/recommend", {"history": [big]}),  # an id over item_id_chars
            ("/recommend", {"history": [], "k": big}),  # not an int
            ("/recommend", {"history": [], big: 1}),  # an unknown field, named by its location
            ("/items", {"items": [{"item_id": "n", "text": big}]}),
        ):
            res = client.post(path, json=body, headers=AUTH)
            assert res.status_code == 422 and len(res.content) < 5_000, path
            first = res.json()["detail"][0]
            assert set(first) == {"loc", "msg", "type"} and first["msg"]
        many = {"requests": [{"history": ["y" * 200]}] * 64}  # 64 errors, 20 of them listed
        res = client.post("/recommend/batch", json=many)
        assert res.status_code == 422 and len(res.content) < 5_000
        assert res.json()["error_count"] == 64 and len(res.json()["detail"]) == 20


def test_added_items_survive_a_restart(model, tmp_path: Path) -> None:
    new = {"items": [{"item_id": "fresh", "text": "space rocket planet"}]}
    replaced = {"items": [{"item_id": "i3", "text": "a new text"}], "replace": True}
    with serving(model, tmp_path) as first:
        assert first.post("/items", json=new, headers=AUTH).status_code == 200
        assert first.post("/items", json=replaced, headers=AUTH).status_code == 200
    rows = (tmp_path / ADDED_ITEMS_FILE).read_text().splitlines()
    assert [json.loads(r)["item_id"] for r in rows] == ["fresh", "i3"]

    restarted = dataclasses.replace(LIMITS, k=60)  # to see every item's title
    with serving(model, tmp_path, limits=restarted) as second:  # a restart over the same state
        assert second.get("/health").json()["items"] == 61
        assert second.get("/model").json()["added_items"] == 2
        answer = second.post("/recommend", json={"history": ["fresh"], "k": 60}).json()["items"]
        assert {r["item_id"]: r["title"] for r in answer}["i3"] == "a new text"
        # the total cap (8) counts the items kept from before the restart
        five = {"items": [{"item_id": f"n{n}", "text": "a text"} for n in range(5)]}
        assert second.post("/items", json=five, headers=AUTH).status_code == 200
        two = {"items": [{"item_id": f"m{n}", "text": "a text"} for n in range(2)]}
        assert second.post("/items", json=two, headers=AUTH).status_code == 429

    (tmp_path / ADDED_ITEMS_FILE).write_text(rows[0] + "\n" + '{"item_id": "x"}\n')
    with pytest.raises(DataError, match=rf"{ADDED_ITEMS_FILE}, line 2: .*Fix or delete"):
        serving(model, tmp_path)


@pytest.fixture
def api_app(model, tmp_path_factory):
    model_dir, cfg = model
    rec = LocalRecommender.load(model_dir, catalog=catalog_of(cfg), device="cpu")
    return create_service(rec, limits=LIMITS, token=TOKEN)


def test_no_input_makes_a_server_error(api_app) -> None:
    """Hypothesis cases generated from /openapi.json, valid and invalid, for every operation.

    (Driven by hand: schemathesis' pytest plugin does not run under this pytest.)"""
    schema = schemathesis.openapi.from_asgi("/openapi.json", api_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/recommend", "/recommend/batch", "/items"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def no_server_error(case) -> None:
            case.call_and_validate(headers=AUTH, checks=[not_a_server_error])

        no_server_error()


def test_items_can_be_added_before_the_state_directory_exists(model, tmp_path: Path) -> None:
    """A device that serves a model directory before any install has no state dir yet."""
    model_dir, cfg = model
    state = tmp_path / "not-yet"
    rec = LocalRecommender.load(model_dir, catalog=catalog_of(cfg), state_dir=state)
    new = {"items": [{"item_id": "fresh", "text": "space rocket planet"}]}
    with TestClient(create_service(rec, limits=LIMITS, token=TOKEN)) as client:
        assert client.post("/items", json=new, headers=AUTH).status_code == 200
    assert (state / ADDED_ITEMS_FILE).exists()
