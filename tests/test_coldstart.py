"""The strict cold-item protocol (simulations/cold_protocol.py, run by simulations/coldstart.py)
and the id-only model it compares."""

import json

import numpy as np
import pytest
import torch

from common.backbone import ItemStates
from common.data import Catalog, Dataset, Interactions
from common.metrics import rank_of_target, ranking_metrics
from simulations.cold_protocol import (
    case_metrics,
    cold_split,
    expected_metrics,
    model_scores,
    reference_rows,
)
from simulations.coldstart import kept_rows, markdown
from tests.tiny import HIDDEN, NUM_ITEMS, tiny_setup


def dataset(num_users: int = 6, length: int = 10, seed: int = 0) -> Dataset:
    """Users who each meet `length` distinct items, with shuffled rows and tied timestamps."""
    rng = np.random.default_rng(seed)
    catalog = Catalog(
        tuple(f"i{j}" for j in range(NUM_ITEMS)), tuple(f"item {j}" for j in range(NUM_ITEMS))
    )
    user, item, stamp = [], [], []
    for u in range(num_users):
        user += [u] * length
        item += rng.permutation(NUM_ITEMS)[:length].tolist()
        stamp += (np.arange(length) // 2).tolist()  # pairs share a timestamp: file order decides
    return Dataset(
        catalog,
        Interactions(
            np.array(user),
            np.array(item),
            np.array(stamp),
            tuple(f"u{u}" for u in range(num_users)),
        ),
        "toy",
    )


def test_cold_items_never_reach_training_or_validation_and_every_cold_interaction_is_a_case():
    data = dataset()
    split = cold_split(data, fraction=0.25, seed=3)
    assert split.num_cold == 6 and split.num_warm == NUM_ITEMS - 6
    # the full catalog is a reordering of the original, warm items first, texts kept with ids
    assert sorted(split.full.item_ids) == sorted(data.catalog.item_ids)
    assert split.full.item_ids[: split.num_warm] == split.warm.item_ids
    for item_id, text in zip(split.full.item_ids, split.full.texts, strict=True):
        assert data.catalog.texts[data.catalog.index_of(item_id)] == text
    cold_ids = set(split.full.item_ids[split.num_warm :])
    for u in split.users:
        held = np.r_[u.train, [i for i in (u.valid, u.test) if i >= 0]]
        assert held.max() < split.num_warm  # warm indices only
    cold_rows = sum(data.catalog.item_ids[i] in cold_ids for i in data.interactions.item)
    assert len(split.cases) == cold_rows
    # each case: the user's sequence (file order within a timestamp) before the cold item
    for case in split.cases:
        rows = np.flatnonzero(data.interactions.user == case.user)
        order = rows[np.lexsort((rows, data.interactions.timestamp[rows]))]
        sequence = [
            split.full.index_of(data.catalog.item_ids[i]) for i in data.interactions.item[order]
        ]
        before = sequence[: sequence.index(case.target)]
        assert case.target >= split.num_warm
        assert case.history.tolist() == [i for i in before if i < split.num_warm]
        assert sorted(case.seen.tolist()) == sorted(before)


def test_the_cold_items_depend_on_the_split_seed_alone():
    a, b, c = (cold_split(dataset(), fraction=0.25, seed=s) for s in (3, 3, 4))
    assert a.full.item_ids == b.full.item_ids
    assert a.full.item_ids != c.full.item_ids
    with pytest.raises(ValueError, match="fraction"):
        cold_split(dataset(), fraction=1.0)


def brute_force(greater: int, ties: int, k: int) -> dict[str, float]:
    """The mean of the ranking metrics over every position the tied items can leave the target."""
    ranks = np.array([greater + 1 + place for place in range(ties + 1)])
    return ranking_metrics(ranks, k)


@pytest.mark.parametrize(
    "greater, ties", [(0, 0), (3, 0), (0, 25), (7, 5), (9, 0), (12, 4), (4, 30)]
)
def test_expected_metrics_average_every_order_of_the_tied_items(greater, ties):
    got = expected_metrics(np.array([greater]), np.array([ties]), k=10)
    want = brute_force(greater, ties, 10)
    for name, value in want.items():
        assert got[name][0] == pytest.approx(value, abs=1e-12)


def test_without_ties_the_expected_metrics_are_the_projects_ranking_metrics():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 30))
    targets = rng.integers(0, 30, size=40)
    greater = np.array([np.sum(s > s[t]) for s, t in zip(scores, targets, strict=True)])
    ranks = [rank_of_target(s, t) for s, t in zip(scores, targets, strict=True)]
    got = expected_metrics(greater, np.zeros(40, dtype=np.int64))
    for name, value in ranking_metrics(np.array(ranks)).items():
        assert got[name].mean() == pytest.approx(value)


