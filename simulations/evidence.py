"""fedrec-report: the evidence in one file, simulations/results/REPORT.md, with its plots.

Every number comes from a result file that a harness wrote; this module only reads and draws:

- quality_ml100k.json and the rows' *.metrics.jsonl (`fedrec-benchmark`): quality, validation
  per round, the privacy-utility points and the bytes each federated row sent;
- coldstart.json (`fedrec-coldstart`) and freshness.json (`fedrec-freshness`);
- other datasets: coldstart-<name>.json (`fedrec-coldstart --data`) and the metrics.jsonl of
  scenarios that read a dataset from a path (`fedrec-simulate`);
- the backbone's own weights file, for the counterfactual of sending the backbone.

`fedrec-report --run NAME ...` first runs those harnesses (each with its own defaults; see
`--help` for the names and their run time here), then writes the report from what is on disk.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.rounds import read_rows
from simulations.benchmark import QUALITY_FILE as QUALITY
from simulations.coldstart import COLDSTART_FILE as COLDSTART
from simulations.freshness import RESULT_FILE as FRESHNESS
from simulations.local import LOCAL_FILE as LOCAL
from simulations.paired import PAIRED_FILE as PAIRED
from simulations.report import RESULTS, markdown_table

REPORT = "REPORT.md"
# the harnesses `--run` can start, with what they cost on this 2-core machine
HARNESSES = {
    "benchmark": (
        ["fedrec-benchmark"],
        "the quality rows, three seeds each: several hours (the rows in quality_ml100k.json "
        "took 3.1 hours of wall time one after another; --rows picks rows by name)",
    ),
    "coldstart": (["fedrec-coldstart"], "seven model rows, three seeds: about 130 minutes here"),
    "freshness": (["fedrec-freshness"], "serves the hybrid cold-start model: 1 minute here"),
    "paired": (["fedrec-paired"], "one seed of the id-only baseline took 14 minutes here"),
    "local": (["fedrec-local"], "943 users alone, three seeds: 22 minutes here"),
}
PLOTS = {
    "rounds": "report_rounds.png",
    "privacy": "report_privacy.png",
    "bytes": "report_bytes.png",
    "coldstart": "report_coldstart.png",
}


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def read_metrics(path: Path) -> list[dict]:
    return list(read_rows(path)) if path.exists() else []


def pm(row: dict, key: str) -> str:
    std = row.get(f"{key}_std")
    return f"{row[key]:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def backbone_bytes() -> tuple[int, int]:
    """(parameters, bytes as float16) of the bundled backbone, from its safetensors header."""
    from common.backbone import default_backbone_path

    path = Path(default_backbone_path()) / "model.safetensors"
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    count = sum(int(np.prod(t["shape"])) for n, t in header.items() if n != "__metadata__")
    return count, 2 * count


# --- sections ------------------------------------------------------------------------------


def quality_section(rows: list[dict]) -> str:
    body = [
        [
            r["name"],
            "—" if not r["federated"] else r.get("runtime", "yes"),
            str(len(r["per_seed"])) if r["per_seed"][0].get("seed") is not None else "—",
            pm(r, "ndcg@10"),
            pm(r, "hr@10"),
        ]
        for r in rows
    ]
    header = ["model", "federated", "seeds", "test NDCG@10", "test HR@10"]
    text = "## Quality (MovieLens-100K, test, full ranking)\n\n" + markdown_table(header, body)
    for r in rows:
        if r["name"] == "local-only":
            chosen = r["chosen"]
            text += (
                "\n\nlocal-only: each user trains the fed-k0 model alone on its own data "
                f"(`fedrec-local`): Adam at {chosen['learning_rate']} for {chosen['epochs']} "
                "local epochs, chosen on the validation items of a sample of users."
            )
    return text


def privacy_section(rows: list[dict]) -> str:
    private = sorted(
        (r for r in rows if r.get("dp_epsilon") is not None), key=lambda r: r["dp_epsilon"]
    )
    plain = [r for r in rows if r["name"] == "fed-k0"]
    body = [
        [
            f"{r['dp_epsilon']:.2f}",
            f"{r['dp_delta']:g}",
            r.get("dp_unit", "?"),
            r["name"],
            str(len(r["per_seed"])),
            pm(r, "ndcg@10"),
        ]
        for r in private
    ]
    body += [
        ["∞ (no DP)", "—", "—", r["name"], str(len(r["per_seed"])), pm(r, "ndcg@10")] for r in plain
    ]
    return (
        "## Privacy and utility\n\n"
        "User-level DP-FedAvg (each client one user; RDP accountant). The private rows run "
        "in-process with a smaller user tower (one layer, width 32) and 100 rounds; ε = ∞ is "
        "the non-private fed-k0 row (Flower runtime, full model). Example-level DP-SGD is kept "
        "as a mode but has no row here.\n\n"
        + markdown_table(["ε", "δ", "unit", "row", "seeds", "test NDCG@10"], body)
        + f"\n\n![privacy-utility]({PLOTS['privacy']})"
    )


def communication_section(rows: list[dict]) -> str:
    params, backbone = backbone_bytes()
    default = next(r["bytes_per_client_per_round"] for r in rows if r["name"] == "fed-k0")
    body = []
    for r in rows:
        per_client = r.get("bytes_per_client_per_round")
        if not per_client:
            continue
        best = float(np.mean([s["best_round"] for s in r["per_seed"]]))
        total = per_client * r["clients_per_round"] * best
        body.append(
            [
                r["name"],
                f"{per_client:,.0f}",
                f"{r['clients_per_round']:.0f}",
                f"{best:.0f}",
                f"{total / 1e9:.2f} GB",
            ]
        )
    header = [
        "row",
        "bytes / client / round",
        "clients / round",
        "selected round (mean)",
        "bytes to the selected round",
    ]
    return (
        "## Communication\n\n"
        + markdown_table(header, body)
        + f"\n\nCounterfactual: sending the backbone (all-MiniLM-L6-v2, {params:,} parameters) "
        f"down and its update up would cost {2 * backbone:,} bytes per client per round at "
        f"float16, {2 * backbone / default:.0f}x the default model's {default:,.0f} (down + up). "
        "Goal ≤ 1 MB per client per round for the default model: "
        + ("met." if default <= 1_000_000 else "NOT met.")
        + f"\n\n![bytes]({PLOTS['bytes']})"
    )


def coldstart_section(result: dict | None) -> str:
    if result is None:
        return "## Cold items\n\nNot measured yet: run `fedrec-coldstart`."
    from simulations.coldstart import markdown

    return (
        "## Cold items (strict protocol)\n\n"
        "A tenth of the items never seen in training or validation; models trained centrally on "
        "the rest, each epoch selected on warm validation (`fedrec-coldstart`).\n\n"
        + markdown(result)
        + f"\n![cold start]({PLOTS['coldstart']})"
    )


def freshness_section(result: dict | None, results: Path) -> str:
    if result is None:
        return "## Freshness on a device\n\nNot measured yet: run `fedrec-freshness`."
    from simulations.freshness import markdown, protocol_numbers

    return "## Freshness on a device\n\n" + markdown(
        result, protocol_numbers(results, result["model"])
    )


def other_data_section(results: Path) -> str:
    """Runs on datasets read from a path: the cold-item protocol (coldstart-<name>.json) and
    federated scenarios whose [run] reads dataset = "path" (<scenario>.metrics.jsonl)."""
    from simulations.coldstart import markdown
    from simulations.report import CONFIGS
    from simulations.run import ScenarioError, load_scenario

    parts = []
    for path in sorted(results.glob(COLDSTART.replace(".json", "-*.json"))):
        cold = read_json(path)
        parts.append(f"`fedrec-coldstart --data` ({path.name}):\n\n" + markdown(cold))
    body = []
    for config in sorted(CONFIGS.glob("*.toml")):
        try:
            scenario = load_scenario(config)
        except ScenarioError:  # the ablation and emulation files hold variants, not scenarios
            continue
        metrics = read_metrics(results / f"{scenario.name}.metrics.jsonl")
        if scenario.run.get("dataset") != "path" or not metrics:
            continue
        last = metrics[-1]
        body.append(
            [
                f"{scenario.name} ({config.name})",
                str(scenario.federation["num-supernodes"]),
                str(last["round"]),
                f"{metrics[0]['popularity_val_ndcg@10']:.4f}",
                f"{last['best_val_ndcg10']:.4f} (round {last['best_round']})",
                f"{last['test_ndcg@10']:.4f}",
                f"{last['test_hr@10']:.4f}",
                f"{last['bytes_per_client']:,.0f}",
                str(sum(m.get("clients_rejected", 0) for m in metrics)),
                f"{last['elapsed_s']:,.0f}",
            ]
        )
    if body:
        header = ["scenario", "clients", "rounds", "popularity val NDCG@10", "best val NDCG@10"]
        header += ["test NDCG@10", "test HR@10", "bytes / client / round"]
        header += ["updates rejected", "wall s"]
        parts.append(
            "Federated through Flower's simulation runtime (`fedrec-simulate`; its "
            "metrics.jsonl copied here): one seed, the test split read once, at the round "
            "selected on validation.\n\n" + markdown_table(header, body)
        )
    if not parts:
        return "## Other data\n\nNot measured yet: `fedrec-coldstart --data PATH`."
    return "## Other data\n\n" + "\n\n".join(parts)


def paired_section(result: dict | None) -> str:
    if result is None:
        return "## Paired test\n\nNot measured yet: run `fedrec-paired`."
    from simulations.paired import markdown

    row = result["headline"]
    rescored = ", ".join(f"{c['rescored']:.4f}" for c in result[row]["rescored"])
    ids = result["central-id-only"]
    return (
        "## Paired test\n\n"
        f"The headline federated row ({row}: each seed's selected model, rescored per user: "
        f"{rescored}, as in the quality table) against popularity and an id-only sequential "
        "model that `fedrec-paired` trains centrally on the same split (the project's causal "
        f"transformer over item ids alone, SASRec-style: test NDCG@10 {pm(ids, 'ndcg@10')}). "
        "RecBole's GRU4Rec (0.1084 in notes/protocol.md) publishes no per-user ranks, so it is "
        "not in a pair.\n\n" + markdown(result)
    )


# --- plots ---------------------------------------------------------------------------------


def plot_rounds(rows: list[dict], results: Path, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for r in rows:
        metrics = read_metrics(results / f"{r['name']}.metrics.jsonl")
        points = [(m["round"], m["val_ndcg@10"]) for m in metrics if "val_ndcg@10" in m]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=r["name"])
    central = [r for r in rows if r["name"] == "central-k0"]
    if central:
        ax.axhline(central[0]["val_ndcg@10"], color="k", ls="--", label="central-k0 (best epoch)")
    ax.set(xlabel="round", ylabel="validation NDCG@10", title="Quality per round (first seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_privacy(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    private = sorted((r for r in rows if r.get("dp_epsilon")), key=lambda r: r["dp_epsilon"])
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    eps = [r["dp_epsilon"] for r in private]
    ax.errorbar(
        eps,
        [r["ndcg@10"] for r in private],
        yerr=[r.get("ndcg@10_std") or 0.0 for r in private],
        marker="o",
        capsize=3,
        label="user-level DP-FedAvg",
    )
    for name, style in (("fed-k0", "-"), ("popularity", ":")):
        for r in rows:
            if r["name"] == name:
                label = f"{name} (no DP)" if name == "fed-k0" else name
                ax.axhline(r["ndcg@10"], ls=style, color="gray", label=label)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="ε (δ = 1e-5, user level)", ylabel="test NDCG@10", title="Privacy and utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_bytes(rows: list[dict], results: Path, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for r in rows:
        metrics = read_metrics(results / f"{r['name']}.metrics.jsonl")
        sent, points = 0.0, []
        for m in metrics:
            sent += m.get("bytes_down", 0) + m.get("bytes_up", 0)
            if "val_ndcg@10" in m:
                points.append((sent / 1e9, m["val_ndcg@10"]))
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=r["name"])
    ax.set(xlabel="bytes sent, all clients, GB", ylabel="validation NDCG@10")
    ax.set_title("Quality per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_coldstart(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    names = [r["name"] for r in result["rows"]]
    x = np.arange(len(names))
    for offset, scope in ((-0.2, "cold"), (0.2, "all")):
        values = [r[scope]["hr@10"] for r in result["rows"]]
        errors = [r[scope].get("hr@10_std", 0.0) for r in result["rows"]]
        ax.bar(x + offset, values, 0.4, yerr=errors, capsize=3, label=f"ranked among {scope}")
    ax.set_xticks(x, names, rotation=30, ha="right")
    random = next((r for r in result["rows"] if r["name"] == "random"), None)
    if random is not None:  # the goal: 5x random among the cold items
        ax.axhline(5 * random["cold"]["hr@10"], color="k", ls="--", lw=1, label="5x random")
    ax.set(ylabel="HR@10 of cold items", title="Cold items: never seen in training")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- the report ----------------------------------------------------------------------------


def gpu_line() -> str:
    return (
        "## GPU\n\nNo GPU was measured: no harness here has written GPU rows, and every "
        "number above comes from CPU runs (2 cores)."
    )


def write_report(results: Path = RESULTS) -> Path:
    rows = read_json(results / QUALITY)
    if not rows:
        raise SystemExit(f"{results / QUALITY} is missing: run fedrec-benchmark first.")
    local = read_json(results / LOCAL)
    if local is not None:  # each client alone: a row of its own harness
        rows.insert(1, {**local, "federated": False})
    cold = read_json(results / COLDSTART)
    fresh = read_json(results / FRESHNESS)
    fed = [r for r in rows if r["federated"]]
    plot_rounds(
        fed + [r for r in rows if r["name"] == "central-k0"], results, results / PLOTS["rounds"]
    )
    plot_privacy(rows, results / PLOTS["privacy"])
    plot_bytes(fed, results, results / PLOTS["bytes"])
    if cold is not None:
        plot_coldstart(cold, results / PLOTS["coldstart"])
    sections = [
        "# fedrec: the evidence\n\nWritten by `fedrec-report` from the result files in this "
        "directory; each section names the harness that wrote its numbers. Protocol: "
        "`../shared/notes/protocol.md` (leave-last-two per user, full ranking, seen items "
        "excluded). Seeded rows: mean ± standard deviation over seeds 42, 43, 44.",
        quality_section(rows) + f"\n\n![quality per round]({PLOTS['rounds']})",
        coldstart_section(cold),
        freshness_section(fresh, results),
        privacy_section(rows),
        communication_section(rows),
        paired_section(read_json(results / PAIRED)),
        other_data_section(results),
        gpu_line(),
    ]
    path = results / REPORT
    path.write_text("\n\n".join(sections) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrec-report",
        description="Write simulations/results/REPORT.md and its plots from the result files; "
        "with --run, first run those harnesses.",
        epilog="Harnesses: "
        + "; ".join(f"{name} ({cost})" for name, (_, cost) in HARNESSES.items()),
    )
    parser.add_argument(
        "--run", nargs="+", choices=list(HARNESSES), default=[], help="run these first"
    )
    parser.add_argument(
        "--rows", nargs="+", default=[], help="with --run benchmark: only these rows (its --only)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    for name in args.run:
        command, _ = HARNESSES[name]
        if name == "benchmark" and args.rows:
            command = [*command, "--only", *args.rows]
        started = time.perf_counter()
        print(f"running {' '.join(command)}", flush=True)
        subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]], check=True)
        print(f"{name} took {time.perf_counter() - started:.0f} s", flush=True)
    print(f"wrote {write_report(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
