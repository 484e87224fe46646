"""fedrec-freshness: freshness end to end on a device, through `fedrec-client serve`.

A model trained by the strict cold-item protocol (`fedrec-coldstart`, which keeps its models and
data in outputs/coldstart) knows only the warm items. This harness serves it as a device does,
`fedrec-client serve` in a process of its own over the warm catalog, and over HTTP:

1. adds cold items one at a time (`POST /items`) and measures, for each, the time from the
   request to the first recommendation that contains it, asked for a user whose next
   interaction was that item;
2. adds the rest of the cold items (`POST /items`, up to the service's 100 a request);
3. asks, for every cold interaction of the protocol, the top 100 for the user's warm history
   (`POST /recommend/batch`), and reports where the cold item lands: HR@10 / NDCG@10 among
   every item, to set beside the in-process numbers of the same model (coldstart.json);
4. appends an item to a user's history and asks again: how much of the top 10 changes in the
   very next call, and that the item itself is no longer recommended.

Writes simulations/results/freshness.json and freshness.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.flower.processes import FlowerProcess, free_port
from simulations.cold_protocol import CASES_FILE, COLD_ITEMS, WARM_ITEMS
from simulations.coldstart import COLDSTART_FILE
from simulations.report import RESULTS, markdown_table

RESULT_FILE = "freshness.json"
K = 10
TOP = 100  # the service's largest k: a target further down counts as a miss
BATCH = 64  # the service's largest batch
HISTORY = 200  # the service's longest history (the model reads the last history-len of it)
ITEMS_PER_POST = 100  # the service's largest POST /items

Post = Callable[[str, dict], dict]  # (path, JSON body) -> JSON answer


class Service(FlowerProcess):
    """`fedrec-client serve` in its own process group, ready when /health answers."""

    name = "fedrec-client serve"

    def __init__(self, *, model: Path, catalog: Path, token: str, log_path: Path):
        self.port = free_port()
        self.token = token
        command = [
            sys.executable,
            "-m",
            "client.device",
            "serve",
            "--model",
            str(model),
            "--catalog",
            str(catalog),
            "--port",
            str(self.port),
        ]
        env = {**os.environ, "FEDREC_SERVICE_TOKEN": token, "HF_HUB_OFFLINE": "1"}
        super().__init__(command=command, env=env, log_path=log_path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url("/health"), timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            self.url(path),
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=600) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:  # the service's answer says why
            detail = exc.read().decode(errors="replace")[:500]
            raise RuntimeError(f"POST {path} answered {exc.code}: {detail}") from None


def read_items(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(row["item_id"], row["text"]) for row in csv.DictReader(f)]


def read_cases(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def rank_in(answer: Sequence[str], target: str, seen: set[str]) -> int:
    """1-based rank of `target` in a served list, items seen before dropped; 0 when absent.

    The service leaves out the history it was sent (the warm items); the user's earlier cold
    items are dropped here, so the rank follows the protocol's rule (every earlier item out).
    """
    ranked = [i for i in answer if i not in seen or i == target]
    return ranked.index(target) + 1 if target in ranked else 0


def first_appearance(post: Post, cases: list[dict], items: list[tuple[str, str]]) -> list[dict]:
    """Each item added alone, then asked for a user whose next interaction it was."""
    case_of = {}
    for case in cases:
        case_of.setdefault(case["target"], case)
    rows = []
    for item_id, text in items:
        case = case_of[item_id]
        start = time.perf_counter()
        post("/items", {"items": [{"item_id": item_id, "text": text}]})
        added = time.perf_counter()
        answer = post("/recommend", {"history": case["history"][-HISTORY:], "k": TOP})
        done = time.perf_counter()
        ids = [r["item_id"] for r in answer["items"]]
        rows.append(
            {
                "item_id": item_id,
                "add_s": added - start,
                "to_recommendation_s": done - start,
                "rank": rank_in(ids, item_id, set(case["seen"])),
            }
        )
    return rows


def add_all(post: Post, items: list[tuple[str, str]]) -> list[float]:
    """The items in requests of the service's largest size; seconds per request."""
    seconds = []
    for start in range(0, len(items), ITEMS_PER_POST):
        chunk = items[start : start + ITEMS_PER_POST]
        began = time.perf_counter()
        post("/items", {"items": [{"item_id": i, "text": t} for i, t in chunk]})
        seconds.append(time.perf_counter() - began)
    return seconds


