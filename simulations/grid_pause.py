"""The server's pause between pulls for replies (reply-poll-s), measured side by side.

`python -m simulations.grid_pause` runs one scenario through Flower's simulation runtime for a
few hundred rounds with each pause cap in turn (A B A B ...: the machine's load falls on both),
and writes the seconds per round of every run and the ratio of the means to
simulations/results/grid_pause.{json,md}. Rounds with a central evaluation and the first few
(Ray warming up) are left out. About 6 minutes here with the defaults.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from simulations.report import RESULTS, markdown_table

SCENARIO = Path(__file__).parent / "configs" / "bench-fed-text-central.toml"
RESULT = "grid_pause"
WARMUP_ROUNDS = 5


def round_seconds(run_dir: Path) -> list[float]:
    """Seconds of each round without a central evaluation, after the first few."""
    from server.runlog import RunLog

    rows = RunLog(run_dir).metrics_rows()
    return [r["round_s"] for r in rows if r["round"] > WARMUP_ROUNDS and "val_ndcg@10" not in r]


def measure(scenario: Path, pauses: Sequence[float], *, rounds: int, repeats: int) -> dict:
    from simulations.run import load_scenario, run_scenario

    runs = []
    with tempfile.TemporaryDirectory(prefix="grid-pause-") as work:
        for repeat in range(repeats):
            for pause in pauses:
                out = Path(work) / f"pause-{pause}-{repeat}"
                started = time.monotonic()
                outcome = run_scenario(
                    load_scenario(scenario),
                    output=out,
                    run_overrides={
                        "num-server-rounds": rounds,
                        "evaluate-every": rounds,  # validation once, after the last round
                        "reply-poll-s": pause,
                    },
                    overwrite=True,
                )
                if not outcome.ok:
                    raise RuntimeError(f"the run ended {outcome.status}; see {out}/run.log")
                seconds = round_seconds(out)
                runs.append(
                    {
                        "reply_poll_s": pause,
                        "repeat": repeat,
                        "rounds_timed": len(seconds),
                        "s_per_round_mean": statistics.fmean(seconds),
                        "s_per_round_median": statistics.median(seconds),
                        "wall_s": time.monotonic() - started,
                    }
                )
                print(json.dumps(runs[-1]), flush=True)
    means = {
        str(p): statistics.fmean(r["s_per_round_mean"] for r in runs if r["reply_poll_s"] == p)
        for p in pauses
    }
    return {
        "scenario": str(scenario.relative_to(Path(__file__).parent.parent)),
        "rounds": rounds,
        "repeats": repeats,
        "runs": runs,
        "s_per_round": means,
        "ratio": means[str(pauses[-1])] / means[str(pauses[0])],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
        "measured": time.strftime("%Y-%m-%d"),
    }


def markdown(result: dict) -> str:
    pauses = list(result["s_per_round"])
    table = markdown_table(
        ["reply-poll-s", "repeat", "rounds timed", "s / round (mean)", "s / round (median)"],
        [
            [
                f"{r['reply_poll_s']}",
                str(r["repeat"]),
                str(r["rounds_timed"]),
                f"{r['s_per_round_mean']:.3f}",
                f"{r['s_per_round_median']:.3f}",
            ]
            for r in result["runs"]
        ],
    )
    return (
        f"{table}\n\nMean s / round: "
        + ", ".join(f"reply-poll-s {p}: {s:.3f}" for p, s in result["s_per_round"].items())
        + f"; ratio {pauses[-1]} / {pauses[0]}: **{result['ratio']:.2f}**.\n\n"
        f"{result['scenario']}, {result['rounds']} rounds a run, runs alternated; rounds with a "
        f"central evaluation and the first {WARMUP_ROUNDS} left out. {result['machine']}, "
        f"measured {result['measured']}.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.grid_pause", description=__doc__)
    parser.add_argument("--scenario", type=Path, default=SCENARIO)
    parser.add_argument("--pauses", default="0.25,0.05", help="pause caps to compare, in s")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    pauses = [float(p) for p in args.pauses.split(",")]
    result = measure(args.scenario, pauses, rounds=args.rounds, repeats=args.repeats)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{RESULT}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / f"{RESULT}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
