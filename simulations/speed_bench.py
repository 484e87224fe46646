"""fedrec-speed-benchmark: training throughput before and after, k = 1 against k = 0, and what
a federated pass costs against a central epoch, measured side by side in one run.

1. **Before / after.** One epoch of the per-example trainer of an earlier revision
   (`--baseline-rev`, checked out into a temporary git worktree and run in a subprocess with
   that revision's benchmark settings) and one epoch of the sequence trainer: predicted
   interactions per second and seconds per epoch. The old k = 1 trainer runs under a time
   budget and its epoch time is extrapolated from its rate (a full epoch takes about half an
   hour).
2. **k = 1 / k = 0.** The sequence trainer with LoRA in the top MiniLM block (its adapted item
   table recomputed every adapter-refresh-steps steps) against the same trainer at k = 0.
3. **Federated pass / central epoch.** As many client updates as there are clients (ten
   rounds of the federated benchmark at a tenth of the 943 one-user clients per round, no
   evaluation), run in-process (the ServerApp, strategy and ClientApp code alone,
   simulations/inprocess.py) and through Flower's simulation runtime (simulations/run.py, real
   SuperLink, Ray workers), against one central epoch of the same model; all use both cores.
   The difference between the two federated timings is what Flower's runtime costs. The
   Flower pass runs twice: with the scenario's `max-in-flight` window and with every message
   of a round sent at once (0, Flower's own way). The same pass of the k = 1 scenario
   (simulations/configs/bench-fed-k1.toml) runs in-process.

The ratios of section 3 are per pass of as many client updates as the federation has clients
(the pass's seconds scaled by clients / client updates), so a cohort that does not divide the
clients evenly still compares one pass with one epoch.

Writes simulations/results/speed.json, speed.md and the docs/results.md block between
<!-- results:speed --> markers. With `--passes-only --federation S --central C` it measures
section 3 alone for another federation and its model's central config (for example the
headline row's, simulations/configs/bench-fed-text-restart.toml against
bench-central-text.toml) and writes speed_<S's name>.json and .md beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

from common.config import Config
from common.rounds import read_rows
from simulations import report
from simulations.report import CONFIGS, README, RESULTS, ROOT

RESULT_FILE = "speed.json"
FEDERATION, CENTRAL = CONFIGS / "bench-fed.toml", CONFIGS / "bench-central.toml"
MARK_BEGIN, MARK_END = "<!-- results:speed -->", "<!-- /results:speed -->"
BASELINE_REV = "ed20566"  # the last revision with the per-example trainer
# that revision's central benchmark settings (its simulations/configs/bench-central*.toml)
BASELINE_RUNS = {
    "k0": {"adapter-k": 0, "batch-size": 256, "learning-rate": 0.002},
    "k1": {
        "adapter-k": 1,
        "max-tokens": 16,
        "num-negatives": 16,
        "batch-size": 64,
        "learning-rate": 0.002,
    },
}
# Run inside the baseline worktree: its own API (examples, not records).
BASELINE_SNIPPET = """
import json, sys, torch
from common.config import Config
from common.task import build_model, item_states, load_data, train_examples
from common.train import train
torch.set_num_threads(int(sys.argv[3]))
cfg = Config.from_mapping(json.loads(sys.argv[1]))
budget = float(sys.argv[2]) or None
data, splits = load_data(cfg)
items = item_states(cfg, data.catalog)
model = build_model(cfg, num_items=len(data.catalog))
examples = train_examples(cfg, list(splits))
r = train(model=model, cfg=cfg, examples=examples, items=items, epochs=1, seed=0,
          max_seconds=budget)
