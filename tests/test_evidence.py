"""fedrec-report: REPORT.md and its plots, from result files alone."""

import json
from pathlib import Path

import pytest

from simulations import evidence


def quality_rows() -> list[dict]:
    def row(name, ndcg, *, federated, seeds, eps=None, best=None, per_client=None):
        per_seed = [
            {"seed": s, "ndcg@10": ndcg, "hr@10": 2 * ndcg, "best_round": best} for s in seeds
        ]
        return {
            "name": name,
            "federated": federated,
            "runtime": "flower" if federated else None,
            "ndcg@10": ndcg,
            "ndcg@10_std": 0.001 if len(seeds) > 1 else None,
            "hr@10": 2 * ndcg,
            "hr@10_std": 0.002 if len(seeds) > 1 else None,
            "val_ndcg@10": ndcg + 0.02,
            "dp_epsilon": eps,
            "dp_delta": 1e-5 if eps else None,
            "dp_unit": "user" if eps else None,
            "bytes_per_client_per_round": per_client,
            "clients_per_round": 10.0 if federated else None,
            "per_seed": per_seed,
        }

    return [
        row("popularity", 0.04, federated=False, seeds=[None]),
        row("central-k0", 0.10, federated=False, seeds=[42, 43, 44]),
        row("fed-k0", 0.09, federated=True, seeds=[42, 43], best=20, per_client=800_000.0),
        row("fed-k0-dp-eps8", 0.05, federated=True, seeds=[42], eps=8.0, best=10, per_client=1e5),
    ]