def test_random_ranking_among_the_cold_items_scores_the_chance_of_a_uniform_order():
    split = cold_split(dataset(), fraction=0.5, seed=1)  # 12 cold items: some cases beyond k
    random, popularity, _ = reference_rows(split)
    # chance: k / candidates, where a case's candidates are the cold items it has not met
    chance = [
        min(10, n) / n
        for n in (split.num_cold - np.count_nonzero(c.seen >= split.num_warm) for c in split.cases)
    ]
    assert random["cold"]["hr@10"] == pytest.approx(np.mean(chance))
    # popularity has no count for any cold item: among them it is random
    assert popularity["cold"] == pytest.approx(random["cold"])


def test_the_popularity_oracle_ranks_by_the_cold_cases_counts_leaving_the_case_out():
    split = cold_split(dataset(num_users=12), fraction=0.5, seed=1)
    *_, oracle = reference_rows(split)
    assert oracle["name"] == "popularity-oracle"
    # by hand: a warm item's training count, a cold item's case count with the case's own left
    # out, ranked with the ties split
    targets = [c.target for c in split.cases]
    train = np.concatenate([u.train for u in split.users]).tolist()
    scores = np.zeros((len(split.cases), len(split.full)))
    for i, case in enumerate(split.cases):
        for j in range(len(split.full)):
            scores[i, j] = train.count(j) + targets.count(j) - (j == case.target)
    for scope in ("cold", "all"):
        want = case_metrics(scores, split, scope)
        assert oracle[scope] == pytest.approx({m: v.mean() for m, v in want.items()})


def test_a_scorer_that_knows_the_target_ranks_it_first_in_both_scopes():
    split = cold_split(dataset(), fraction=0.25, seed=3)
    scores = np.zeros((len(split.cases), len(split.full)))
    for i, case in enumerate(split.cases):
        scores[i, case.target] = 1.0
    for scope in ("cold", "all"):
        assert case_metrics(scores, split, scope)["ndcg@10"] == pytest.approx(
            np.ones(len(split.cases))
        )


def test_rows_are_kept_only_from_a_run_of_the_same_split_and_budget(tmp_path):
    split = {"fraction": 0.1, "split_seed": 0, "cases": 120}
    row = {"name": "hybrid", "seeds": [42]}
    path = tmp_path / "coldstart.json"

    def kept(old: dict, new: dict) -> list[dict]:
        path.write_text(json.dumps({**old, "rows": [row]}))
        return kept_rows(path, new, {"text-only"})

    budget = {"epochs": 12, "patience": 4}
    assert kept({**split, **budget}, {**split, **budget}) == [row]
    assert kept({**split, **budget}, {**split, "epochs": 40, "patience": 4}) == []
    assert kept({**split, **budget}, {**split, **budget, "cases": 121}) == []
    # a file from before budgets were recorded was trained with the defaults
    assert kept(split, {**split, "epochs": 40, "patience": 8}) == [row]
    assert kept(split, {**split, **budget}) == []


def test_only_without_names_computes_the_reference_rows_alone_and_keeps_the_model_rows(
    tmp_path, monkeypatch
):
    """`--only` with no names trains nothing and encodes no text: the reference rows are
    recomputed (a row the file lacks, such as a new reference, is added) and the stored model
    rows of the same split and budget are kept."""
    import common.task
    from simulations.coldstart import main

    data = tmp_path / "shop"
    data.mkdir()
    rng = np.random.default_rng(0)
    (data / "items.csv").write_text(
        "item_id,text\n" + "".join(f"p{j},product {j}\n" for j in range(40))
    )
    rows = [f"u{u},p{j},{t}\n" for u in range(12) for t, j in enumerate(rng.permutation(40)[:15])]
    (data / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "".join(rows))

    def no_encoding(*args, **kwargs):
        raise AssertionError("the reference rows need no item states")

    monkeypatch.setattr(common.task, "item_states", no_encoding)
    argv = ["--data", str(data), "--out", str(tmp_path), "--models", str(tmp_path / "m")]
    argv += ["--epochs", "12", "--patience", "4", "--only"]
    assert main(argv) == 0
    path = tmp_path / "coldstart-shop.json"
    first = json.loads(path.read_text())
    assert [r["name"] for r in first["rows"]] == ["random", "popularity", "popularity-oracle"]
    stored = {**first["rows"][0], "name": "hybrid", "seeds": [42]}
    first["rows"] = [r for r in first["rows"] if r["name"] != "popularity-oracle"] + [stored]
    path.write_text(json.dumps(first))
    assert main(argv) == 0
    second = json.loads(path.read_text())
    names = [r["name"] for r in second["rows"]]
    assert names == ["random", "popularity", "popularity-oracle", "hybrid"]
    assert second["rows"][3] == stored