done = min(r.steps * cfg.batch_size, len(examples))
print(json.dumps({"examples": len(examples), "done": done, "seconds": r.seconds}))
"""


def baseline_epoch(rev: str, name: str, *, budget_s: float, threads: int) -> dict:
    """One (possibly budgeted) epoch of the per-example trainer at `rev`."""
    with tempfile.TemporaryDirectory(prefix="fedrec-baseline-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), rev],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    BASELINE_SNIPPET,
                    json.dumps(BASELINE_RUNS[name]),
                    str(budget_s),
                    str(threads),
                ],
                cwd=tree,
                env={"PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                check=True,
                capture_output=True,
                text=True,
            )
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False
            )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    rate = got["done"] / got["seconds"]
    return {
        "trainer": f"per-example ({rev})",
        "adapter_k": int(BASELINE_RUNS[name]["adapter-k"]),
        "config": BASELINE_RUNS[name],
        "targets": got["examples"],
        "targets_per_s": rate,
        "seconds_per_epoch": got["examples"] / rate,
        "extrapolated": got["done"] < got["examples"],
    }


def sequence_epoch(cfg: Config) -> dict:
    """One epoch of the sequence trainer."""
    from common.task import build_model, item_states, load_data, train_records
    from common.train import train

    dataset, splits = load_data(cfg)
    items = item_states(cfg, dataset.catalog)  # cache built outside the timing
    model = build_model(cfg, num_items=len(dataset.catalog))
    records = train_records(cfg, list(splits))
    result = train(model=model, cfg=cfg, records=records, items=items, epochs=1, seed=cfg.seed)
    return {
        "trainer": "sequence",
        "adapter_k": cfg.adapter_k,
        "config": {k: v for k, v in cfg.to_mapping().items() if Config().to_mapping()[k] != v},
        "targets": result.num_targets,
        "targets_per_s": result.num_targets / result.seconds,
        "seconds_per_epoch": result.seconds,
        "steps": result.steps,
        "extrapolated": False,
    }


PROCESS_KINDS = (  # (label, what a process's name or command line contains), first match wins
    ("SuperLink", "flower-superlink"),
    ("SuperExec", "flower-superexec"),
    ("simulation runtime (message queues, Ray driver)", "flwr-simulation"),
    ("ServerApp", "flwr-serverapp"),
    ("Ray workers (the ClientApps)", "ray::"),
    ("Ray workers (the ClientApps)", "default_worker.py"),
    ("Ray daemons", "raylet"),
    ("Ray daemons", "gcs_server"),
    ("Ray daemons", "/ray/"),
    ("the runner's flwr CLI calls (status, log stream)", "bin/flwr "),
)


class CpuByProcess:
    """CPU seconds of the processes that carry FLWR_HOME=home, by kind (PROCESS_KINDS),
    sampled every `every_s` from a thread while a Flower run goes on."""

    def __init__(self, home: Path, every_s: float = 0.5):
        self.home, self.every_s = str(home), every_s
        self.seen: dict[int, tuple[str, float]] = {}  # pid -> (kind, cpu s so far)
        self.unknown: set[str] = set()  # command lines of the processes labelled "other"
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        from common.flower.processes import processes_with_env

        while not self.done.wait(self.every_s):
            for pid in processes_with_env("FLWR_HOME", self.home):
                try:
                    proc = psutil.Process(pid)
                    text = " ".join([proc.name(), *proc.cmdline()])
                    times = proc.cpu_times()
                except psutil.Error:
                    continue
                kind = next((label for label, key in PROCESS_KINDS if key in text), "other")
                if kind == "other":
                    self.unknown.add(text[:120])
                self.seen[pid] = (kind, times.user + times.system)

    def __enter__(self) -> CpuByProcess:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def by_kind(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for kind, cpu_s in self.seen.values():
            totals[kind] = totals.get(kind, 0.0) + cpu_s
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def federated_pass(
    scenario: Path, *, flower: bool, work: Path, max_in_flight: int | None = None
) -> dict:
    """Rounds of the scenario that train about as many clients as there are (1 / fraction-train
    rounds: ten at a tenth a round), without evaluation: their seconds, the seconds of a pass
    of exactly as many client updates as clients, and the per-client time split.
    `max_in_flight` replaces the scenario's window (None: the scenario's)."""
    spec = tomllib.loads(scenario.read_text())
    fraction = float(spec["run"]["fraction-train"])
    rounds = max(round(1.0 / fraction), 1)
    overrides = {
        "num-server-rounds": rounds,
        "fraction-evaluate": 0.0,
        "central-eval": False,
    }
    if max_in_flight is not None:
        overrides["max-in-flight"] = max_in_flight
    window = int(overrides.get("max-in-flight", spec["run"].get("max-in-flight", 0)))
    out = work / ("flower" if flower else "inprocess")
    cfg_k = spec["run"].get("adapter-k", 0)
    if flower:
        from simulations.run import load_scenario, run_scenario

        with CpuByProcess(out / "flwr-home") as cpu:
            outcome = run_scenario(
                load_scenario(scenario),
                output=out,
                run_overrides=overrides,
                overwrite=True,
            )
        cpu_s = cpu.by_kind()
        if cpu.unknown:
            print(f"processes labelled other: {sorted(cpu.unknown)}", flush=True)
        if not outcome.ok:
            raise RuntimeError(f"the Flower pass ended {outcome.status}; see {out}/run.log")
        workers = max(os.cpu_count() // spec["federation"]["client-resources-num-cpus"], 1)
    else:  # the same code in one process, with as many threads as the central epoch
        from simulations.inprocess import run_inprocess

        cfg = Config().merged({**spec.get("run", {}), **overrides, "output-dir": str(out)})
        run_inprocess(cfg)
        workers, cpu_s = 1, None
    trained = [r for r in read_rows(out / "metrics.jsonl") if r.get("round", 0) > 0]
    clients = sum(r["clients_train"] for r in trained)
    seconds = sum(r["round_s"] for r in trained)

    def mean(key: str) -> float | None:
        values = [r[key] for r in trained if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    runtime = "in-process"
    if flower:
        out_at_once = f"{window} messages" if window else "all messages"
        runtime = f"Flower simulation (SuperLink, Ray), {out_at_once} out"
    return {
        "scenario": scenario.name,
        "runtime": runtime,
        "max_in_flight": window,
        "adapter_k": int(cfg_k),
        "workers": workers,
        "rounds": len(trained),
        "clients": clients,
        "seconds": seconds,
        "pass_seconds": seconds * int(spec["federation"]["num-supernodes"]) / clients,
        "seconds_per_client": seconds * workers / clients,
        "client_update_s_mean": mean("client_update_s_mean"),
        "client_train_s_mean": mean("client_train_s"),
        "bytes_per_client": mean("bytes_per_client"),
        "cpu_s_by_process": cpu_s,  # Flower runtime: where the pass's CPU time went
    }


def central_epoch(config: Path) -> dict:
    print(f"== central epoch, sequence trainer, {config.name}", flush=True)
    epoch = sequence_epoch(Config.from_toml(config))
    print(json.dumps(epoch), flush=True)
    return epoch


def federated_passes(scenario: Path, *, flower: bool) -> list[dict]:
    """The scenario's pass in-process and, with `flower`, through Flower's runtime twice: with
    the scenario's max-in-flight window and with every message of a round out at once."""
    runs = [(False, None), *([(True, None), (True, 0)] if flower else [])]
    passes = []
    with tempfile.TemporaryDirectory(prefix="fedrec-pass-") as tmp:
        for i, (through_flower, window) in enumerate(runs):
            where = "Flower runtime" if through_flower else "in-process"
            where += "" if window is None else f", max-in-flight {window}"
            print(f"== federated pass, {scenario.name}, {where}", flush=True)
            work = Path(tmp) / str(i)
            passes.append(
                federated_pass(scenario, flower=through_flower, work=work, max_in_flight=window)
            )
            print(json.dumps(passes[-1]), flush=True)
    return passes


