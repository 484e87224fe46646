"""fedrec-reliability: attacks, faults and abuse, injected and measured.

Writes simulations/results/reliability.json (and reliability.md beside it), one section per
check, each key named so a reader can check it:

- poisoning: a tenth of MovieLens-100K's 943 one-user clients send scaled (x1000) or boosted
  sign-flipped (x-10) updates (client/faults.py); test NDCG@10 of the round the server selects
  on validation, clean / attacked (no bound) / defended (updates over 3 x the median norm
  rejected, the default; or over 5 x clipped), from
  `fedrec-ablation --variants simulations/configs/reliability-poisoning.toml` (variant-sNN:
  seed NN of variant);
- faults: simulated clients that raise, hang past the round timeout or return garbage (5% of
  them); whether every round completed and what the server counted per round;
- control_api: a real server (`fedrec-server run`, TLS, device keys) with one MovieLens user
  as a device; a `flwr` with nothing but ca.crt tries the Control API through the public
  address; whether each attempt was refused and the device still trained;
- service: abuse of `fedrec-client serve`'s HTTP API (served by uvicorn): missing or wrong
  token, a chunked body over the limit, a large invalid body, replacing an item, too many
  items; status, bytes of the answer and time;
- resume: `fedrec-simulate` SIGKILLed (with every process it started) after round 2, then
  resumed with resume = true: rounds in metrics.jsonl, run.log kept, the marker line.

`--only` reruns some sections and keeps the others. About 45 minutes on a 2-core CPU, most of
it the poisoning runs (`--rounds`, default 30, each variant once, seed 42).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.rounds import read_rows
from simulations import report
from simulations.report import CONFIGS, README, RESULTS, ROOT

RESULT = "reliability.json"
POISONING = CONFIGS / "reliability-poisoning.toml"
ATTACKS = {"scale": "x1000", "flip": "sign-flipped x10"}
SEED_SUFFIX = re.compile(r"-s\d+$")  # variant-s43: seed 43 of variant
MARKERS = {"begin": "<!-- results:reliability -->", "end": "<!-- /results:reliability -->"}
SECTIONS = ("poisoning", "faults", "control_api", "service", "resume")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


# --- poisoning ------------------------------------------------------------------------------


def poisoning(*, rounds: int, results: Path, reuse: bool) -> dict[str, Any]:
    """Clean / attacked / defended test NDCG@10 per attack, from the ablation harness."""
    path = results / (POISONING.stem.replace("-", "_") + ".json")
    if not (reuse and path.exists()):
        cmd = [sys.executable, "-m", "simulations.ablation", "--variants", str(POISONING)]
        cmd += ["--rounds", str(rounds), "--results", str(results), "--jobs", "2"]
        subprocess.run(cmd, cwd=ROOT, env=ENV, check=True)
    runs = {r["name"]: r for r in json.loads(path.read_text())}
    # a variant's seeds (name-sNN) together; every variant without attackers (whatever its
    # bound) is the clean reference: none clipped or rejected an update, so their spread is
    # run-to-run noise
    groups: dict[str, list[float]] = {}
    for name, run in runs.items():
        groups.setdefault(SEED_SUFFIX.sub("", name), []).append(run["test_ndcg@10"])
    cleans = [v for name, values in groups.items() if name.startswith("clean") for v in values]
    clean = float(np.mean(cleans))
    out: dict[str, Any] = {
        "rounds": rounds,
        "clients": 943,
        "attacker_share": 0.1,
        "clean_runs_test_ndcg@10": cleans,
        "clean_test_ndcg@10": clean,
        "clean_test_ndcg@10_std": float(np.std(cleans)),
        "variants": {name: _spread(values) for name, values in groups.items()},
        "runs": {n: _run_summary(r) for n, r in runs.items()},
    }
    for attack, what in ATTACKS.items():
        defended = [name for name in groups if name.startswith(f"defended-{attack}")]
        entry = {
            "attack": what,
            "attacked_test_ndcg@10": _spread(groups[f"attacked-{attack}"]),
            "defended_test_ndcg@10": {name: _spread(groups[name]) for name in defended},
        }
        entry["defended_over_clean"] = {
            name: float(np.mean(groups[name])) / clean for name in defended
        }
        entry["defended_within_10_percent_of_clean"] = {
            name: ratio >= 0.9 for name, ratio in entry["defended_over_clean"].items()
        }
        out[attack] = entry
    return out


def _spread(values: list[float]) -> dict[str, float | int]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": len(values)}


def _pm(spread: dict) -> str:
    if spread["runs"] == 1:
        return f"{spread['mean']:.4f} (1 run)"
    return f"{spread['mean']:.4f} ± {spread['std']:.4f} ({spread['runs']} runs)"


def _run_summary(run: dict) -> dict[str, Any]:
    keys = ("overrides", "best_round", "test_ndcg@10", "val_ndcg@10_best", "seconds")
    counts = ("clients_train", "clients_clipped", "clients_rejected", "clients_failed")
    return {**{k: run.get(k) for k in keys}, **{f"{k}_all_rounds": run.get(k) for k in counts}}


# --- faults ---------------------------------------------------------------------------------


def faults(*, work: Path, rounds: int = 3) -> dict[str, Any]:
    """Each fault kind at 5% of the clients: every round completes, failures are counted."""
    import tomllib

    import torch

    from common.config import Config
    from simulations.inprocess import run_inprocess

    torch.set_num_threads(1)
    spec = tomllib.loads((CONFIGS / "bench-fed.toml").read_text())
    out: dict[str, Any] = {"fault_share": 0.05, "rounds": rounds}
    for kind in ("raise", "hang", "garbage"):
        cfg = Config().merged(
            {
                **spec["run"],
                "num-server-rounds": rounds,
                "central-eval": False,
                "fault-share": 0.05,
                "fault-kind": kind,
                "round-timeout-s": 10.0,
                "output-dir": str(work / f"faults-{kind}"),
            }
        )
        start = time.perf_counter()
        run_inprocess(cfg)
        rows = [r for r in read_rows(cfg.output_path / "metrics.jsonl") if r["round"]]
        keys = ("clients_sampled", "clients_train", "clients_failed", "clients_rejected")
        out[kind] = {
            "rounds_completed": len(rows),
            "all_rounds_completed": len(rows) == rounds,
            "per_round": [
                {"round": r["round"], **{k: r.get(k) for k in keys}, **_rejections(r)} for r in rows
            ],
            "seconds": time.perf_counter() - start,
        }
    return out


def _rejections(row: dict) -> dict[str, int]:
    return {k: v for k, v in row.items() if k.startswith("rejected_") and v}


# --- the Control API behind the Fleet gate --------------------------------------------------


def control_api(*, work: Path) -> dict[str, Any]:
    """A `flwr` with only ca.crt, pointed at the public address, against a real server."""
    from common import credentials
    from common.config import Config
    from common.readers import ensure_ml100k
    from simulations.deploy_bench import device_files
    from simulations.loopback import LoopbackFederation

    cache = Config().cache_path
    catalog = ensure_ml100k(cache)
    files = device_files(work / "data", cache_dir=cache, count=1)
    run = {
        "num-server-rounds": 1,
        "min-nodes": 1,
        "cache-dir": str(cache),
        "central-eval": False,
        "push-model": False,
    }
    out: dict[str, Any] = {}
    with LoopbackFederation(work / "fed", catalog=catalog, server_data=None, run_config=run) as fed:
        fed.add_devices(files)
        fed.start_server()
        for name in files:
            fed.start_device(name)
        _, key = credentials.create_device_key(work, "outsider")  # a key nobody registered
        for what, error in fed.probe_control_api(work, key).items():
            out[what] = {"refused": error is not None, "error": error}
        code = fed.wait_server(timeout_s=1200)
        server_out = (fed.root / "server.out").read_text()
        fed.stop()
    rows = fed.rounds()
    out["device_trained"] = code == 0 and any(r.get("clients_train") for r in rows[1:])
    out["gate_log_lines"] = sum("Refused POST /v1/" in line for line in server_out.splitlines())
    out["all_refused"] = all(v["refused"] for k, v in out.items() if isinstance(v, dict))
    return out


# --- the device's HTTP service --------------------------------------------------------------


def service(*, work: Path) -> dict[str, Any]:
    """Abuse cases against `fedrec-client serve`'s app on a real uvicorn: status, size, time."""
    import asyncio

    import httpx
    import torch
    import uvicorn

    from client.recommender import LocalRecommender
    from client.service import Limits, create_service
    from common.config import Config
    from common.flower.processes import free_port
    from common.task import build_model, load_data
    from simulations.latency_bench import save

    torch.manual_seed(0)
    cfg = Config(cache_dir=str(Config().cache_path))
    dataset, _ = load_data(cfg)
    model_dir = save(
        work / "model", build_model(cfg, num_items=len(dataset.catalog)), cfg, dataset.catalog
    )
    rec = LocalRecommender.load(model_dir, catalog=dataset.catalog, state_dir=work / "state")
    token = "reliability-" + "x" * 20
    limits = Limits(total_added_items=150)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_service(rec, limits=limits, token=token), port=port, log_level="error"
        )
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"}
    item = {"item_id": "new-1", "text": "A new space opera. Genres: Sci-Fi"}
    existing = dataset.catalog.item_ids[0]

    sent = [0]

    def chunks(total: int, size: int = 64 * 1024):
        for _ in range(total // size):
            sent[0] += size
            yield b"x" * size

    def items(n: int, start: int) -> dict:
        return {"items": [{"item_id": f"n{start + i}", "text": f"Film {i}"} for i in range(n)]}

    cases = {
        "add_without_token": ("POST", "/items", {"json": {"items": [item]}}),
        "add_with_wrong_token": (
            "POST",
            "/items",
            {"json": {"items": [item]}, "headers": {"Authorization": "Bearer " + "y" * 32}},
        ),
        "reload_without_token": ("POST", "/reload", {}),
        "chunked_body_of_5_MB": ("POST", "/items", {"content": chunks(5 << 20), "headers": auth}),
        "invalid_body_of_500_kB": (
            "POST",
            "/recommend",
            {"json": {"history": ["z" * 100] * 5000}},
        ),
        "replace_an_item_without_asking": (
            "POST",
            "/items",
            {"json": {"items": [{"item_id": existing, "text": "spam"}]}, "headers": auth},
        ),
        "add_101_items_in_one_request": (
            "POST",
            "/items",
            {"json": items(101, 0), "headers": auth},
        ),
        "add_with_token": ("POST", "/items", {"json": {"items": [item]}, "headers": auth}),
        "add_100_items": ("POST", "/items", {"json": items(100, 1000), "headers": auth}),
        "add_past_the_total_cap": ("POST", "/items", {"json": items(100, 2000), "headers": auth}),
    }
    out: dict[str, Any] = {
        "limits": {
            "body_bytes": limits.body_bytes,
            "items": limits.items,
            "total_added_items": limits.total_added_items,
        }
    }
    with httpx.Client(base_url=url, timeout=120) as client:
        for name, (method, path, kwargs) in cases.items():
            start, sent[0] = time.perf_counter(), 0
            try:
                res = client.request(method, path, **kwargs)
                out[name] = {"status": res.status_code, "response_bytes": len(res.content)}
            except httpx.TransportError as exc:  # it answered and stopped reading mid-body
                out[name] = {
                    "status": None,
                    "response_bytes": 0,
                    "closed_while_sending": f"{type(exc).__name__} after {sent[0]} bytes sent",
                }
            out[name]["seconds"] = round(time.perf_counter() - start, 3)
    server.should_exit = True
    thread.join(10)
    # a restart over the same state directory still has the added items
    again = LocalRecommender.load(model_dir, catalog=dataset.catalog, state_dir=work / "state")
    out["added_items_after_restart"] = again.num_items - len(dataset.catalog)
    return out


# --- resume after a kill --------------------------------------------------------------------


def resume(*, work: Path, rounds: int = 4, kill_after: int = 2) -> dict[str, Any]:
    """`fedrec-simulate` SIGKILLed with all it started after round `kill_after`, resumed."""
    import psutil

    from common.flower.processes import ANSI_ESCAPE

    scenario = work / "resume.toml"
    scenario.write_text(
        '[scenario]\nname = "resume"\n\n[run]\ndataset = "ml-100k"\npartition = "iid"\n'
        f"num-partitions = 4\nnum-server-rounds = {rounds}\nfraction-evaluate = 0.0\n"
        "central-eval = false\nlocal-steps = 1\n\n[federation]\nnum-supernodes = 4\n"
        "client-resources-num-cpus = 1\n"
    )
    out_dir = work / "resume-run"
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        "--config",
        str(scenario),
        "--output",
        str(out_dir),
    ]
    first = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        rows = read_rows(metrics) if metrics.exists() else []
        if rows and rows[-1]["round"] >= kill_after:
            break
        if first.poll() is not None:
            raise RuntimeError(f"the run ended (exit {first.returncode}) before round {kill_after}")
        time.sleep(1)
    tree = [first, *(psutil.Process(first.pid).children(recursive=True))]
    for proc in tree:  # the whole server at once, as a power cut would
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    first.wait()
    killed_after = read_rows(metrics)[-1]["round"]
    log_before = (out_dir / "run.log").read_text() if (out_dir / "run.log").exists() else ""
    done = subprocess.run(
        [*cmd, "--run-config", "resume=true"], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    lines = read_rows(metrics)
    log_after = (out_dir / "run.log").read_text()
    return {
        "rounds": rounds,
        "killed_after_round": killed_after,
        "resumed_exit_code": done.returncode,
        "metrics_rounds": [r["round"] for r in lines],
        "every_round_once": [r["round"] for r in lines] == list(range(rounds + 1)),
        # the killed run's log, colour codes removed as they are from every saved log
        "run_log_kept": bool(log_before) and log_after.startswith(ANSI_ESCAPE.sub("", log_before)),
        "run_log_marker": "===== fedrec: resumed as Flower run" in log_after,
    }


# --- report ---------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    lines = []
    if p := result.get("poisoning"):
        lines += [
            f"Poisoning: {p['attacker_share']:.0%} of {p['clients']} one-user clients attack, "
            f"{p['rounds']} rounds, in-process, seed 42 (and 43, 44 for rows of 3 runs); test "
            "NDCG@10 of the round selected on "
            "validation; a variant's seeds as mean ± std. Clean is the mean of every run "
            "without attackers ("
            + ", ".join(f"{v:.4f}" for v in p["clean_runs_test_ndcg@10"])
            + "): none clipped or rejected an update; they differ in seed (and, for runs "
            "before commit 99ce330 seeded it, in the clients Flower drew with Python's "
            "`random`), so their spread is the noise of one run.",
            "",
            "| attack | clean | attacked (no bound) | defended | defended / clean |",
            "| --- | --- | --- | --- | --- |",
        ]
        for attack in ATTACKS:
            e = p[attack]
            for name, value in e["defended_test_ndcg@10"].items():
                lines.append(
                    f"| {e['attack']} | {p['clean_test_ndcg@10']:.4f} "
                    f"± {p['clean_test_ndcg@10_std']:.4f} | {_pm(e['attacked_test_ndcg@10'])} "
                    f"| {_pm(value)}, {_bound(name)} | {e['defended_over_clean'][name]:.2f} |"
                )
        for name, spread in p["variants"].items():
            if name.startswith("clean"):
                seeds = [r for n, r in p["runs"].items() if SEED_SUFFIX.sub("", n) == name]
                rejected = sum(r["clients_rejected_all_rounds"] for r in seeds)
                clipped = sum(r["clients_clipped_all_rounds"] for r in seeds)
                updates = sum(r["clients_train_all_rounds"] for r in seeds) + rejected
                lines.append(
                    f"\nNo attacker, {_bound(name)}: test NDCG@10 {_pm(spread)}; of {updates} "
                    f"honest updates {rejected} rejected and {clipped} clipped."
                )
        lines.append("")
    if f := result.get("faults"):
        lines += [
            f"Faults: {f['fault_share']:.0%} of the clients, {f['rounds']} rounds each.",
            "",
            "| fault | rounds completed | per round: sampled / trained / failed / rejected |",
            "| --- | --- | --- |",
        ]
        for kind in ("raise", "hang", "garbage"):
            e = f[kind]
            per = "; ".join(
                f"{r['clients_sampled']}/{r['clients_train']}/{r['clients_failed']}/"
                f"{r['clients_rejected']}"
                for r in e["per_round"]
            )
            lines.append(f"| {kind} | {e['rounds_completed']} of {f['rounds']} | {per} |")
        lines.append("")
    if c := result.get("control_api"):
        lines += ["| Control API through the public address | refused |", "| --- | --- |"]
        for key in ("list_nodes", "list_runs", "register_node", "submit_run"):
            lines.append(f"| {key.replace('_', ' ')} | {'yes' if c[key]['refused'] else 'NO'} |")
        lines += [f"| the registered device still trained | {c['device_trained']} |", ""]
    if s := result.get("service"):
        lines += ["| service abuse case | status | answer bytes | s |", "| --- | --- | --- | --- |"]
        for key, v in s.items():
            if isinstance(v, dict) and "status" in v:
                status = v["status"] or f"connection closed ({v['closed_while_sending']})"
                lines.append(
                    f"| {key.replace('_', ' ')} | {status} | {v['response_bytes']} "
                    f"| {v['seconds']} |"
                )
        lines += [f"\nAdded items after a restart: {s['added_items_after_restart']}.", ""]
    if r := result.get("resume"):
        lines.append(
            f"Resume: killed after round {r['killed_after_round']}, resumed (exit "
            f"{r['resumed_exit_code']}); metrics rounds {r['metrics_rounds']}; run.log kept: "
            f"{r['run_log_kept']}, marker: {r['run_log_marker']}."
        )
    return "\n".join(lines)


def _bound(name: str) -> str:
    """How a poisoning variant bounds updates, in words (its table in POISONING)."""
    import tomllib

    variant = tomllib.loads(POISONING.read_text())[name]
    return f"{variant['update-norm-action']} over {variant['update-norm-limit']:g} x median norm"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrec-reliability", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="sections to (re)run")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per poisoning run (30)")
    parser.add_argument(
        "--reuse", action="store_true", help="read finished poisoning runs instead of rerunning"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where results go")
    args = parser.parse_args(argv)
    path = args.results / RESULT
    result = json.loads(path.read_text()) if path.exists() else {}
    with tempfile.TemporaryDirectory(prefix="fedrec-reliability-") as tmp:
        work = Path(tmp)
        for section in args.only or SECTIONS:
            print(f"== {section}", flush=True)
            if section == "poisoning":
                result[section] = poisoning(
                    rounds=args.rounds, results=args.results, reuse=args.reuse
                )
            else:
                (work / section).mkdir()
                result[section] = globals()[section](work=work / section)
            result["measured"] = time.strftime("%Y-%m-%d")
            readme = README if args.results == RESULTS else None
            report.write_results(path, result, markdown(result), readme=readme, **MARKERS)
            print(json.dumps(result[section], indent=1)[:2000], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