def test_the_table_names_the_dataset_and_the_training_budget():
    row = {"name": "random", "seeds": [], "cold": {"hr@10": 0.1, "ndcg@10": 0.05}}
    row["all"] = row["cold"]
    result = {"dataset": "ml-latest-small", "items": 9742, "cold_items": 974, "split_seed": 0}
    result.update({"cases": 9783, "users": 600, "epochs": 12, "patience": 4, "rows": [row]})
    first = markdown(result).splitlines()[0]
    assert first.startswith("Dataset ml-latest-small; each run at most 12 epochs")
    assert "after 4 without a better warm validation score" in first


def test_text_scores_new_items_apart_and_the_id_only_model_cannot():
    """Built over the warm items only, a model scores a cold item from its text; the id-only
    model gives every cold item the zero vector, so it ranks them as chance does."""
    split = cold_split(dataset(), fraction=0.25, seed=3)
    states = torch.randn(NUM_ITEMS, HIDDEN, generator=torch.Generator().manual_seed(0))
    items = ItemStates(states, torch.ones(NUM_ITEMS, 1, dtype=torch.bool))
    for text, distinct in ((True, True), (False, False)):
        cfg, _, _, _ = tiny_setup(0, item_text=text)
        from common.model import Recommender

        model = Recommender(cfg, hidden_size=HIDDEN, num_items=split.num_warm, blocks=None)
        scores = model_scores(model, cfg, items, split)
        cold = scores[:, split.num_warm :]
        assert (np.ptp(cold, axis=1) > 0).all() == distinct
        if not distinct:
            random, _, _ = reference_rows(split)
            assert case_metrics(scores, split, "cold")["hr@10"].mean() == pytest.approx(
                random["cold"]["hr@10"]
            )


def test_the_id_only_model_has_no_text_layers_and_needs_ids():
    cfg, model, _, _ = tiny_setup(0, item_text=False)
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "adapter" in n or "proj" in n]
    with pytest.raises(ValueError, match="item-text = false"):
        tiny_setup(0, item_text=False, item_id_embedding=False)
    with pytest.raises(ValueError, match="adapter-k"):
        tiny_setup(1, item_text=False)


def trained_cold_model(tmp_path, tiny_backbone, name: str, *, epochs: int, **changes):
    """A tiny model trained by the protocol on a synthetic dataset (a fifth of its items cold)
    and kept in tmp_path/models/<name> beside the split's files: (cfg, split, items, run)."""
    from common.task import item_states, load_data
    from simulations.cold_protocol import write_split
    from simulations.coldstart import variant_run
    from tests.test_recommender import synthetic_config

    cfg = synthetic_config(tmp_path, tiny_backbone, **changes)
    data, _ = load_data(cfg)
    split = cold_split(data, fraction=0.2, seed=0)
    items = item_states(cfg, split.full)
    write_split(split, tmp_path / "models")
    run = variant_run(
        cfg,
        split,
        items,
        epochs=epochs,
        patience=epochs,
        name=name,
        save_to=tmp_path / "models" / name,
    )
    return cfg, split, items, run