def ratios_of(passes: list[dict], central_s: float) -> dict[str, float]:
    """A pass (as many client updates as clients) against a central epoch of `central_s`, and
    what Flower's runtime adds: `passes` as federated_passes returns them."""
    inprocess, *flower_passes = passes
    k = inprocess["adapter_k"]
    ratios = {
        f"federated pass ({p['runtime']}) / central epoch, k = {k}": p["pass_seconds"] / central_s
        for p in passes
    }
    if flower_passes:  # what Flower's runtime adds, per client update, in wall seconds
        windowed, at_once = flower_passes
        ratios["Flower runtime's added wall seconds per client update"] = (
            windowed["seconds"] / windowed["clients"] - inprocess["seconds"] / inprocess["clients"]
        )
        ratios[f"Flower pass, {windowed['max_in_flight']} messages out / all out at once"] = (
            windowed["pass_seconds"] / at_once["pass_seconds"]
        )
    return ratios


def pass_ratios(federation: Path, central: Path, *, flower: bool) -> dict:
    """Section 3 alone: `federation`'s pass against one epoch of `central`, side by side."""
    epoch = central_epoch(central)
    passes = federated_passes(federation, flower=flower)
    return {
        "federation": federation.name,
        "central": central.name,
        "epochs": [epoch],
        "passes": passes,
        "ratios": ratios_of(passes, epoch["seconds_per_epoch"]),
    }


def machine(threads: int, torch_version: str) -> str:
    return (
        f"{platform.machine()}, {threads} torch threads, torch {torch_version}, "
        f"measured {time.strftime('%Y-%m-%d')}; one run, variants side by side."
    )


