"""The on-device recommender: same ranking as the evaluator, fresh items, reloads, int8."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from client.installed import install
from client.recommender import LocalRecommender, UnknownItems, title_of
from common.config import Config
from common.readers import load_catalog
from common.task import build_model, item_states, load_data, train_records
from common.train import item_vectors, left_pad, train, user_vectors
from common.weights import save_model_dir, trainable_state
from tests.fixtures import make_synthetic_dataset
from tests.tiny import TINY_CONFIG

TINY = {**TINY_CONFIG, "max_tokens": 8, "learning_rate": 0.01}


def synthetic_config(root: Path, backbone: Path, *, num_users: int = 30, **changes) -> Config:
    """The tiny model over a synthetic dataset written under root (tests.fixtures)."""
    return Config(
        dataset="path",
        data_path=str(make_synthetic_dataset(root / "data", num_users=num_users)),
        backbone=str(backbone),
        cache_dir=str(root / "cache"),
        **{**TINY, **changes},
    )


def trained(root: Path, backbone: Path, **changes) -> tuple[Path, Config]:
    """A tiny model trained for a few epochs on the synthetic catalog, saved to a directory."""
    cfg = synthetic_config(root, backbone, **changes)
    dataset, splits = load_data(cfg)
    model = build_model(cfg, num_items=len(dataset.catalog))
    items = item_states(cfg, dataset.catalog)
    train(
        model=model,
        cfg=cfg,
        records=train_records(cfg, list(splits)),
        items=items,
        epochs=4,
        seed=0,
    )
    metadata = {
        "version": "r0001-test",
        "catalog_sha256": dataset.catalog.fingerprint(),
        "catalog_items": len(dataset.catalog),
    }
    path = save_model_dir(root / "model", state=trainable_state(model), cfg=cfg, metadata=metadata)
    return path, cfg


@pytest.fixture(scope="module")
def with_ids(tmp_path_factory, tiny_backbone) -> tuple[Path, Config]:
    return trained(tmp_path_factory.mktemp("with-ids"), tiny_backbone)


@pytest.fixture(scope="module")
def text_only(tmp_path_factory, tiny_backbone) -> tuple[Path, Config]:
    return trained(tmp_path_factory.mktemp("text-only"), tiny_backbone, item_id_embedding=False)


def catalog_of(cfg: Config):
    return load_catalog(cfg.data_path)


def reference_scores(model_dir: Path, cfg: Config, history: list[str]) -> np.ndarray:
    """Scores of every item by the training code's own functions."""
    from common.weights import load_model_dir, load_trainable_state

    dataset, _ = load_data(cfg)
    model = build_model(cfg, num_items=len(dataset.catalog))
    load_trainable_state(model, load_model_dir(model_dir)[0])
    vectors = item_vectors(model, item_states(cfg, dataset.catalog))
    ids = np.array([dataset.catalog.index_of(i) for i in history])
    users = user_vectors(model, vectors, left_pad(ids, cfg.history_len)[None])
    return (users @ vectors.T)[0].numpy()


def test_ranking_equals_the_evaluators_scores(with_ids) -> None:
    model_dir, cfg = with_ids
    catalog = catalog_of(cfg)
    rec = LocalRecommender.load(model_dir, catalog=catalog, device="cpu")
    history = list(catalog.item_ids[:9])
    scores = reference_scores(model_dir, cfg, history)
    scores[[catalog.index_of(i) for i in history]] = -np.inf
    expected = [catalog.item_ids[i] for i in np.argsort(-scores, kind="stable")[:10]]
    got = rec.recommend(history, k=10)
    assert [r.item_id for r in got] == expected
    assert np.allclose([r.score for r in got], np.sort(scores)[::-1][:10], atol=1e-5)
    assert got[0].title == title_of(catalog.texts[catalog.index_of(got[0].item_id)])
    # seen items come back only when asked for
    assert not {r.item_id for r in got} & set(history)
    everything = rec.recommend(history, k=len(catalog), exclude_seen=False)
    assert {r.item_id for r in everything} == set(catalog.item_ids)
    # a batch gives the same answers as single requests (up to float summation order)
    histories = [history, history[:3], [catalog.item_ids[20]]]
    for batch, single in zip(
        rec.recommend_batch(histories, k=5), [rec.recommend(h, k=5) for h in histories], strict=True
    ):
        assert [r.item_id for r in batch] == [r.item_id for r in single]
        assert np.allclose([r.score for r in batch], [r.score for r in single], atol=1e-5)
    assert rec.recommend_batch([], k=5) == []


def test_unknown_ids_are_named(with_ids) -> None:
    model_dir, cfg = with_ids
    rec = LocalRecommender.load(model_dir, catalog=catalog_of(cfg), device="cpu")
    with pytest.raises(UnknownItems, match="'nope', 'x9'") as err:
        rec.recommend(["i1", "x9", "nope"])
    assert err.value.ids == ["nope", "x9"]
    with pytest.raises(ValueError, match="k must be at least 1"):
        rec.recommend(["i1"], k=0)


