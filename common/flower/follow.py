"""Following a submitted run: its rounds from metrics.jsonl as progress lines, its status from
`flwr list`, its log streamed to a file.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common.files import METRICS_FILE
from common.flower.cli import (
    COMPLETED,
    FINISHED,
    FlowerCli,
    earlier_log,
    save_run_log,
    strip_colours,
)
from common.flower.config import to_config_string
from common.flower.processes import RunnerError, SuperLink, end_process, tail, uninterrupted
from common.metrics import finite_number
from common.rounds import parse_row

log = logging.getLogger(__name__)

# Each `flwr list` is a new Python process importing flwr (about 2 CPU-s, taken from the
# clients on a small machine): while the run's log streams, its end is the signal that the
# run finished, and a status query once a minute only guards against a stream that hangs.
STATUS_POLL_S = 60.0


def add_poll_option(parser: argparse.ArgumentParser) -> None:
    """`--poll-s`, as fedrec-simulate and fedrec-server run take it."""
    parser.add_argument(
        "--poll-s",
        type=float,
        default=STATUS_POLL_S,
        metavar="S",
        help="seconds between `flwr list` status queries while the run's log streams; the "
        f"stream's end is the cue to ask at once (default: {STATUS_POLL_S:.0f})",
    )


class MetricsTail:
    """New complete rows of a growing metrics.jsonl."""

    def __init__(self, path: Path, *, skip_existing: bool = False):
        self.path = path
        self.offset = path.stat().st_size if skip_existing and path.exists() else 0

    def poll(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1  # only whole lines; the writer may be mid-line
        self.offset += end
        rows = []
        for line in chunk[:end].decode("utf-8").splitlines():
            if line.strip():
                try:
                    rows.append(parse_row(line, where=f"{self.path} line"))
                except ValueError as exc:
                    log.warning("Skipped a malformed metrics row: %s", exc)
        return rows


def progress_header(row: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The line printed once before the first round: what the epsilon column means."""
    mode = row.get("dp_mode") or config.get("dp-mode") or "off"
    if mode == "off":
        return "Differential privacy is off: no epsilon is reported."
    delta = row.get("dp_delta", config.get("dp-delta"))
    what = "of the federation" if mode == "fedavg" else "cap on every client's"
    return (
        f"eps = epsilon {what} (DP-{'FedAvg' if mode == 'fedavg' else 'SGD'}, "
        f"{row.get('dp_unit') or 'user'}-level, delta={delta}, "
        f"{row.get('dp_accountant') or 'rdp'} accountant, "
        f"{row.get('dp_composition') or 'cumulative'})"
    )


def progress_line(row: Mapping[str, Any], *, total_rounds: int | None, wall_s: float) -> str:
    """One line per round: clients, loss, HR@10, NDCG@10 (fed and val), eps, elapsed."""
    rnd = row.get("round")
    parts = [f"round {rnd}/{total_rounds}" if total_rounds else f"round {rnd}"]
    if (clients := row.get("clients_train")) is not None:
        extra = [
            f"{row[k]} {k.removeprefix('clients_')}"
            for k in ("clients_declined", "clients_rejected")
            if row.get(k)
        ]
        parts.append(f"clients {clients}" + (f" ({', '.join(extra)})" if extra else ""))
    if (loss := finite_number(row.get("train_loss"))) is not None:
        parts.append(f"loss {loss:.4f}")
    for split in ("val", "fed", "test"):  # the first present: val preferred over fed
        if (hr := finite_number(row.get(f"{split}_hr@10"))) is not None:
            parts.append(f"HR@10 {split} {hr:.4f}")
            break
    ndcg = [
        f"{split} {v:.4f}"
        for split in ("fed", "val", "test")
        if (v := finite_number(row.get(f"{split}_ndcg@10"))) is not None
    ]
    if ndcg:
        parts.append("NDCG@10 " + " ".join(ndcg))
    if (eps := finite_number(row.get("epsilon"))) is not None:
        parts.append(f"eps {eps:.3f}")
    elapsed = finite_number(row.get("elapsed_s"))
    parts.append(f"{elapsed if elapsed is not None else wall_s:.1f} s")
    return " | ".join(parts)


