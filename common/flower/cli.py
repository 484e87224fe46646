"""The `flwr` CLI from Python: submit, status, stop, logs and SuperNode registration against
one connection. Run status always comes from `flwr list --format json`: `flwr` exits 0 on a
failed run.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from common.flower.processes import ANSI_ESCAPE, RunnerError, end_process, executable

FINISHED = "finished"


COMPLETED = "finished:completed"


class FlowerCli:
    """The `flwr` commands fedrec uses, against one connection in one FLWR_HOME."""

    def __init__(self, *, env: Mapping[str, str], cwd: Path, connection: str):
        self.flwr = executable("flwr")
        self.env = dict(env)
        self.cwd = cwd
        self.connection = connection

    def _json(self, args: Sequence[str], timeout_s: float = 120.0) -> dict[str, Any]:
        done = subprocess.run(
            [self.flwr, *args, "--format", "json"],
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        # The exit code means nothing (errors exit 0 in JSON mode): read "success"
        start = done.stdout.find("{")
        try:
            payload, _ = json.JSONDecoder().raw_decode(done.stdout[start:])
        except (json.JSONDecodeError, ValueError):
            raise RunnerError(
                f"`flwr {' '.join(args)}` printed no JSON (exit code {done.returncode}):\n"
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
            ) from None
        if not payload.get("success"):
            message = ANSI_ESCAPE.sub("", str(payload.get("error-message", payload)))
            raise RunnerError(f"`flwr {args[0]}` failed: {message}")
        return payload

    def run(
        self, project_dir: Path, *, run_config: str, federation_config: str | None = None
    ) -> str:
        """Submit the app; its run id."""
        args = ["run", str(project_dir), self.connection, "--run-config", run_config]
        if federation_config is not None:
            args += ["--federation-config", federation_config]
        return str(self._json(args)["run-id"])

    def status(self, run_id: str) -> dict[str, Any]:
        """The run's row of `flwr list --run-id`: "status", "status-details", "elapsed"..."""
        payload = self._json(["list", self.connection, "--run-id", run_id], timeout_s=60.0)
        if not payload.get("runs"):
            raise RunnerError(f"`flwr list --run-id {run_id}` returned no run.")
        return payload["runs"][0]

    def stop(self, run_id: str) -> None:
        """Ask the SuperLink to stop a run (best effort)."""
        with contextlib.suppress(RunnerError, subprocess.TimeoutExpired):
            self._json(["stop", run_id, self.connection], timeout_s=60.0)

    def stream_log(self, run_id: str, log: IO[bytes]) -> subprocess.Popen:
        """`flwr log --stream` into a file; it exits once the run has finished."""
        return subprocess.Popen(
            [self.flwr, "log", run_id, self.connection, "--stream"],
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def register_node(self, public_key: Path, *, name: str) -> int:
        """Register a SuperNode's public key (`flwr supernode register`); its node id."""
        payload = self._json(
            ["supernode", "register", str(public_key), self.connection, "--name", name]
        )
        return int(payload["node-id"])

    def unregister_node(self, node_id: int) -> None:
        """Remove a SuperNode: its key is refused from now on."""
        self._json(["supernode", "unregister", str(node_id), self.connection])

    def nodes(self) -> list[dict[str, Any]]:
        """The registered SuperNodes (`flwr supernode list`)."""
        return list(self._json(["supernode", "list", self.connection])["nodes"])


def save_run_log(cli: FlowerCli, run_id: str, path: Path, *, earlier: bytes = b"") -> None:
    """The whole log of a finished run into path (`flwr log --stream` returns at the end),
    after `earlier` (the log of the runs a resumed run continues)."""
    with open(path, "wb") as log:
        log.write(earlier)
        log.flush()
        process = cli.stream_log(run_id, log)
        end_process(process, grace_s=120.0)


def earlier_log(log_path: Path, *, run_id: str, resume: bool) -> bytes:
    """What a run's log starts with: nothing, or when it resumes an earlier run, that run's
    log and a marker line."""
    if not resume or not log_path.exists():
        return b""
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    marker = (
        f"\n===== fedrec: resumed as Flower run {run_id} at {now}. Flower's [ROUND k/N] lines "
        "count this run's rounds; fedrec's 'Round N' lines and metrics.jsonl the whole run's. "
        "=====\n"
    )
    return log_path.read_bytes() + marker.encode()


def strip_colours(path: Path) -> None:
    """Remove terminal colour codes from a log file in place."""
    if path.exists():
        text = path.read_text(encoding="utf-8", errors="replace")
        path.write_text(ANSI_ESCAPE.sub("", text), encoding="utf-8")
