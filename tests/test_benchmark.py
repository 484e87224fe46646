"""The benchmark's result files: seeded rows with mean and spread, the README block regenerated."""

import json

import pytest

from simulations.benchmark import (
    HEADLINE_BEGIN,
    HEADLINE_END,
    MARK_BEGIN,
    MARK_END,
    QUALITY_FILE,
    _row,
    headline_table,
    markdown_table,
    write_results,
)


def runs(*ndcgs):
    return [
        {
            "seed": 42 + i,
            "hr@10": 2 * v,
            "ndcg@10": v,
            "mrr@10": v / 2,
            "val_ndcg@10": v,
            "wall_s": 10.0,
        }
        for i, v in enumerate(ndcgs)
    ]


def test_a_row_is_the_mean_and_sample_std_over_seeds():
    row = _row("fed", runs(0.10, 0.12, 0.11), federated=True, k=0)
    assert row["seeds"] == [42, 43, 44]
    assert row["ndcg@10"] == pytest.approx(0.11)
    assert row["ndcg@10_std"] == pytest.approx(0.01)  # ddof = 1
    assert row["hr@10"] == pytest.approx(0.22) and len(row["per_seed"]) == 3
    single = _row("popularity", [{**runs(0.04)[0], "seed": None}], federated=False, k=None)
    assert single["ndcg@10_std"] is None


def test_results_file_table_and_readme_block(tmp_path):
    rows = [
        _row("popularity", [{**runs(0.0439)[0], "seed": None}], federated=False, k=None),
        {
            **_row("fed-k0", runs(0.10, 0.12, 0.11), federated=True, k=0),
            "rounds": 300,
            "seconds_per_round": 3.0,
            "bytes_per_client_per_round": 990_000,
            "client_peak_rss_mb": 900.0,
            "server_peak_rss_mb": 1200.0,
            "runtime": "flower",
        },
        {
            **_row("fed-dp", runs(0.06), federated=True, k=0),
            "runtime": "in-process",
            "dp_epsilon": 8.0,
            "dp_delta": 1e-5,
            "dp_unit": "user",
        },
    ]
    # as in the repository: the README holds the headline, docs/results.md the whole table
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{HEADLINE_BEGIN}\nold\n{HEADLINE_END}\nend\n")
    (tmp_path / "docs").mkdir()
    results_doc = tmp_path / "docs" / "results.md"
    results_doc.write_text(f"intro\n{MARK_BEGIN}\nold\n{MARK_END}\noutro\n")
    write_results(rows, tmp_path / "results", readme)
    assert json.loads((tmp_path / "results" / QUALITY_FILE).read_text()) == rows
    headline = readme.read_text()
    assert "old" not in headline and headline_table(rows) in headline
    assert "| popularity | — | none | — | 0.0439 |" in headline
    assert "| fed-dp | yes, in-process | user-level ε = 8 | 1 |" in headline
    text = results_doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert markdown_table(rows) in text
    assert "| popularity | no | off | — | — | — | 0.0878 | 0.0439 | 0.0220 |" in text
    assert "| fed-k0 | yes, Flower runtime | off | 0 | 3 | 300 | 0.2200 ± 0.0200 |" in text
    assert "| fed-dp | yes, in-process | ε=8.00, δ=1e-05, user | 0 | 1 |" in text
    assert "| 990,000 | 900 / 1200 | 10 s |" in text


def test_the_ablation_table_shows_each_variants_budget_when_rounds_differ():
    from simulations.ablation import markdown

    def row(name: str, curve: list, clients: int, **overrides) -> dict:
        best = max(v for _, v in curve)
        return {
            "name": name,
            "overrides": overrides,
            "curve": curve,
            "val_ndcg@10_final": curve[-1][1],
            "val_ndcg@10_best": best,
            "clients_train": clients,
        }

    equal = [row("a", [(0, 0.0), (30, 0.05)], 90), row("b", [(0, 0.0), (30, 0.06)], 90)]
    assert "at round 30 |" in markdown(equal, 30).splitlines()[0]
    assert "client updates" not in markdown(equal, 30)
    budget = [equal[0], row("c", [(0, 0.0), (30, 0.07), (60, 0.065)], 90, **{"x": 1})]
    table = markdown(budget, 30)
    assert "at its last round" in table.splitlines()[0]
    assert table.splitlines()[-1] == "| c | x=1 | 0.0650 | 0.0700 (30) | 60 | 90 |"


def completed_run(out, *, ndcg: float, rounds: int) -> None:
    """What a finished seed leaves in its output directory, as the benchmark reads it."""
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"status": "finished:completed"}))
    trained = {"round_s": 0.3, "client_update_s_mean": 0.03, "bytes_per_client": 722_176}
    trained.update(clients_train=5, client_peak_rss_mb=600.0, server_peak_rss_mb=800.0)
    final = {"round": rounds, **trained, "best_val_ndcg10": ndcg + 0.02, "best_round": rounds}
    final.update({"test_hr@10": 2 * ndcg, "test_ndcg@10": ndcg, "test_mrr@10": ndcg / 2})
    lines = [{"round": 0}, {"round": 1, **trained}, final]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (out / "metrics.png").write_bytes(f"curve of {ndcg}".encode())


def test_a_federated_row_is_completed_seed_by_seed_when_its_config_is_unchanged(tmp_path):
    """Seeds run in another session stay in the row when the scenario's run config is the
    same; after a change of config, only the seeds run now count."""
    from simulations.benchmark import federated_row

    scenario = tmp_path / "bench-fed-x.toml"
    spec = '[scenario]\nname = "fed-x"\n[run]\nnum-server-rounds = 7\n{}'
    spec += "[federation]\nnum-supernodes = 3\n"
    scenario.write_text(spec.format(""))
    outputs, results = tmp_path / "outputs", tmp_path / "results"
    for seed, ndcg in ((42, 0.10), (43, 0.12), (44, 0.11)):
        completed_run(outputs / "fed-x" / f"seed-{seed}", ndcg=ndcg, rounds=7)

    def row(seeds, stored=None):
        return federated_row(
            scenario,
            seeds=seeds,
            output_root=outputs,
            results_dir=results,
            reuse=True,
            stored=stored,
        )

    first = json.loads(json.dumps(row([42, 43])))  # as the results file keeps it
    assert (results / "fed-x.png").read_bytes() == b"curve of 0.1"
    (outputs / "fed-x" / "seed-42").rename(tmp_path / "gone")  # another session's outputs
    whole = row([44], stored=first)
    assert whole["seeds"] == [42, 43, 44]
    assert whole["ndcg@10"] == pytest.approx(0.11) and whole["ndcg@10_std"] == pytest.approx(0.01)
    assert whole["per_seed"][:2] == first["per_seed"]
    assert (results / "fed-x.png").read_bytes() == b"curve of 0.1"  # seed 42's curve stays
    scenario.write_text(spec.format("dropout = 0.3\n"))  # another config: nothing is kept
    assert row([44], stored=first)["seeds"] == [44]