def follow_run(
    cli: FlowerCli,
    run_id: str,
    *,
    superlink: SuperLink,
    streamer: subprocess.Popen,
    metrics: MetricsTail,
    config: Mapping[str, Any],
    poll_s: float,
    timeout_s: float | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Print each new round until `flwr list` says the run finished; its final status row."""
    started = time.monotonic()
    header_done = False
    next_poll = started + 2.0
    quick_until = 0.0  # poll often for a while once the log stream has ended
    stream_ended = False
    failures = 0
    stop_deadline: float | None = None
    total_rounds = config.get("num-server-rounds")

    def show_rounds() -> None:
        nonlocal header_done
        for row in metrics.poll():
            if not header_done:
                say(progress_header(row, config))
                header_done = True
            say(progress_line(row, total_rounds=total_rounds, wall_s=time.monotonic() - started))

    while True:
        show_rounds()
        now = time.monotonic()
        if not superlink.is_running():
            raise RunnerError(
                f"The SuperLink exited during run {run_id} (code "
                f"{superlink.process.returncode if superlink.process else '?'}):\n"
                f"{tail(superlink.log_path)}"
            )
        # `flwr log --stream` ends when the run finishes: a cue to ask for the status now
        if not stream_ended and streamer.poll() is not None:
            stream_ended = True
            quick_until = now + 30.0
            next_poll = now
        if now >= next_poll:
            try:
                info = cli.status(run_id)
                failures = 0
            except (RunnerError, subprocess.TimeoutExpired) as exc:
                failures += 1
                if failures >= 5:
                    raise RunnerError(
                        f"Five status queries in a row failed; the last: {exc}"
                    ) from exc
                say(f"warning: status query failed ({exc}); retrying.")
                info = {"status": "unknown"}
            if str(info.get("status", "")).startswith(FINISHED):
                show_rounds()  # rows written just before the end
                return info
            next_poll = now + (min(poll_s, 2.0) if now < quick_until else poll_s)
        if timeout_s is not None and stop_deadline is None and now - started > timeout_s:
            say(f"Run {run_id} exceeded --timeout-s {timeout_s:.0f}; stopping it.")
            cli.stop(run_id)
            stop_deadline = now + 60.0
        if stop_deadline is not None and now > stop_deadline:
            raise RunnerError(f"Run {run_id} did not stop within 60 s of `flwr stop`.")
        time.sleep(1.0)


def follow_and_log(
    cli: FlowerCli,
    run_id: str,
    *,
    superlink: SuperLink,
    output_dir: Path,
    log_path: Path,
    config: Mapping[str, Any],
    poll_s: float,
    timeout_s: float | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Follow a run to its end with its log streamed into log_path; its final status row.

    A resumed run (config resume = true) keeps the earlier runs' log above a marker line.
    """
    earlier = earlier_log(log_path, run_id=run_id, resume=bool(config.get("resume")))
    with open(log_path, "wb") as log:
        log.write(earlier)
        log.flush()
        streamer = cli.stream_log(run_id, log)
        try:
            info = follow_run(
                cli,
                run_id,
                superlink=superlink,
                streamer=streamer,
                metrics=MetricsTail(
                    output_dir / METRICS_FILE, skip_existing=bool(config.get("resume"))
                ),
                config=config,
                poll_s=poll_s,
                timeout_s=timeout_s,
                say=say,
            )
            end_process(streamer, grace_s=30.0)
        finally:
            end_process(streamer, grace_s=0.0)
    # The live stream may have ended early (a dropped connection): fetch the whole log again
    save_run_log(cli, run_id, log_path, earlier=earlier)
    strip_colours(log_path)
    return info


def launch_and_follow(
    superlink: SuperLink,
    cli: FlowerCli,
    *,
    project_dir: Path,
    run_config: Mapping[str, Any],
    config: Mapping[str, Any],
    output_dir: Path,
    log_path: Path,
    poll_s: float,
    timeout_s: float | None,
    say: Callable[[str], None],
    federation_config: Mapping[str, Any] | None = None,
    on_start: Callable[[], None] | None = None,
    on_submit: Callable[[str], None] | None = None,
    keep_superlink: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Start the SuperLink, submit the app, follow the run to its end, stop the SuperLink.

    The one sequence of fedrec-simulate and fedrec-server: `on_start` runs once the SuperLink
    answers (deployment starts its gate and registers devices there), `on_submit` gets the run
    id as soon as there is one. Returns the run id and its final `flwr list` row, after
    printing how the run ended and, when it did not complete, the tail of its log. The
    SuperLink (and everything it started) is stopped on every way out, Ctrl-C and errors
    included, unless `keep_superlink`.
    """
    try:
        superlink.start()
        if on_start is not None:
            on_start()
        run_id = cli.run(
            project_dir,
            run_config=to_config_string(run_config),
            federation_config=(
                None if federation_config is None else to_config_string(federation_config)
            ),
        )
        if on_submit is not None:
            on_submit(run_id)
        info = follow_and_log(
            cli,
            run_id,
            superlink=superlink,
            output_dir=output_dir,
            log_path=log_path,
            config=config,
            poll_s=poll_s,
            timeout_s=timeout_s,
            say=say,
        )
        details = str(info.get("status-details") or "")
        shown = f": {details}" if details not in ("", "N/A") else ""
        say(f"\nRun {run_id} ended {info.get('status')}{shown}")
        if info.get("status") != COMPLETED:
            say(f"--- last lines of {log_path} ---\n{tail(log_path)}\n---")
        return run_id, info
    finally:
        if not (keep_superlink and superlink.is_running()):
            with uninterrupted():
                superlink.stop()
