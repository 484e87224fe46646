"""fedrec-deploy-benchmark: what a device pays in a real deployment, measured on loopback.

Runs fedrec-server and one fedrec-client per device as real processes (TLS, device keys,
SuperLink, SuperNodes; simulations/loopback.py) with the bundled MiniLM backbone and
MovieLens-100K users as devices, each holding one user's interactions. It measures:

- where a round's client time goes (process start-up and imports, data and cache load, model
  load, training, reply), in the first round (the frozen-backbone cache is built) and after;
- each device's memory: the peak resident memory of its SuperNode process group (SuperNode,
  SuperExec and the ClientApp of the moment), sampled every 0.2 s, and the ClientApp's own peak;
- each device's disk: state directory (cache, installed model, ledger) and the app bundle.

Writes simulations/results/deploy.json and deploy.md, and the docs/deploying.md block between
<!-- results:deploy --> markers.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import site
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from client.device import disk_bytes
from common.config import Config
from common.readers import ensure_ml100k, load_dataset
from simulations import report
from simulations.loopback import LoopbackFederation

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
RESULT_FILE = "deploy.json"
MARK_BEGIN, MARK_END = "<!-- results:deploy -->", "<!-- /results:deploy -->"
TIMES = ("startup_s", "cache_load_s", "model_load_s", "train_s", "reply_s")


def device_files(out: Path, *, cache_dir: Path, count: int) -> dict[str, Path]:
    """One CSV per device: the interactions of a user of median history length."""
    data = load_dataset(dataset="ml-100k", cache_dir=cache_dir)
    inter = data.interactions
    counts = np.bincount(inter.user)
    order = np.argsort(np.abs(counts - np.median(counts)), kind="stable")[:count]
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for k, user in enumerate(order):
        path = out / f"device-{k}.csv"
        rows = np.flatnonzero(inter.user == user)
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["user_id", "item_id", "timestamp"])
            for r in rows:
                item = data.catalog.item_ids[inter.item[r]]
                writer.writerow([f"u{user}", item, inter.timestamp[r].item()])
        files[f"device-{k}"] = path
    return files


class GroupMemory(threading.Thread):
    """Peak summed RSS of the processes in some process groups, sampled in the background."""

    def __init__(self, groups: dict[str, int], period_s: float = 0.2):
        super().__init__(daemon=True)
        self.groups, self.period_s = groups, period_s
        self.peak_mb = dict.fromkeys(groups, 0.0)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            totals = dict.fromkeys(self.groups, 0.0)
            by_group = {g: name for name, g in self.groups.items()}
            for proc in psutil.process_iter(["pid"]):
                try:
                    name = by_group.get(psutil.os.getpgid(proc.pid))
                    if name is not None:
                        totals[name] += proc.memory_info().rss / 2**20
                except (psutil.Error, ProcessLookupError, OSError):
                    continue
            for name, total in totals.items():
                self.peak_mb[name] = max(self.peak_mb[name], total)
            self.done.wait(self.period_s)


def run_benchmark(work: Path, *, devices: int, rounds: int) -> dict:
    cache_dir = Config().cache_path
    catalog = ensure_ml100k(cache_dir)
    files = device_files(work / "data", cache_dir=cache_dir, count=devices)
    run_config = {
        "num-server-rounds": rounds,
        "min-nodes": devices,
        # DP off: a private device reports no timings (they reveal how much data it holds)
        "dp-mode": "off",
        "num-negatives": 64,  # the sampled softmax a DP-SGD device would use
        "cache-dir": str(cache_dir),
        "central-eval": False,
        "push-model": True,
    }
    started = time.perf_counter()
    with LoopbackFederation(
        work / "fed", catalog=catalog, server_data=None, run_config=run_config
    ) as fed:
        fed.add_devices(files)
        fed.start_server()
        for name in files:
            fed.start_device(name)
        groups = {name: fed.supernode_pid(name) for name in files}
        memory = GroupMemory(groups)
        memory.start()
        code = fed.wait_server(timeout_s=3600)
        memory.done.set()
        memory.join()
        fed.stop()
        if code != 0:
            raise RuntimeError(
                f"fedrec-server exited {code}:\n{(fed.root / 'server.out').read_text()}"
            )
    wall_s = time.perf_counter() - started

    rows = [r for r in fed.rounds() if r.get("round", 0) > 0]
    per_round = [
        {
            "round": r["round"],
            "round_s": r["round_s"],
            "clients_train": r["clients_train"],
            "client_update_s": r.get("client_update_s_mean"),
            **{t: r.get(f"client_{t}") for t in TIMES},
            "client_peak_rss_mb": r.get("client_peak_rss_mb"),
        }
        for r in rows
    ]
    device_rows = []
    for name, device in fed.devices.items():
        state = device.state_dir
        device_rows.append(
            {
                "device": name,
                "interactions": len(device.data.read_text().splitlines()) - 1,
                "peak_rss_mb": round(memory.peak_mb[name], 1),
                "state_dir_bytes": disk_bytes(state) - disk_bytes(state / "flwr-home"),
                "cache_bytes": disk_bytes(state / "cache"),
                "models_bytes": disk_bytes(state / "models"),
                "ledger_bytes": disk_bytes(state / "privacy-ledger.json"),
                "app_bundle_bytes": disk_bytes(state / "flwr-home"),
            }
        )
    later = per_round[1:] or per_round
    return {
        "machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "backbone": "all-MiniLM-L6-v2 (bundled), adapter-k 0",
        "devices": devices,
        "rounds": rounds,
        "dp": False,
        "wall_s": round(wall_s, 1),
        "first_round": per_round[0],
        "later_rounds_mean": {
            k: float(np.mean([r[k] for r in later if r[k] is not None]))
            for k in ("round_s", "client_update_s", *TIMES, "client_peak_rss_mb")
        },
        "per_round": per_round,
        "per_device": device_rows,
        "python_env_bytes": sum(disk_bytes(Path(p)) for p in site.getsitepackages()),
    }


def markdown(result: dict) -> str:
    first, later = result["first_round"], result["later_rounds_mean"]
    lines = [
        f"{result['devices']} devices (one MovieLens-100K user each), {result['rounds']} rounds, "
        f"DP {'on' if result['dp'] else 'off'}, {result['backbone']}; {result['machine']}; "
        f"wall {result['wall_s']:.0f} s.",
        "",
        "| client time per round (mean over devices) | round 1 | later rounds |",
        "| --- | --- | --- |",
    ]
    names = {
        "startup_s": "process start-up and imports",
        "cache_load_s": "data and frozen-backbone cache load",
        "model_load_s": "model build and global weights",
        "train_s": "local training",
        "reply_s": "reply serialisation",
        "client_update_s": "handler total (all but start-up)",
        "round_s": "server round (train + evaluate)",
    }
    for key, label in names.items():
        lines.append(f"| {label} | {first[key]:.2f} s | {later[key]:.2f} s |")
    dev = result["per_device"]

    def most(key: str) -> float:
        return max(d[key] for d in dev)

    client_peak = max(r["client_peak_rss_mb"] for r in result["per_round"])
    mib = 2**20
    lines += [
        "",
        "| per device | max over devices |",
        "| --- | --- |",
        f"| peak RAM, SuperNode + SuperExec + ClientApp | {most('peak_rss_mb'):.0f} MB |",
        f"| peak RAM, ClientApp alone | {client_peak:.0f} MB |",
        f"| state dir (cache, models, ledger, log) | {most('state_dir_bytes') / mib:.1f} MB |",
        f"| of which frozen-backbone cache | {most('cache_bytes') / mib:.1f} MB |",
        f"| of which installed models | {most('models_bytes') / mib:.1f} MB |",
        f"| app bundle Flower installs | {most('app_bundle_bytes') / mib:.1f} MB |",
        f"| Python environment (site-packages) | {result['python_env_bytes'] / 2**30:.1f} GB |",
    ]
    return "\n".join(lines)


def write(result: dict, results_dir: Path = RESULTS_DIR, readme: Path = README) -> None:
    report.write_results(
        results_dir / RESULT_FILE,
        result,
        markdown(result),
        readme=readme,
        begin=MARK_BEGIN,
        end=MARK_END,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrec-deploy-benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=3, help="devices (SuperNodes), default 3")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, default 3")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("outputs/deploy-bench"),
        help="working directory (default: outputs/deploy-bench)",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="rewrite deploy.md and the docs block from deploy.json",
    )
    args = parser.parse_args(argv)
    if args.table_only:
        write(json.loads((RESULTS_DIR / RESULT_FILE).read_text()))
        return 0
    result = run_benchmark(args.work.resolve(), devices=args.devices, rounds=args.rounds)
    write(result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
