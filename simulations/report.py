"""A simulation's report: results.json, report.md, metrics.png and TensorBoard curves.

Everything here is computed from the run's ``metrics.jsonl`` (one JSON object per round, written
by the ServerApp), so a report can be regenerated at any time:

    python -m simulations.report outputs/demo
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from common.files import METRICS_FILE
from common.metrics import finite_number as number
from common.rounds import RoundRow, read_rows

RESULTS_FILE = "results.json"
# where the benchmarks find their scenarios and write their results
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "simulations" / "configs"
RESULTS = ROOT / "simulations" / "results"
README = ROOT / "README.md"
REPORT_FILE = "report.md"
PLOT_FILE = "metrics.png"
TENSORBOARD_DIR = "tensorboard"

# "fed_hr@10" -> ("fed", "hr", 10): federated, central-validation and central-test ranking metrics
RANKING_KEY = re.compile(r"^(fed|val|test)_(hr|ndcg|mrr)@(\d+)$")
SPLITS = ("fed", "val", "test")
SPLIT_NAMES = {"fed": "federated", "val": "validation", "test": "test"}
RANKING_NAMES = {"hr": "HR", "ndcg": "NDCG", "mrr": "MRR"}
POPULARITY_KEY = "popularity_val_ndcg@10"  # the server's baseline, in round 0's row
# Per-round columns of the markdown table, in this order, when any round has them
ROUND_COLUMNS = (
    "round",
    "clients_train",
    "clients_declined",
    "clients_rejected",
    "train_loss",
    # ranking columns are inserted here
    "epsilon",
    "round_s",
    "elapsed_s",
    "bytes_per_client",
)


def write_results(
    path: Path, data: Any, table: str, *, readme: Path | None = None, begin: str = "", end: str = ""
) -> None:
    """A benchmark's results: the JSON file, its markdown table beside it (same name, .md)
    and, when given, the README block between the begin and end markers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    path.with_suffix(".md").write_text(table + "\n")
    if readme is not None:
        replace_block(readme, begin, end, table)


def rows_by_name(path: Path) -> dict[str, dict[str, Any]]:
    """A results file of named rows (a JSON list of objects with "name"), by name; {} when the
    file does not exist yet."""
    return {r["name"]: r for r in json.loads(path.read_text())} if path.exists() else {}