def test_an_added_item_is_recommended_at_once_when_it_is_the_best_match(text_only) -> None:
    """Known answer: with text-only item vectors, an item with the same text as the current
    best recommendation scores exactly as high, so it joins the top two immediately."""
    model_dir, cfg = text_only
    catalog = catalog_of(cfg)
    rec = LocalRecommender.load(model_dir, catalog=catalog, device="cpu")
    history = ["i0", "i6", "i12"]
    best = rec.recommend(history, k=10)[0]
    text = catalog.texts[catalog.index_of(best.item_id)]
    assert rec.add_items({"fresh-1": text}) == {"added": 1, "updated": 0}
    after = rec.recommend(history, k=10)
    assert "fresh-1" in [r.item_id for r in after[:2]]
    fresh = next(r for r in after if r.item_id == "fresh-1")
    assert fresh.score == pytest.approx(best.score, abs=1e-5)
    assert rec.num_items == len(catalog) + 1 and rec.has_item("fresh-1")
    # the new item can be part of a history right away, and is then excluded
    assert "fresh-1" not in [r.item_id for r in rec.recommend([*history, "fresh-1"])]


def test_a_history_update_changes_the_next_answer(with_ids) -> None:
    model_dir, cfg = with_ids
    rec = LocalRecommender.load(model_dir, catalog=catalog_of(cfg), device="cpu")
    before = rec.recommend(["i0", "i6"], k=10)
    after = rec.recommend(["i0", "i6", before[0].item_id], k=10)
    assert [r.item_id for r in after] != [r.item_id for r in before]
    assert before[0].item_id not in [r.item_id for r in after]


def test_reload_swaps_the_model_without_dropping_requests(with_ids, tmp_path: Path) -> None:
    from common.weights import load_model_dir

    model_dir, cfg = with_ids
    catalog = catalog_of(cfg)
    state, meta = load_model_dir(model_dir)
    install(tmp_path, state=state, cfg=cfg, metadata={**meta, "version": "r0001-a"})
    rec = LocalRecommender.installed(tmp_path, catalog=catalog, device="cpu")
    rec.add_items({"fresh-2": "space rocket planet"})
    assert rec.reload() is False  # nothing newer installed

    errors: list[BaseException] = []
    answers: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                answers.append(len(rec.recommend(["i1", "i7"], k=5)))
            except BaseException as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(exc)

    worker = threading.Thread(target=hammer)
    worker.start()
    changed = {k: v * 1.5 for k, v in state.items()}
    install(tmp_path, state=changed, cfg=cfg, metadata={**meta, "version": "r0002-b"})
    assert rec.reload() is True
    stop.set()
    worker.join()
    assert not errors and answers and set(answers) == {5}
    assert rec.metadata["version"] == "r0002-b"
    assert rec.has_item("fresh-2")  # added items survive a reload


def test_int8_keeps_the_ranking_close(with_ids) -> None:
    model_dir, cfg = with_ids
    catalog = catalog_of(cfg)
    fp32 = LocalRecommender.load(model_dir, catalog=catalog, device="cpu")
    int8 = LocalRecommender.load(model_dir, catalog=catalog, device="cpu", quantize="int8")
    history = ["i0", "i6", "i12", "i18"]
    a, b = fp32.recommend(history, k=10), int8.recommend(history, k=10)
    assert len({r.item_id for r in a} & {r.item_id for r in b}) >= 7
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in int8_modules(int8))


def int8_modules(rec: LocalRecommender):
    return list(rec._current().model.modules())


def test_a_model_of_another_catalog_is_refused(with_ids) -> None:
    model_dir, cfg = with_ids
    other = catalog_of(cfg).with_items({"extra": "an extra item"})
    with pytest.raises(ValueError, match="another catalog"):
        LocalRecommender.load(model_dir, catalog=other, device="cpu")


def test_the_recommend_command_prints_a_ranked_list(with_ids, capsys) -> None:
    from client.device import main

    model_dir, cfg = with_ids
    args = ["recommend", "--model", str(model_dir), "--catalog", cfg.data_path]
    assert main([*args, "--history", "i0,i6,i12", "-k", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Model r0001-test") and out[1].split() == [
        "#",
        "item",
        "score",
        "title",
    ]
    assert [line.split()[0] for line in out[2:]] == ["1", "2", "3"]
    expected = LocalRecommender.load(model_dir, catalog=catalog_of(cfg), device="cpu")
    assert [line.split()[1] for line in out[2:]] == [
        r.item_id for r in expected.recommend(["i0", "i6", "i12"], k=3)
    ]
    assert main([*args, "--history", "i0,nope"]) == 2
    assert "Unknown item id(s): 'nope'" in capsys.readouterr().err


def test_onnx_runtime_ranks_like_torch(with_ids) -> None:
    model_dir, cfg = with_ids
    catalog = catalog_of(cfg)
    default = LocalRecommender.load(model_dir, catalog=catalog, device="cpu")
    assert default.runtime == "onnx"  # the CPU default: it measured fastest
    eager = LocalRecommender.load(model_dir, catalog=catalog, device="cpu", runtime="torch")
    histories = [["i0", "i6", "i12"], ["i3"], []]
    answers = default.recommend_batch(histories, k=10), eager.recommend_batch(histories, k=10)
    for a, b in zip(*answers, strict=True):
        assert [r.item_id for r in a] == [r.item_id for r in b]
        assert np.allclose([r.score for r in a], [r.score for r in b], atol=1e-5)
    with pytest.raises(ValueError, match="CPU only"):
        LocalRecommender.load(model_dir, catalog=catalog, quantize="int8", runtime="onnx")
