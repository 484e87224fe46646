"""The latency benchmark's offline parts: the synthetic catalog and the results table."""

from __future__ import annotations

from simulations import latency_bench


def test_synthetic_catalog_is_deterministic_and_titled() -> None:
    a, b = latency_bench.synthetic_catalog(500), latency_bench.synthetic_catalog(500)
    assert a.fingerprint() == b.fingerprint() and len(a) == 500
    assert all(". Genres: " in text for text in a.texts)


def test_table_has_a_row_per_variant_and_says_when_there_is_no_gpu() -> None:
    row = {
        "catalog": "ml-100k",
        "catalog_items": 1682,
        "device": "cpu",
        "runtime": "onnx",
        "quantize": "none",
        "p50_ms": 0.4,
        "p99_ms": 0.5,
        "batch_p50_ms": 7.0,
        "add_item_ms": 11.0,
        "add_items_per_s": 230.0,
        "index_build_s": 0.2,
        "hr@10": 0.16,
        "ndcg@10": 0.08,
        "peak_rss_mb": 1200.0,
    }
    result = {
        "machine": "x86_64",
        "gpu": "No GPU was available to this run: there are no GPU rows.",
        "rows": [row, {**row, "runtime": "torch", "quantize": "int8", "hr@10": None}],
    }
    lines = latency_bench.markdown(result).splitlines()
    assert "| ONNX Runtime fp32 | 0.40 | 0.50 |" in lines[2]
    assert "PyTorch int8" in lines[3] and "| — |" in lines[3]
    assert lines[-1].endswith("there are no GPU rows.")