def test_served_cold_items_land_where_the_protocol_ranks_them(tmp_path, tiny_backbone):
    """End to end: a model trained by the protocol is served over the warm catalog, the cold
    items are added over HTTP, and each cold interaction's served rank is its in-process rank
    (the freshness harness's numbers are the protocol's, not another measurement)."""
    from fastapi.testclient import TestClient

    from client.recommender import LocalRecommender
    from client.service import create_service
    from common.readers import load_catalog
    from common.task import build_model
    from common.weights import load_model_dir, load_trainable_state
    from simulations.cold_protocol import CASES_FILE, COLD_ITEMS, WARM_ITEMS
    from simulations.freshness import (
        TOP,
        add_all,
        first_appearance,
        history_update,
        landing_ranks,
        read_cases,
        read_items,
    )

    cfg, split, items, run = trained_cold_model(tmp_path, tiny_backbone, "hybrid-seed42", epochs=2)
    models = tmp_path / "models"
    assert set(run) >= {"cold", "all", "val_ndcg@10"}

    model = build_model(cfg, num_items=split.num_warm)
    load_trainable_state(model, load_model_dir(models / "hybrid-seed42")[0])
    scores = model_scores(model, cfg, items, split)
    expected = []
    for i, case in enumerate(split.cases):
        others = np.delete(scores[i], np.r_[case.seen, case.target].astype(np.int64))
        rank = 1 + int(np.count_nonzero(others > scores[i, case.target]))
        expected.append(rank if rank <= TOP else 0)

    token = "test-token-0123456789"
    rec = LocalRecommender.load(
        models / "hybrid-seed42",
        catalog=load_catalog(models / WARM_ITEMS),
        device="cpu",
        runtime="torch",
    )
    client = TestClient(create_service(rec, token=token))

    def post(path: str, body: dict) -> dict:
        answer = client.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
        return answer.json()

    cold, cases = read_items(models / COLD_ITEMS), read_cases(models / CASES_FILE)
    assert len(cases) == len(split.cases)
    targets = {c["target"] for c in cases}
    first = [item for item in cold if item[0] in targets][:2]
    firsts = first_appearance(post, cases, first)
    assert [f["item_id"] for f in firsts] == [i for i, _ in first]
    add_all(post, [item for item in cold if item not in first])
    assert client.get("/health").json()["items"] == len(split.full)
    assert landing_ranks(post, cases).tolist() == expected
    update = history_update(post, cases[:5])
    assert update["users"] == 5 and update["added_item_recommended"] == 0


def test_a_cold_start_model_with_lora_is_kept_as_a_servable_model_dir(tmp_path, tiny_backbone):
    """The text-only-k1 row's models (LoRA in the top block) are saved with what peft needs to
    name their layers, and load back into the model they were scored as."""
    from client.recommender import LocalRecommender
    from common.readers import load_catalog
    from common.task import build_model
    from common.weights import load_model_dir, load_trainable_state
    from simulations.cold_protocol import WARM_ITEMS, scoped

    cfg, split, items, run = trained_cold_model(
        tmp_path, tiny_backbone, "k1", epochs=1, adapter_k=1, item_id_embedding=False
    )
    models = tmp_path / "models"
    state, meta = load_model_dir(models / "k1")
    assert meta["backbone_layers"] >= 1 and any("lora" in name for name in state)
    model = build_model(cfg, num_items=split.num_warm)
    load_trainable_state(model, state)
    scores = model_scores(model, cfg, items, split)
    assert scoped(scores, split)["cold"] == pytest.approx(run["cold"])
    rec = LocalRecommender.load(
        models / "k1", catalog=load_catalog(models / WARM_ITEMS), device="cpu", runtime="torch"
    )
    assert rec is not None


def test_an_ensemble_row_ranks_by_its_members_standardized_scores_averaged(tmp_path, tiny_backbone):
    """ensemble_run trains each member as variant_run does (same seed, same result) and scores
    the cases by the mean of their per-case standardized scores."""
    from simulations.cold_protocol import scoped, standardized
    from simulations.coldstart import ensemble_run, trained

    cfg, split, items, run = trained_cold_model(
        tmp_path, tiny_backbone, "text", epochs=2, item_id_embedding=False
    )
    members = {"text": cfg, "hybrid": cfg.replace(item_id_embedding=True)}
    got = ensemble_run(members, split, {cfg.adapter_k: items}, epochs=2, patience=2, name="ens")
    assert got["members"]["text"]["val_ndcg@10"] == pytest.approx(run["val_ndcg@10"])
    scores = []
    for member in members.values():
        model, _ = trained(member, split, items, epochs=2, patience=2, name="again")
        scores.append(model_scores(model, member, items, split))
    for s in scores:  # standardized: mean 0 and standard deviation 1 in every case
        assert np.allclose(standardized(s).mean(axis=1), 0.0)
        assert np.allclose(standardized(s).std(axis=1), 1.0)
    want = scoped((standardized(scores[0]) + standardized(scores[1])) / 2, split)
    for scope in ("cold", "all"):
        assert got[scope] == pytest.approx(want[scope])
