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
