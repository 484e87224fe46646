"""The HTTP service, in-process: endpoints, validation limits, freshness, and a property-based
test generated from its OpenAPI schema that finds no server error."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from client.installed import install
from client.recommender import LocalRecommender
from client.service import Limits, create_service
from common.weights import load_model_dir
from tests.test_recommender import catalog_of, trained

LIMITS = Limits(
    history=20, k=25, batch=4, items=5, item_id_chars=16, text_chars=200, body_bytes=20_000
)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, object]:
    return trained(tmp_path_factory.mktemp("service"), item_id_embedding=False)


@pytest.fixture
def client(model, tmp_path: Path) -> TestClient:
    model_dir, cfg = model
    state, meta = load_model_dir(model_dir)
    install(tmp_path, state=state, cfg=cfg, metadata={**meta, "version": "r0001-a"})
    rec = LocalRecommender.installed(tmp_path, catalog=catalog_of(cfg), device="cpu")
    with TestClient(create_service(rec, limits=LIMITS)) as test_client:
        test_client.state_dir = tmp_path
        test_client.cfg = cfg
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
    assert client.post("/items", json=long_text).status_code == 422
    blank = {"items": [{"item_id": "x", "text": "   "}]}
    assert client.post("/items", json=blank).status_code == 422
    blank_id = {"items": [{"item_id": " ", "text": "a text"}]}  # found by the property test
    assert client.post("/items", json=blank_id).status_code == 422
    huge = client.post(
        "/items",
        content=b"{" + b" " * LIMITS.body_bytes + b"}",
        headers={"content-type": "application/json"},
    )
    assert huge.status_code == 413


def test_an_item_added_through_the_api_is_recommended_next(client: TestClient) -> None:
    history = {"history": ["i0", "i6", "i12"], "k": 10}
    best = client.post("/recommend", json=history).json()["items"][0]
    catalog = catalog_of(client.cfg)
    text = catalog.texts[catalog.index_of(best["item_id"])]
    added = client.post("/items", json={"items": [{"item_id": "fresh", "text": text}]})
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
    assert client.post("/reload").json()["model_version"] == "r0002-b"


@pytest.fixture
def api_app(model, tmp_path_factory):
    model_dir, cfg = model
    rec = LocalRecommender.load(model_dir, catalog=catalog_of(cfg), device="cpu")
    return create_service(rec, limits=LIMITS)


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
            case.call_and_validate(checks=[not_a_server_error])

        no_server_error()
