"""fedrec-latency-benchmark: how fast a device recommends, and how fresh it stays.

For the MovieLens-100K catalog (a model trained here for one epoch, or --model) and a
synthetic 100,000-item catalog (random weights: latency does not depend on them), on CPU, and
on the GPU when one is available:

- p50 / p99 latency of one request with a 50-item history, and of batches of 32;
- index build time (item vectors from the cached frozen-backbone states) and the one-time
  frozen-cache build;
- add-item latency (one new item, from call to recommendable) and add-items throughput;
- peak resident memory of the process (each catalog runs in a process of its own);
- for MovieLens-100K, NDCG@10 / HR@10 on the test split (full ranking, seen items excluded)
  for each variant of the user tower: ONNX Runtime (fp32, the CPU default), PyTorch fp32 and
  PyTorch with dynamic int8, to show what each costs.

Writes simulations/results/latency.json (one row per catalog, device and variant) and
latency.md, and the docs/serving.md block between <!-- results:latency --> markers.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.config import Config
from common.data import Catalog
from common.metrics import peak_rss_mb
from simulations import report

if TYPE_CHECKING:
    from client.recommender import LocalRecommender

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
RESULT_FILE = "latency.json"
MARK_BEGIN, MARK_END = "<!-- results:latency -->", "<!-- /results:latency -->"
HISTORY = 50
BATCH = 32
WORDS = (
    "space",
    "love",
    "crime",
    "horse",
    "music",
    "war",
    "night",
    "city",
    "river",
    "king",
    "queen",
    "ghost",
    "robot",
    "island",
    "winter",
    "summer",
    "dragon",
    "secret",
    "lost",
    "last",
    "first",
    "return",
    "journey",
    "storm",
    "fire",
    "ocean",
    "desert",
    "road",
    "dream",
    "heart",
    "shadow",
    "star",
    "planet",
    "empire",
    "rebel",
    "detective",
    "doctor",
    "family",
    "school",
    "garden",
    "machine",
)


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000.0, q))


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def synthetic_catalog(n: int, seed: int = 0) -> Catalog:
    rng = random.Random(seed)
    texts = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))).capitalize()
        + f" ({1950 + rng.randrange(70)}). Genres: {rng.choice(WORDS).title()}"
        for _ in range(n)
    ]
    return Catalog(tuple(f"s{i}" for i in range(n)), tuple(texts))


def ml100k_model(work: Path, cfg: Config, epochs: int) -> tuple[Path, Catalog, list, str]:
    """A model trained centrally on ML-100K's train split; its directory and test cases."""
    from common.task import build_model, item_states, load_data, train_records
    from common.train import train

    dataset, splits = load_data(cfg)
    splits = list(splits)
    model = build_model(cfg, num_items=len(dataset.catalog))
    items = item_states(cfg, dataset.catalog)
    start = time.perf_counter()
    train(
        model=model,
        cfg=cfg,
        records=train_records(cfg, splits),
        items=items,
        epochs=epochs,
        seed=cfg.seed,
    )
    seconds = time.perf_counter() - start
    note = f"trained here: {epochs} epoch(s) on the train split, {seconds:.0f} s"
    return save(work / "ml100k-model", model, cfg, dataset.catalog), dataset.catalog, splits, note


def save(path: Path, model, cfg: Config, catalog: Catalog) -> Path:
    """A model directory the recommender accepts for this catalog."""
    from common.weights import save_model_dir, trainable_state

    metadata = {
        "version": "latency-bench",
        "catalog_sha256": catalog.fingerprint(),
        "catalog_items": len(catalog),
    }
    return save_model_dir(path, state=trainable_state(model), cfg=cfg, metadata=metadata)


def ranking_quality(rec: LocalRecommender, catalog: Catalog, splits: list) -> dict[str, float]:
    """HR@10 and NDCG@10 on the test split: history = train + valid, seen items excluded."""
    cases = [
        ([catalog.item_ids[i] for i in [*u.train, u.valid] if i >= 0], catalog.item_ids[u.test])
        for u in splits
        if u.test >= 0
    ]
    hits, gains = [], []
    for start in range(0, len(cases), 256):
        chunk = cases[start : start + 256]
        answers = rec.recommend_batch([h for h, _ in chunk], k=10)
        for (_, target), answer in zip(chunk, answers, strict=True):
            ids = [r.item_id for r in answer]
            rank = ids.index(target) if target in ids else None
            hits.append(rank is not None)
            gains.append(0.0 if rank is None else 1.0 / np.log2(rank + 2.0))
    return {"hr@10": float(np.mean(hits)), "ndcg@10": float(np.mean(gains))}