def merged_seeds(stored: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row's per-seed `runs` with the `stored` runs of the other seeds, sorted by seed (a seed
    run again replaces its stored run): a row completed seed by seed."""
    fresh = {r["seed"] for r in runs}
    return sorted([r for r in stored if r["seed"] not in fresh] + runs, key=lambda r: r["seed"])


def replace_block(path: Path, begin: str, end: str, text: str) -> bool:
    """Put text between the begin and end markers of a README, or of the docs/*.md beside it
    that holds them (a results block); False when no file has the markers."""
    for candidate in (path, *sorted(path.parent.glob("docs/*.md"))):
        if not candidate.exists():
            continue
        content = candidate.read_text(encoding="utf-8")
        if begin not in content or end not in content:
            continue
        head, rest = content.split(begin, 1)
        _, tail = rest.split(end, 1)
        candidate.write_text(f"{head}{begin}\n{text}\n{end}{tail}", encoding="utf-8")
        return True
    return False


# --- reading ------------------------------------------------------------------------------


def rounds_of(rows: Iterable[RoundRow]) -> list[RoundRow]:
    """One row per round, sorted by round; a repeated round keeps its last row (a resumed run)."""
    by_round: dict[int, RoundRow] = {}
    for row in rows:
        rnd = row.get("round")
        if isinstance(rnd, bool) or not isinstance(rnd, int):
            warnings.warn(f"Skipping a metrics row without an integer 'round': {row}", stacklevel=2)
            continue
        by_round[rnd] = row
    return [by_round[r] for r in sorted(by_round)]


def final_row(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The row of the last round, or None when no round was logged."""
    return dict(rounds[-1]) if rounds else None


def ranking_keys(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    """Ranking metric keys present in any round: fed, val, test; HR, NDCG, MRR; by K."""
    present = {k for row in rounds for k, v in row.items() if number(v) is not None}
    found = [m.groups() for k in present if (m := RANKING_KEY.match(k))]
    order = {s: i for i, s in enumerate(SPLITS)}
    metric_order = {m: i for i, m in enumerate(RANKING_NAMES)}
    found.sort(key=lambda g: (order[g[0]], int(g[2]), metric_order[g[1]]))
    return [f"{split}_{metric}@{k}" for split, metric, k in found]


def series(rounds: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of one key, leaving out rounds where it is missing or null."""
    steps, values = [], []
    for row in rounds:
        value = number(row.get(key))
        if value is not None:
            steps.append(int(row["round"]))
            values.append(value)
    return steps, values


def label_of(key: str) -> str:
    """A human label for a metrics key ("val_ndcg@10" -> "NDCG@10 (validation)")."""
    if m := RANKING_KEY.match(key):
        split, metric, k = m.groups()
        return f"{RANKING_NAMES[metric]}@{k} ({SPLIT_NAMES[split]})"
    if key.startswith("epsilon"):
        return f"{key} (see Privacy)"  # an epsilon is never shown without its terms
    return key


# --- privacy ------------------------------------------------------------------------------


def privacy_summary(
    rounds: Sequence[Mapping[str, Any]], config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Epsilon of the last round that reported one, with delta, unit, accountant, composition."""
    config = config or {}
    reported = [row for row in rounds if number(row.get("epsilon")) is not None]
    last = reported[-1] if reported else {}
    mode = last.get("dp_mode") or config.get("dp-mode") or "off"
    summary = {
        "dp_mode": mode,
        "round": last.get("round"),
        "epsilon": number(last.get("epsilon")),
        "delta": last.get("dp_delta", config.get("dp-delta") if reported else None),
        "unit": last.get("dp_unit"),
        "accountant": last.get("dp_accountant"),
        "composition": last.get("dp_composition"),
        "noise_multiplier": number(last.get("dp_noise_multiplier")),
        "sample_rate": number(last.get("dp_sample_rate")),
        "target_epsilon": config.get("dp-target-epsilon"),
    }
    summary["statement"] = privacy_statement(summary)
    return summary


def privacy_statement(summary: Mapping[str, Any]) -> str:
    """One paragraph that never names epsilon without its delta, unit, accountant, composition."""
    if summary["epsilon"] is None:
        if summary["dp_mode"] != "off":
            return (
                f"Differential privacy (dp-mode = {summary['dp_mode']}) was enabled, but no "
                "round reported a privacy loss (epsilon, with its delta, unit, accountant and "
                "composition), so no guarantee can be stated for this run."
            )
        return (
            "Differential privacy was disabled for this run: no privacy guarantee "
            "(no epsilon at any delta, unit, accountant or composition) is claimed."
        )

    def known(key: str) -> str:
        value = summary.get(key)
        return "unknown (not reported)" if value in (None, "") else str(value)

    unit = summary.get("unit")
    unit_text = f"{unit}-level" if unit else "unknown-unit (not reported)"
    terms = (
        f"{unit_text}, delta = {known('delta')}, accountant = {known('accountant')}, "
        f"composition = {known('composition')}"
    )
    if summary["dp_mode"] == "fedavg":
        text = (
            f"DP-FedAvg: after round {summary['round']}, epsilon = {summary['epsilon']:.4g} "
            f"({terms}; noise multiplier {known('noise_multiplier')}, clients Poisson-sampled "
            f"at rate {known('sample_rate')}). Protects each user's whole data from whoever "
            "sees the released models (devices, the public); the server sees clipped updates."
        )
    else:
        text = (
            f"DP-SGD on each client: every client's epsilon stays within "
            f"{summary['epsilon']:.4g} ({terms}); the noise is added on the device."
        )
    if unit == "user":
        text += " User level: neighbouring federations differ in one user's whole data."
    return text


# --- results ------------------------------------------------------------------------------


def build_results(
    rows: Iterable[Mapping[str, Any]],
    *,
    scenario: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    federation: Mapping[str, Any] | None = None,
    status: str | None = None,
    run_id: str | None = None,
    wall_s: float | None = None,
) -> dict[str, Any]:
    """The content of results.json: what ran, how it ended, every round and the final row.

    `config` is the run's whole run-config; `overrides` names the keys the scenario (or the
    command line) set, the others being the app's defaults.
    """
    rounds = rounds_of(rows)
    return {
        "scenario": dict(scenario or {}),
        "config": dict(config or {}),
        "overrides": sorted(overrides),
        "federation": dict(federation or {}),
        "status": status,
        "run_id": run_id,
        "wall_s": wall_s,
        "rounds": rounds,
        "final": final_row(rounds),
        "privacy": privacy_summary(rounds, config),
        "generated_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# --- text ---------------------------------------------------------------------------------


def format_value(value: Any, key: str = "") -> str:
    """A cell: metrics to 4 decimals, seconds to 1, counts as integers, missing as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}" if key.startswith("bytes") else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if key.endswith("_s"):
            return f"{value:.1f}"
        if key.startswith("bytes"):
            return f"{value:,.0f}"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3g}"  # a delta of 1e-05 is not 0.0000
        return f"{value:.4f}"
    return str(value)


def plain(value: Any) -> str:
    """A config value as written in TOML (bools lowercase, numbers unrounded)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def round_columns(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-round columns that have a value in at least one round."""
    present = {k for row in rounds for k, v in row.items() if v is not None}
    head = [c for c in ROUND_COLUMNS[:5] if c in present]
    tail = [c for c in ROUND_COLUMNS[5:] if c in present]
    return head + ranking_keys(rounds) + tail


def text_table(rounds: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width table for the terminal."""
    header = [SHORT_HEADERS.get(c, c) for c in columns]
    body = [[format_value(row.get(c), c) for c in columns] for row in rounds]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


SHORT_HEADERS = {
    "clients_train": "clients",
    "clients_declined": "declined",
    "clients_rejected": "rejected",
    "train_loss": "loss",
    "epsilon": "eps",
    "round_s": "round_s",
    "elapsed_s": "elapsed_s",
    "bytes_per_client": "bytes/client",
}


def terminal_columns(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    """The narrower column set of the terminal table: no MRR, no counts that stayed zero."""
    columns = round_columns(rounds)
    present = set(columns)
    dropped = {"round_s", "bytes_per_client"}
    for count in ("clients_declined", "clients_rejected"):
        if not any(row.get(count) for row in rounds):
            dropped.add(count)
    for key in columns:
        m = RANKING_KEY.match(key)
        if m and (
            m[2] == "mrr" or (m[1] == "fed" and m[2] == "hr" and f"val_hr@{m[3]}" in present)
        ):
            dropped.add(key)
    return [c for c in columns if c not in dropped]


def summary_text(results: Mapping[str, Any]) -> str:
    """The terminal summary: per-round table, final row and the privacy statement."""
    rounds = results["rounds"]
    scenario = results.get("scenario") or {}
    lines = [f"== {scenario.get('name', 'simulation')}: {results.get('status') or 'unknown'} =="]
    if results.get("run_id"):
        wall = results.get("wall_s")
        wall_text = f", wall time {wall:.1f} s" if wall is not None else ""
        lines.append(f"run {results['run_id']}{wall_text}")
    if not rounds:
        lines.append("No round was logged (metrics.jsonl is missing or empty).")
    else:
        lines += ["", text_table(rounds, terminal_columns(rounds))]
        if line := baseline_line(rounds):
            lines += ["", line]
    lines += ["", "Privacy: " + results["privacy"]["statement"]]
    return "\n".join(lines)


def baseline_line(rounds: Sequence[Mapping[str, Any]]) -> str | None:
    """The run's best validation NDCG@10 against the popularity baseline on the same users."""
    baseline = next((number(r.get(POPULARITY_KEY)) for r in rounds if POPULARITY_KEY in r), None)
    steps, values = series(rounds, "val_ndcg@10")
    if baseline is None or not values:
        return None
    best = int(np.argmax(values))
    verdict = "beats" if values[best] > baseline else "does not beat"
    return (
        f"Best validation NDCG@10 {values[best]:.4f} (round {steps[best]}) {verdict} the "
        f"popularity baseline's {baseline:.4f}."
    )


def markdown_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def markdown_report(results: Mapping[str, Any]) -> str:
    """report.md: scenario, configuration, per-round table, final metrics, privacy, plot."""
    scenario = results.get("scenario") or {}
    config = results.get("config") or {}
    rounds = results["rounds"]
    final = results.get("final")
    name = scenario.get("name", "simulation")
    out = [f"# Simulation report: {name}", ""]
    if scenario.get("description"):
        out += [str(scenario["description"]).strip(), ""]
    wall = results.get("wall_s")
    facts = [
        ("Status", results.get("status") or "unknown"),
        ("Run id", results.get("run_id") or "-"),
        ("Wall time", f"{wall:.1f} s" if wall is not None else "-"),
        ("Rounds logged", str(len(rounds))),
        ("Scenario file", scenario.get("path") or "-"),
        ("Generated", results.get("generated_at") or "-"),
    ]
    out += [f"- **{k}**: {v}" for k, v in facts] + [""]

    if results.get("federation"):
        out += ["## Federation", ""]
        body = [(k, plain(v)) for k, v in results["federation"].items()]
        out += [markdown_table(["key", "value"], body), ""]

    if config:
        out += ["## Configuration", ""]
        overrides = set(results.get("overrides") or ())
        body = [
            (k, f"`{plain(v)}`", "override" if k in overrides else "default")
            for k, v in sorted(config.items())
        ]
        out += [markdown_table(["key", "value", "set by"], body), ""]

    out += ["## Rounds", ""]
    if rounds:
        columns = round_columns(rounds)
        header = [label_of(c) for c in columns]
        body = [[format_value(row.get(c), c) for c in columns] for row in rounds]
        out += [markdown_table(header, body), ""]
    else:
        out += ["No round was logged.", ""]

    out += ["## Final metrics", ""]
    if final:
        body = [
            (label_of(k), format_value(v, k))
            for k, v in final.items()
            if k != "round" and v is not None
        ]
        out += [f"Round {final['round']}.", "", markdown_table(["metric", "value"], body), ""]
    else:
        out += ["None: no round was logged.", ""]

    out += ["## Privacy", "", results["privacy"]["statement"], ""]
    out += [
        "## Curves",
        "",
        f"![Training loss, ranking metrics and privacy loss per round]({PLOT_FILE})",
        "",
    ]
    out += [
        f"TensorBoard: `tensorboard --logdir {TENSORBOARD_DIR}` (from this directory).",
        "",
    ]
    return "\n".join(out)


# --- curves -------------------------------------------------------------------------------


def plot_metrics(rounds: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """metrics.png: training loss, HR/NDCG per round and epsilon per round."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state; lazy: ~0.5 s

    path = Path(path)
    fig = Figure(figsize=(15, 4.2))
    ax_loss, ax_rank, ax_eps = fig.subplots(1, 3)

    def panel(ax, keys: Sequence[str], title: str, ylabel: str) -> None:
        drawn = 0
        for key in keys:
            steps, values = series(rounds, key)
            if steps:
                label = key if key == "epsilon" else label_of(key)
                ax.plot(steps, values, marker="o", label=label)
                drawn += 1
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            ax.text(0.5, 0.5, "not reported", ha="center", va="center", transform=ax.transAxes)

    panel(ax_loss, ["train_loss"], "Training loss (mean over clients)", "loss")
    rank = [k for k in ranking_keys(rounds) if k.split("_")[1].split("@")[0] in ("hr", "ndcg")]
    panel(ax_rank, rank, "Ranking quality", "metric")
    privacy = privacy_summary(rounds)
    eps_title = "Epsilon per round"
    if privacy["epsilon"] is not None:
        eps_title = (
            f"{privacy['unit'] or '?'}-level epsilon, {privacy['composition'] or '?'}\n"
            f"(delta={privacy['delta']}, {privacy['accountant'] or '?'} accountant)"
        )
    panel(ax_eps, ["epsilon"], eps_title, "epsilon")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def tag_of(key: str) -> str:
    """The TensorBoard tag of a metrics key ("val_ndcg@10" -> "val/ndcg@10")."""
    if m := RANKING_KEY.match(key):
        split, metric, k = m.groups()
        return f"{split}/{metric}@{k}"
    if key == "train_loss":
        return "train/loss"
    if key == "epsilon" or key.startswith("dp_"):
        return f"privacy/{key}"
    return f"system/{key}"


def write_tensorboard(rounds: Sequence[Mapping[str, Any]], logdir: str | Path) -> Path:
    """Every numeric metric as a TensorBoard scalar at step = round; old event files replaced."""
    from torch.utils.tensorboard import SummaryWriter  # lazy: torch is heavy to import

    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    for old in logdir.glob("events.out.tfevents.*"):
        old.unlink()  # a regenerated report must not duplicate its curves
    now = time.time()
    with SummaryWriter(log_dir=str(logdir)) as writer:
        for row in rounds:
            for key, raw in row.items():
                if key != "round" and (value := number(raw)) is not None:
                    writer.add_scalar(tag_of(key), value, int(row["round"]), walltime=now)
    return logdir


# --- all of it ----------------------------------------------------------------------------


def write_report(
    output_dir: str | Path,
    *,
    scenario: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    overrides: Sequence[str] | None = None,
    federation: Mapping[str, Any] | None = None,
    status: str | None = None,
    run_id: str | None = None,
    wall_s: float | None = None,
) -> dict[str, Any]:
    """Write results.json, report.md, metrics.png and tensorboard/ into output_dir.

    Facts not given (scenario, config, status...) are kept from an existing results.json, so
    regenerating a report loses nothing.
    """
    output_dir = Path(output_dir)
    previous: dict[str, Any] = {}
    if (output_dir / RESULTS_FILE).exists():
        previous = json.loads((output_dir / RESULTS_FILE).read_text(encoding="utf-8"))

    def given_or_kept(value: Any, key: str) -> Any:
        return value if value is not None else previous.get(key)

    metrics_path = output_dir / METRICS_FILE
    rows = read_rows(metrics_path) if metrics_path.exists() else []
    results = build_results(
        rows,
        scenario=given_or_kept(scenario, "scenario"),
        config=given_or_kept(config, "config"),
        overrides=given_or_kept(overrides, "overrides") or (),
        federation=given_or_kept(federation, "federation"),
        status=given_or_kept(status, "status"),
        run_id=given_or_kept(run_id, "run_id"),
        wall_s=given_or_kept(wall_s, "wall_s"),
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot_metrics(results["rounds"], output_dir / PLOT_FILE)
    write_tensorboard(results["rounds"], output_dir / TENSORBOARD_DIR)
    (output_dir / REPORT_FILE).write_text(markdown_report(results), encoding="utf-8")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m simulations.report OUTPUT`: regenerate a run's report from its metrics."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.report",
        description=(
            "Regenerate results.json, report.md, metrics.png and tensorboard/ from a run's "
            "metrics.jsonl, and print the summary table."
        ),
    )
    parser.add_argument("output", type=Path, help="the run's output directory")
    parser.add_argument("--quiet", action="store_true", help="write the files, print nothing")
    args = parser.parse_args(argv)
    if not (args.output / METRICS_FILE).exists() and not (args.output / RESULTS_FILE).exists():
        print(
            f"error: {args.output} has no {METRICS_FILE} (is it a run's output directory?)",
            file=sys.stderr,
        )
        return 2
    try:
        results = write_report(args.output)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(summary_text(results))
        print(f"\nReport: {args.output / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