def landing_ranks(post: Post, cases: list[dict]) -> np.ndarray:
    """Each case's served rank of its cold item among every item (0: beyond the top 100)."""
    ranks = []
    for start in range(0, len(cases), BATCH):
        chunk = cases[start : start + BATCH]
        body = {"requests": [{"history": c["history"][-HISTORY:], "k": TOP} for c in chunk]}
        for case, answer in zip(chunk, post("/recommend/batch", body)["results"], strict=True):
            ids = [r["item_id"] for r in answer]
            ranks.append(rank_in(ids, case["target"], set(case["seen"])))
    return np.array(ranks, dtype=np.int64)


def served_metrics(ranks: np.ndarray) -> dict[str, float]:
    """HR@10 / NDCG@10 of served ranks (0 = not in the top 100: a miss)."""
    hit = (ranks >= 1) & (ranks <= K)
    gain = np.where(hit, 1.0 / np.log2(np.maximum(ranks, 1) + 1.0), 0.0)
    return {
        f"hr@{K}": float(hit.mean()),
        f"ndcg@{K}": float(gain.mean()),
        "in_top_100": float((ranks >= 1).mean()),
    }


def history_update(post: Post, cases: list[dict]) -> dict[str, Any]:
    """Ask, append the cold item to the history, ask again: the next call's top 10 changes."""
    overlaps, seconds, still = [], [], 0
    for case in cases:
        history = case["history"][-HISTORY + 1 :]  # room for the appended item
        before = [r["item_id"] for r in post("/recommend", {"history": history, "k": K})["items"]]
        start = time.perf_counter()
        answer = post("/recommend", {"history": [*history, case["target"]], "k": K})
        seconds.append(time.perf_counter() - start)
        after = [r["item_id"] for r in answer["items"]]
        overlaps.append(len(set(before) & set(after)) / K)
        still += case["target"] in after
    return {
        "users": len(cases),
        "top10_kept": float(np.mean(overlaps)),
        "changed_users": float(np.mean([o < 1.0 for o in overlaps])),
        "added_item_recommended": still,
        "call_ms_p50": 1000 * float(np.median(seconds)),
    }


def run(models: Path, model_name: str, *, first: int, users: int, log_dir: Path) -> dict:
    """The whole harness against one served model."""
    import secrets

    cold = read_items(models / COLD_ITEMS)
    cases = read_cases(models / CASES_FILE)
    service = Service(
        model=models / model_name,
        catalog=models / WARM_ITEMS,
        token=secrets.token_urlsafe(24),
        log_path=log_dir / "serve.log",
    )
    began = time.perf_counter()
    with service:
        ready_s = time.perf_counter() - began
        targets = {c["target"] for c in cases}
        asked = [item for item in cold if item[0] in targets][:first]
        firsts = first_appearance(service.post, cases, asked)
        print(f"{len(firsts)} items added one at a time", flush=True)
        rest = [item for item in cold if item not in asked]
        bulk = add_all(service.post, rest)
        print(f"{len(rest)} more items added in {len(bulk)} requests", flush=True)
        ranks = landing_ranks(service.post, cases)
        per_user = {}
        for case in cases:
            per_user.setdefault(case["user"], case)
        update = history_update(service.post, list(per_user.values())[:users])
    return {
        "model": model_name,
        "start_s": ready_s,
        "first_appearance": firsts,
        "to_recommendation_s_p50": float(np.median([f["to_recommendation_s"] for f in firsts])),
        "add_one_s_p50": float(np.median([f["add_s"] for f in firsts])),
        "bulk_items": len(rest),
        "bulk_s_per_item": float(sum(bulk) / max(1, len(rest))),
        "cases": len(cases),
        "landing": served_metrics(ranks),
        "history_update": update,
    }