def measure(rec: LocalRecommender, histories: list[list[str]], repeat: int) -> dict[str, float]:
    """Latency of single requests and batches, and of adding items."""
    rng = random.Random(1)
    for h in histories[:50]:  # warm-up
        rec.recommend(h, 10)
    single = timed(lambda: rec.recommend(rng.choice(histories), 10), repeat)
    batches = [histories[i : i + BATCH] for i in range(0, len(histories) - BATCH, BATCH)]
    batch = timed(lambda: rec.recommend_batch(rng.choice(batches), 10), max(50, repeat // 20))
    counter = iter(range(10**9))

    def add_one() -> None:
        n = next(counter)
        rec.add_items({f"new-{n}": f"A brand new {rng.choice(WORDS)} story number {n}"})

    add = timed(add_one, 50)
    many = {f"bulk-{n}": f"Bulk item {n} about {rng.choice(WORDS)}" for n in range(1000)}
    start = time.perf_counter()
    rec.add_items(many)
    bulk_s = time.perf_counter() - start
    return {
        "p50_ms": percentile_ms(single, 50),
        "p99_ms": percentile_ms(single, 99),
        "batch_size": BATCH,
        "batch_p50_ms": percentile_ms(batch, 50),
        "batch_p99_ms": percentile_ms(batch, 99),
        "add_item_ms": percentile_ms(add, 50),
        "add_item_p99_ms": percentile_ms(add, 99),
        "add_items_per_s": len(many) / bulk_s,
    }


def run_catalog(name: str, work: Path, *, device: str, repeat: int, epochs: int) -> list[dict]:
    """Every row for one catalog on one device (run in a process of its own)."""
    import torch

    from client.recommender import LocalRecommender
    from common.task import build_model, item_states

    cfg = Config(cache_dir=str(Config().cache_path))
    splits, note = None, "random weights (latency does not depend on them)"
    cache_s = 0.0
    if name == "ml-100k":
        model_dir, catalog, splits, note = ml100k_model(work, cfg, epochs)
    else:
        catalog = synthetic_catalog(100_000)
        torch.manual_seed(0)
        cfg = cfg.replace(cache_dir=str(work / "cache"))  # a fresh cache: its build is timed
        start = time.perf_counter()
        item_states(cfg, catalog)  # the one-time frozen-backbone cache of the catalog
        cache_s = time.perf_counter() - start
        model = build_model(cfg, num_items=len(catalog))
        model_dir = save(work / "synthetic-model", model, cfg, catalog)
    rng = random.Random(0)
    if splits is not None:  # real histories: each user's last 50 training items
        histories = [[catalog.item_ids[i] for i in u.train[-HISTORY:]] for u in splits]
        histories = [h for h in histories if len(h) == HISTORY] or histories
    else:
        histories = [rng.sample(catalog.item_ids, HISTORY) for _ in range(1000)]
    rows = []
    variants = [("onnx", "none"), ("torch", "none"), ("torch", "int8")]
    for runtime, quantize in variants if device == "cpu" else [("torch", "none")]:
        start = time.perf_counter()
        rec = LocalRecommender.load(
            model_dir, catalog=catalog, device=device, quantize=quantize, runtime=runtime
        )
        build_s = time.perf_counter() - start
        row = {
            "catalog": name,
            "catalog_items": len(catalog),
            "device": device,
            "runtime": runtime,
            "quantize": quantize,
            "model": note,
            "index_build_s": build_s,
            "frozen_cache_build_s": cache_s or None,
            "threads": torch.get_num_threads(),
        }
        if splits is not None:
            row.update(ranking_quality(rec, catalog, splits))
        row.update(measure(rec, histories, repeat))
        row["peak_rss_mb"] = peak_rss_mb()
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [
        "| catalog | items | device | user tower | p50 ms | p99 ms | batch of 32: p50 ms | "
        "add item ms | adds/s | index build s | HR@10 | NDCG@10 | peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        quality = [f"{r[k]:.4f}" if r.get(k) is not None else "—" for k in ("hr@10", "ndcg@10")]
        lines.append(
            f"| {r['catalog']} | {r['catalog_items']:,} | {r['device']} | "
            f"{_variant(r)} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['batch_p50_ms']:.2f} | {r['add_item_ms']:.1f} | "
            f"{r['add_items_per_s']:,.0f} | {r['index_build_s']:.2f} | {quality[0]} | "
            f"{quality[1]} | {r['peak_rss_mb']:.0f} |"
        )
    lines += ["", result["machine"] + ". " + result["gpu"]]
    return "\n".join(lines)


def _variant(row: dict) -> str:
    runtime = {"onnx": "ONNX Runtime", "torch": "PyTorch"}[row["runtime"]]
    return f"{runtime} {'fp32' if row['quantize'] == 'none' else row['quantize']}"


def write(result: dict) -> None:
    report.write_results(
        RESULTS_DIR / RESULT_FILE,
        result,
        markdown(result),
        readme=README,
        begin=MARK_BEGIN,
        end=MARK_END,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrec-latency-benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeat", type=int, default=2000, help="single requests timed")
    parser.add_argument("--epochs", type=int, default=1, help="ML-100K training epochs")
    parser.add_argument("--catalogs", default="ml-100k,synthetic-100k", help="which catalogs")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table only")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one catalog, one process
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table_only:
        write(json.loads((RESULTS_DIR / RESULT_FILE).read_text()))
        return 0
    if args.one:
        with tempfile.TemporaryDirectory() as work:
            rows = run_catalog(
                args.one, Path(work), device=args.device, repeat=args.repeat, epochs=args.epochs
            )
        print(json.dumps(rows))
        return 0
    import torch  # after the arguments: --help answers at once

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for catalog in args.catalogs.split(","):
        for device in devices:
            command = [sys.executable, "-m", "simulations.latency_bench", "--one", catalog]
            command += ["--device", device, "--repeat", str(args.repeat)]
            command += ["--epochs", str(args.epochs)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            rows.extend(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
        "gpu": (
            "GPU rows measured on " + torch.cuda.get_device_name(0)
            if torch.cuda.is_available()
            else "No GPU was available to this run: there are no GPU rows."
        ),
        "history_len": HISTORY,
        "rows": rows,
    }
    write(result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
