"""The benchmark's result files: rows as the issue specifies, the README block regenerated."""

import json

from simulations.benchmark import MARK_BEGIN, MARK_END, QUALITY_FILE, markdown_table, write_results

ROWS = [
    {
        "name": "popularity",
        "federated": False,
        "dp_epsilon": None,
        "split": "test",
        "hr@10": 0.0859,
        "ndcg@10": 0.0439,
        "mrr@10": 0.0313,
        "rounds": None,
        "adapter_k": None,
        "wall_s": 0.2,
    },
    {
        "name": "fed-k0-dp",
        "federated": True,
        "dp_epsilon": 7.99,
        "dp_delta": 1e-5,
        "split": "test",
        "hr@10": 0.05,
        "ndcg@10": 0.025,
        "mrr@10": 0.02,
        "rounds": 30,
        "adapter_k": 0,
        "wall_s": 900.0,
        "seconds_per_round": 30.0,
        "seconds_per_client_update": 0.6,
        "bytes_per_client_per_round": 1_426_000,
        "client_peak_rss_mb": 900.0,
        "server_peak_rss_mb": 1200.0,
    },
]


def test_results_file_table_and_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{MARK_BEGIN}\nold\n{MARK_END}\noutro\n")
    write_results(ROWS, tmp_path / "results", readme)
    rows = json.loads((tmp_path / "results" / QUALITY_FILE).read_text())
    assert rows == ROWS
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert markdown_table(ROWS) in text
    assert "| fed-k0-dp | yes | ε=7.99, δ=1e-05 | 0 | 30 | 0.0500 | 0.0250 |" in text
    assert "| 1,426,000 | 900 / 1200 | 900 s |" in text