def markdown(result: dict, protocol: dict | None) -> str:
    land, firsts = result["landing"], result["first_appearance"]
    in_top_k = sum(1 <= f["rank"] <= K for f in firsts)
    in_top = sum(f["rank"] >= 1 for f in firsts)
    lines = [
        f"Model `{result['model']}` served by `fedrec-client serve` over the warm catalog "
        f"(ready in {result['start_s']:.1f} s).",
        "",
        markdown_table(
            ["measure", "value"],
            [
                ["items added one at a time", str(len(result["first_appearance"]))],
                ["POST /items of one item, median", f"{result['add_one_s_p50']:.3f} s"],
                [
                    "POST /items, then the next /recommend ranks it, median",
                    f"{result['to_recommendation_s_p50']:.3f} s",
                ],
                [
                    "of those, in the top 10 / top 100 of a user whose next item it was",
                    f"{in_top_k} / {in_top}",
                ],
                [
                    f"items added 100 a request ({result['bulk_items']})",
                    f"{result['bulk_s_per_item']:.3f} s an item",
                ],
                [
                    f"cold interactions asked ({result['cases']}): HR@10 among all items",
                    f"{land['hr@10']:.4f}",
                ],
                ["  NDCG@10 among all items", f"{land['ndcg@10']:.4f}"],
                ["  cold item in the top 100", f"{land['in_top_100']:.4f}"],
                [
                    f"history + one item, next call ({result['history_update']['users']} users): "
                    "top 10 kept",
                    f"{result['history_update']['top10_kept']:.2f}",
                ],
                [
                    "  users whose top 10 changed",
                    f"{result['history_update']['changed_users']:.2f}",
                ],
                [
                    "  the appended item still recommended",
                    str(result["history_update"]["added_item_recommended"]),
                ],
                ["  /recommend call, median", f"{result['history_update']['call_ms_p50']:.1f} ms"],
            ],
        ),
    ]
    if protocol is not None:
        lines.append(
            f"\nIn-process, the same model (coldstart.json): HR@10 {protocol['hr@10']:.4f}, "
            f"NDCG@10 {protocol['ndcg@10']:.4f} among all items."
        )
    return "\n".join(lines) + "\n"


def protocol_numbers(results: Path, model_name: str) -> dict | None:
    """The in-process 'all' numbers of the same model and seed, if coldstart.json has them."""
    path = results / COLDSTART_FILE
    if not path.exists():
        return None
    name, _, seed = model_name.rpartition("-seed")
    for row in json.loads(path.read_text())["rows"]:
        for run in row.get("per_seed", []):
            if row["name"] == name and str(run["seed"]) == seed:
                return run["all"]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrec-freshness",
        description="Freshness end to end: serve a cold-protocol model with fedrec-client "
        "serve, add the cold items over HTTP, and measure when and where they are recommended.",
        epilog="Needs `fedrec-coldstart` first (its --models directory) and the serve extra.",
    )
    parser.add_argument("--models", type=Path, default=Path("outputs/coldstart"))
    parser.add_argument("--model", default="hybrid-seed42", help="model directory under --models")
    parser.add_argument("--first", type=int, default=20, help="items added one at a time (20)")
    parser.add_argument("--users", type=int, default=200, help="users of the history check")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    if not (args.models / args.model).is_dir():
        parser.error(f"{args.models / args.model} does not exist: run fedrec-coldstart first.")
    result = run(args.models, args.model, first=args.first, users=args.users, log_dir=args.models)
    text = markdown(result, protocol_numbers(args.out, args.model))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "freshness.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