def markdown(result: dict) -> str:
    """The docs/results.md block: three small tables."""
    lines = []
    if "federation" in result:  # --passes-only
        lines += [f"Federation {result['federation']} against {result['central']}.", ""]
    lines += [
        "| trainer | k | predicted interactions / s | s / epoch |",
        "| --- | --- | --- | --- |",
    ]
    for r in result["epochs"]:
        extra = " (extrapolated)" if r["extrapolated"] else ""
        lines.append(
            f"| {r['trainer']} | {r['adapter_k']} | {r['targets_per_s']:,.0f} "
            f"| {r['seconds_per_epoch']:.1f}{extra} |"
        )
    ratios = result["ratios"]
    lines += [
        "",
        "| ratio | value |",
        "| --- | --- |",
        *(f"| {k} | {v:.2f} |" for k, v in ratios.items()),
    ]
    if result.get("passes"):
        lines += [
            "",
            "| federated pass | k | rounds | client updates | workers | s | worker-s per client "
            "| of which in the ClientApp | of which training |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for p in result["passes"]:
            lines.append(
                f"| {p['runtime']} | {p['adapter_k']} | {p['rounds']} | {p['clients']} "
                f"| {p['workers']} | {p['seconds']:.1f} "
                f"| {p['seconds_per_client']:.3f} | {p['client_update_s_mean']:.3f} "
                f"| {p['client_train_s_mean']:.3f} |"
            )
        for p in result["passes"]:
            if p.get("cpu_s_by_process"):
                lines += [
                    "",
                    f"| CPU of the {p['runtime']} pass, by process | CPU s | per client update |",
                    "| --- | --- | --- |",
                    *(
                        f"| {kind} | {cpu_s:.1f} | {cpu_s / p['clients']:.3f} |"
                        for kind, cpu_s in p["cpu_s_by_process"].items()
                    ),
                ]
    lines += ["", result["machine"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrec-speed-benchmark",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Takes about 20 minutes on a 2-core CPU.",
    )
    parser.add_argument(
        "--baseline-rev",
        default=BASELINE_REV,
        help=f"git revision with the per-example trainer (default: {BASELINE_REV})",
    )
    parser.add_argument(
        "--baseline-k1-budget-s",
        type=float,
        default=120.0,
        help="time budget of the old k = 1 epoch, extrapolated to a full one (default: 120)",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="only the new trainer")
    parser.add_argument("--skip-flower", action="store_true", help="no Flower-runtime pass")
    parser.add_argument(
        "--federation",
        type=Path,
        default=FEDERATION,
        help="the federated scenario of the pass (default: simulations/configs/bench-fed.toml)",
    )
    parser.add_argument(
        "--central",
        type=Path,
        default=CENTRAL,
        help="its model's central config, for the epoch "
        "(default: simulations/configs/bench-central.toml)",
    )
    parser.add_argument(
        "--passes-only",
        action="store_true",
        help="only the federated pass against the central epoch, at k = 0 (no before / after, "
        "no k = 1); writes speed_<federation's name>.json and .md, not speed.json",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where results go")
    args = parser.parse_args(argv)
    chosen = (args.federation.resolve(), args.central.resolve())
    if not args.passes_only and chosen != (FEDERATION.resolve(), CENTRAL.resolve()):
        parser.error("--federation and --central other than the defaults need --passes-only")
    import torch  # after the arguments: --help answers at once

    threads = torch.get_num_threads()
    if args.passes_only:
        result = pass_ratios(args.federation, args.central, flower=not args.skip_flower)
        name = "speed_" + args.federation.stem.replace("-", "_") + ".json"
        result["machine"] = machine(threads, torch.__version__)
        report.write_results(args.results / name, result, markdown(result))
        print(markdown(result))
        return 0

    epochs = []
    if not args.skip_baseline:
        for name, budget in (("k0", 0.0), ("k1", args.baseline_k1_budget_s)):
            print(f"== before: per-example trainer at {args.baseline_rev}, {name}", flush=True)
            epochs.append(baseline_epoch(args.baseline_rev, name, budget_s=budget, threads=threads))
            print(json.dumps(epochs[-1]), flush=True)
    after = {}
    for name in ("bench-central", "bench-central-k1"):
        after[name] = central_epoch(CONFIGS / f"{name}.toml")
        epochs.append(after[name])
    ratios = {
        "k = 1 / k = 0 throughput (sequence trainer)": after["bench-central-k1"]["targets_per_s"]
        / after["bench-central"]["targets_per_s"]
    }
    if not args.skip_baseline:
        for k, name in ((0, "bench-central"), (1, "bench-central-k1")):
            before = next(e for e in epochs if e["adapter_k"] == k and e["trainer"] != "sequence")
            ratios[f"after / before throughput, k = {k}"] = (
                after[name]["targets_per_s"] / before["targets_per_s"]
            )

    passes = federated_passes(FEDERATION, flower=not args.skip_flower)
    ratios.update(ratios_of(passes, after["bench-central"]["seconds_per_epoch"]))
    (k1,) = federated_passes(CONFIGS / "bench-fed-k1.toml", flower=False)
    passes.append(k1)
    ratios["federated pass k = 1 / k = 0 (in-process)"] = (
        k1["pass_seconds"] / passes[0]["pass_seconds"]
    )
    result = {
        "epochs": epochs,
        "passes": passes,
        "ratios": ratios,
        "machine": machine(threads, torch.__version__),
    }
    report.write_results(
        args.results / RESULT_FILE,
        result,
        markdown(result),
        readme=README,
        begin=MARK_BEGIN,
        end=MARK_END,
    )
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