def write_results(directory: Path) -> None:
    (directory / evidence.QUALITY).write_text(json.dumps(quality_rows()))
    lines = [
        {"round": r, "bytes_down": 100, "bytes_up": 50, "val_ndcg@10": r / 100} for r in (0, 10, 20)
    ]
    (directory / "fed-k0.metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))


def test_the_report_is_written_from_the_result_files(tmp_path: Path) -> None:
    write_results(tmp_path)
    text = evidence.write_report(tmp_path).read_text()
    assert "| fed-k0 | flower | 2 | 0.0900 ± 0.0010 | 0.1800 ± 0.0020 |" in text
    # bytes to the selected round: 800,000 a client x 10 clients x round 20
    assert "| fed-k0 | 800,000 | 10 | 20 | 0.16 GB |" in text
    assert "| 8.00 | 1e-05 | user | fed-k0-dp-eps8 | 1 | 0.0500 |" in text
    assert "| ∞ (no DP) | — | — | fed-k0 | 2 | 0.0900 ± 0.0010 |" in text
    assert "run `fedrec-coldstart`" in text and "run `fedrec-freshness`" in text
    assert "run `fedrec-paired`" in text
    assert "No GPU was measured" in text
    for name in ("rounds", "privacy", "bytes"):
        assert (tmp_path / evidence.PLOTS[name]).stat().st_size > 1000
    assert not (tmp_path / evidence.PLOTS["coldstart"]).exists()  # no coldstart.json


def test_runs_on_other_data_get_a_section_from_their_result_files(tmp_path: Path) -> None:
    assert "Not measured yet: `fedrec-coldstart --data PATH`" in evidence.other_data_section(
        tmp_path
    )
    row = {"name": "random", "seeds": [], "cold": {"hr@10": 0.01, "ndcg@10": 0.005}}
    cold = {"dataset": "ml-latest-small", "items": 9742, "cold_items": 974, "split_seed": 0}
    cold.update({"cases": 9783, "users": 600, "rows": [{**row, "all": row["cold"]}]})
    (tmp_path / "coldstart-ml-latest-small.json").write_text(json.dumps(cold))
    final = {"round": 1000, "best_round": 900, "best_val_ndcg10": 0.05, "test_ndcg@10": 0.04}
    final.update({"test_hr@10": 0.08, "bytes_per_client": 722176.0, "elapsed_s": 1234.5})
    lines = [{"round": 0, "popularity_val_ndcg@10": 0.02}, {"clients_rejected": 2}, final]
    (tmp_path / "ml-latest-small.metrics.jsonl").write_text("\n".join(map(json.dumps, lines)))
    text = evidence.other_data_section(tmp_path)
    assert "(coldstart-ml-latest-small.json):\n\nDataset ml-latest-small." in text
    # the scenario that reads its data from a path: simulations/configs/ml-latest-small.toml
    expected = "| ml-latest-small (ml-latest-small.toml) | 610 | 1000 | 0.0200 | 0.0500 (round 900)"
    assert expected + " | 0.0400 | 0.0800 | 722,176 | 2 | 1,234 |" in text


def test_the_backbone_counterfactual_counts_the_bundled_weights() -> None:
    params, size = evidence.backbone_bytes()
    assert 22_000_000 < params < 23_000_000  # all-MiniLM-L6-v2
    assert size == 2 * params


def test_the_paired_bootstrap_matches_the_normal_approximation() -> None:
    import numpy as np

    from simulations.paired import bootstrap

    rng = np.random.default_rng(1)
    diff = rng.normal(0.01, 0.1, size=2000)
    got = bootstrap(diff, resamples=4000)
    half = 1.96 * diff.std() / np.sqrt(len(diff))
    assert got["mean"] == diff.mean()
    assert got["ci95"][0] == pytest.approx(diff.mean() - half, abs=0.15 * half)
    assert got["ci95"][1] == pytest.approx(diff.mean() + half, abs=0.15 * half)
    # a constant difference has no spread; a centred one sits at or below zero half the time
    assert bootstrap(np.full(50, 0.02), resamples=200)["ci95"] == pytest.approx([0.02, 0.02])
    assert bootstrap(np.full(50, 0.02), resamples=200)["share_at_or_below_zero"] == 0.0
    centred = bootstrap(diff - diff.mean(), resamples=4000)["share_at_or_below_zero"]
    assert 0.45 < centred < 0.55


def test_the_paired_table_and_section_name_the_row_that_was_tested() -> None:
    from simulations.paired import markdown

    pair = {"mean": 0.006, "ci95": [-0.004, 0.016], "share_at_or_below_zero": 0.12, "users": 943}
    result = {
        "headline": "fed-k0-text-central",
        "seeds": [42, 43, 44],
        "baseline_seeds": [42],
        "fed-k0-text-central": {
            "ndcg@10": 0.1027,
            "rescored": [{"seed": 42, "reported": 0.0985, "rescored": 0.0985}],
        },
        "central-id-only": {"ndcg@10": 0.0969, "ndcg@10_std": None},
        "comparisons": {"central-id-only": {"baseline_ndcg@10": 0.0969, **pair}},
    }
    assert "| fed-k0-text-central − central-id-only | 0.1027 | 0.0969 | +0.0060 |" in markdown(
        result
    )
    section = evidence.paired_section(result)
    assert "The headline federated row (fed-k0-text-central: each seed's" in section
    assert "rescored per user: 0.0985" in section


def test_per_user_ndcg_averages_to_the_ranking_metric() -> None:
    import numpy as np

    from common.metrics import ranking_metrics
    from simulations.paired import ndcg_per_user

    ranks = np.array([1, 2, 10, 11, 500, 3])
    assert ndcg_per_user(ranks).mean() == pytest.approx(ranking_metrics(ranks)["ndcg@10"])


def test_local_only_trains_each_user_alone_from_one_start(tmp_path: Path, tiny_backbone) -> None:
    """Checkpoints continue one run; every user restarts from the same initial weights."""
    import numpy as np

    from common.task import build_model, item_states, load_data
    from common.weights import trainable_state
    from simulations.local import EPOCHS, local_runs, run_seed, select
    from tests.test_recommender import synthetic_config

    cfg = synthetic_config(tmp_path, tiny_backbone, num_users=6)
    data, splits = load_data(cfg)
    users, items = list(splits), item_states(cfg, data.catalog)
    model = build_model(cfg, num_items=len(data.catalog))
    init = trainable_state(model)
    assert list(local_runs(cfg, users[0], items, model, init, 4)) == [1, 2, 4]
    after_first = trainable_state(model)
    list(local_runs(cfg, users[1], items, model, init, 1))
    list(local_runs(cfg, users[0], items, model, init, 4))  # the same user again: same weights
    for name, value in trainable_state(model).items():
        assert np.array_equal(value, after_first[name]), name
    best, grid = select(cfg, users, items, len(data.catalog))
    assert len(grid) == 2 * len(EPOCHS) and best == max(grid, key=lambda g: g["val_ndcg@10"])
    run = run_seed(cfg, users, items, len(data.catalog), 2)
    assert run["users"] == len(users) and 0.0 <= run["ndcg@10"] <= run["hr@10"] <= 1.0


def test_paired_names_a_missing_model_or_seed_before_loading_any_data(tmp_path) -> None:
    """By default every seed the row has is paired; one without a saved model, or one the
    row does not have, stops the run at once with a sentence that says what to do."""
    from simulations.paired import main

    row = {"name": "fed-x", "adapter_k": 0, "per_seed": [{"seed": 7, "ndcg@10": 0.1}]}
    (tmp_path / "quality_ml100k.json").write_text(json.dumps([row]))
    common = ["--row", "fed-x", "--out", str(tmp_path), "--outputs", str(tmp_path / "runs")]
    with pytest.raises(SystemExit, match=r"fed-x seed 7: no saved model in .*seed-7.* --seeds 7"):
        main(common)
    with pytest.raises(SystemExit, match=r"fed-x has no seed 8 in quality_ml100k.json: \[7\]"):
        main([*common, "--seeds", "8"])
