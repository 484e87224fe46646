"""fedrec-simulate: run a scenario on this machine through a real Flower SuperLink.

The runner starts its own `flower-superlink --simulation` on a free local port with a private
FLWR_HOME under the output directory, submits the app with `flwr run`, prints one line per round
from the ServerApp's metrics.jsonl while the run goes, saves the run's log, stops the SuperLink
and writes the report (simulations/report.py).

A scenario is a TOML file:

    [scenario]                # optional
    name = "demo"             # default: the file name without .toml
    description = "..."
    [run]                     # run-config overrides ([tool.flwr.app.config] keys)
    num-server-rounds = 3
    [federation]              # simulated federation: `flwr run --federation-config`
    num-supernodes = 943
    client-resources-num-cpus = 1

Relative paths in [run] (data-path, cache-dir...) are relative to the directory the runner is
started in, as for the output directory. The run's status comes from `flwr list --run-id ID
--format json`, never from an exit code (`flwr` exits 0 on a failed run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pathspec

from simulations import report

PROJECT_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "fedrec-sim"  # the SuperLink connection's name in FLWR_HOME/config.toml
FINISHED = "finished"
COMPLETED = "finished:completed"

SCENARIO_TABLES = ("scenario", "run", "federation")
SCENARIO_KEYS = {"name": str, "description": str}
# `flwr run --federation-config` keys (fields of flwr's SimulationConfig, "_" spelled "-")
FEDERATION_KEYS: dict[str, type] = {
    "num-supernodes": int,
    "client-resources-num-cpus": int,
    "client-resources-num-gpus": float,
    "backend": str,
    "verbose": bool,
    "init-args-num-cpus": int,
    "init-args-num-gpus": int,
    "init-args-logging-level": str,
    "init-args-log-to-driver": bool,
}
# Flower's defaults (2 nodes, 2 CPUs each) are never what a scenario means: spell them out
REQUIRED_FEDERATION_KEYS = ("num-supernodes", "client-resources-num-cpus")

# Files a previous run left in an output directory (removed by --overwrite). "clients" holds
# the simulated clients' privacy ledgers: a fresh run must not inherit their spent budget.
RUN_ARTIFACTS = (
    report.METRICS_FILE,
    "clients",
    report.RESULTS_FILE,
    report.REPORT_FILE,
    report.PLOT_FILE,
    report.TENSORBOARD_DIR,
    "models",
    "server.log",
    "run.log",
    "superlink.log",
    "flwr-home",
)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ScenarioError(ValueError):
    """A scenario file, override or output directory that cannot be run."""


class RunnerError(RuntimeError):
    """The SuperLink or the flwr CLI did not behave as expected."""


# --- scenario -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A parsed scenario file."""

    name: str
    path: Path
    description: str = ""
    run: dict[str, Any] = field(default_factory=dict)  # run-config key -> TOML scalar
    federation: dict[str, Any] = field(default_factory=dict)  # federation-config key -> value


def load_scenario(path: str | Path) -> Scenario:
    """Parse and check a scenario TOML file (tables, keys, federation values)."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"Scenario file {path} does not exist.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"Scenario file {path} is not valid TOML: {exc}.") from None

    unknown = sorted(set(data) - set(SCENARIO_TABLES))
    if unknown:
        raise ScenarioError(
            f"Scenario file {path} has unknown table(s) or key(s) {', '.join(unknown)}; "
            f"the allowed tables are [{'], ['.join(SCENARIO_TABLES)}]."
        )
    for table in SCENARIO_TABLES:
        if not isinstance(data.get(table, {}), dict):
            raise ScenarioError(f"Scenario file {path}: '{table}' must be a table ([{table}]).")

    meta = data.get("scenario", {})
    _check_keys(meta, SCENARIO_KEYS, f"{path} [scenario]")
    name = meta.get("name", path.stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ScenarioError(
            f"{path} [scenario]: name {name!r} must be letters, digits, '.', '_' or '-' "
            "(it names the default output directory)."
        )

    federation = data.get("federation", {})
    _check_keys(federation, FEDERATION_KEYS, f"{path} [federation]")
    missing = [k for k in REQUIRED_FEDERATION_KEYS if k not in federation]
    if missing:
        raise ScenarioError(
            f"{path} [federation] must set {' and '.join(missing)} "
            "(Flower's defaults are 2 supernodes with 2 CPUs each)."
        )
    for key in ("num-supernodes", "client-resources-num-cpus"):
        if federation[key] < 1:
            raise ScenarioError(f"{path} [federation] {key} must be at least 1.")
    if federation.get("client-resources-num-gpus", 0) < 0:
        raise ScenarioError(f"{path} [federation] client-resources-num-gpus must be 0 or more.")

    run = flatten(data.get("run", {}))
    return Scenario(
        name=name,
        path=path.resolve(),
        description=meta.get("description", ""),
        run=run,
        federation={k: federation[k] for k in FEDERATION_KEYS if k in federation},
    )


def _check_keys(table: Mapping[str, Any], types: Mapping[str, type], where: str) -> None:
    for key, value in table.items():
        if key not in types:
            raise ScenarioError(
                f"{where}: unknown key {key!r}; allowed keys are {', '.join(types)}."
            )
        if not _is_type(value, types[key]):
            raise ScenarioError(f"{where}: {key} must be a {types[key].__name__}, got {value!r}.")


def _is_type(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables as dotted keys, as Flower flattens run configs."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# --- run config ---------------------------------------------------------------------------


def app_defaults(project_dir: str | Path) -> dict[str, Any]:
    """The app's run-config defaults: [tool.flwr.app.config] of its pyproject.toml."""
    pyproject = Path(project_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise ScenarioError(f"{project_dir} is not a Flower app: it has no pyproject.toml.")
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    try:
        return flatten(data["tool"]["flwr"]["app"]["config"])
    except KeyError:
        raise ScenarioError(f"{pyproject} has no [tool.flwr.app.config] table.") from None


def check_run_config(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides checked against the app's keys and value types (ints become floats for floats)."""
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in defaults:
            raise ScenarioError(
                f"Unknown run-config key {key!r}: the app's keys are {', '.join(defaults)}."
            )
        if isinstance(value, dict | list) or value is None:
            raise ScenarioError(f"Run-config {key} must be a bool, number or string: {value!r}.")
        kind = type(defaults[key])
        if not _is_type(value, kind):
            raise ScenarioError(
                f"Run-config {key} must be a {kind.__name__} like its default "
                f"{defaults[key]!r}, got {value!r}."
            )
        checked[key] = float(value) if kind is float else value
    return checked


def format_toml_value(value: Any) -> str:
    """A scalar as TOML for `flwr run --run-config` (strings quoted, bools lowercase)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest round-trip form: 0.001, 1e-05, 1.0
    if isinstance(value, str):
        # flwr splits the override string with a regex that ends a quoted value at its
        # first matching quote, so a value may not contain the quote that delimits it.
        if "'" not in value and not any(c in value for c in "\n\r\t"):
            return f"'{value}'"  # a TOML literal string: backslashes stay as they are
        if '"' not in value:
            return json.dumps(value, ensure_ascii=False)  # a basic string with escapes
        raise ScenarioError(
            f"The string {value!r} contains both kinds of quote; flwr --run-config cannot carry it."
        )
    raise ScenarioError(f"{value!r} is not a TOML scalar (bool, int, float or string).")


def to_config_string(values: Mapping[str, Any]) -> str:
    """key=value pairs as `flwr run --run-config` and `--federation-config` take them."""
    return " ".join(f"{key}={format_toml_value(value)}" for key, value in values.items())


def parse_config_string(text: str) -> dict[str, Any]:
    """The inverse of to_config_string (what `--run-config "k=v ..."` on our CLI means)."""
    # The same pattern flwr uses for its own --run-config
    pairs = re.findall(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", text)
    leftover = re.sub(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", "", text).strip()
    if leftover:
        raise ScenarioError(f"Cannot read {leftover!r} in --run-config: use key=value pairs.")
    try:
        return tomllib.loads("\n".join(f'"{key}" = {value}' for key, value in pairs))
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(
            f"--run-config {text!r} is not valid: values must be TOML (strings quoted, "
            f"e.g. dataset='ml-100k'); {exc}."
        ) from None


def resolve_output_dir(output: str | Path | None, run: Mapping[str, Any], name: str) -> Path:
    """--output, else the run config's output-dir, else outputs/<scenario name>; absolute."""
    chosen = output or run.get("output-dir") or Path("outputs") / name
    return Path(chosen).expanduser().resolve()


def check_output_dir(output: Path, project_dir: Path) -> None:
    """Refuse an output directory that `flwr run` would pack into the app bundle."""
    try:
        relative = output.relative_to(project_dir.resolve())
    except ValueError:
        return  # outside the project
    gitignore = project_dir / ".gitignore"
    lines = gitignore.read_text(encoding="utf-8").splitlines() if gitignore.exists() else []
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    if not spec.match_file(f"{relative.as_posix()}/metrics.jsonl"):
        raise ScenarioError(
            f"Output directory {output} lies inside the app ({project_dir}) and is not "
            "git-ignored, so `flwr run` would pack its files into the app bundle: choose a "
            "directory under outputs/ or outside the project."
        )


def prepare_output_dir(output: Path, *, resume: bool, overwrite: bool) -> None:
    """Create the output directory; refuse to mix a new run into an old run's metrics."""
    if (output / report.METRICS_FILE).exists() and not resume:
        if not overwrite:
            raise ScenarioError(
                f"{output} already holds a run ({report.METRICS_FILE} exists). Pass "
                "--overwrite to replace it, --output to write elsewhere, or set resume = true "
                "to continue it."
            )
        for name in RUN_ARTIFACTS:
            target = output / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    output.mkdir(parents=True, exist_ok=True)


# --- Flower processes ---------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def executable(name: str) -> str:
    """A Flower command from this Python's environment (the venv), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise RunnerError(f"`{name}` was not found: install flwr[simulation] in this environment.")
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process the runner starts."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            # no `uv sync` of the app's dependencies per run (slow, and fails offline)
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            # The SuperLink starts `flower-superexec` (and it `flwr-simulation`) by name:
            # put this Python's scripts first, so a venv works without being activated.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        }
    )
    return env


def write_flwr_config(flwr_home: Path, address: str) -> Path:
    """FLWR_HOME/config.toml with one insecure connection, CONNECTION, as the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n',
        encoding="utf-8",
    )
    return path


class SuperLink:
    """A `flower-superlink --simulation` process of our own, in its own process group."""

    def __init__(self, *, port: int, env: Mapping[str, str], log_path: Path):
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.env = dict(env)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the SuperLink and wait until its HTTP API answers /health."""
        command = [
            executable("flower-superlink"),
            "--insecure",
            "--simulation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                env=self.env,  # cwd is ours: relative paths in the run config mean the same
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our group: stopped together, untouched by Ctrl-C
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RunnerError(
                    f"flower-superlink exited with code {self.process.returncode} while "
                    f"starting:\n{tail(self.log_path)}"
                )
            if self.is_healthy():
                return
            time.sleep(0.2)
        self.stop()
        raise RunnerError(
            f"flower-superlink did not answer on {self.address} within {timeout_s:.0f} s:\n"
            f"{tail(self.log_path)}"
        )

    def is_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/health", timeout=1) as res:
                return res.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the SuperLink's process group (SuperExec, simulation), then SIGKILL."""
        if self.process is None:
            return
        group = self.process.pid  # start_new_session: the group id is the leader's pid
        descendants = _descendants(group)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
            for pid in descendants:  # e.g. Ray daemons that made their own session
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                continue
            if not any(_alive(pid) for pid in descendants):
                break
            time.sleep(1.0)

    def __enter__(self) -> SuperLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _descendants(pid: int) -> list[int]:
    """Process ids below pid (children, grandchildren...), from /proc; [] where unavailable."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a text file, without terminal colour codes."""
    if not path.exists():
        return f"({path} does not exist)"
    text = ANSI_ESCAPE.sub("", path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(text.splitlines()[-lines:])


# --- the flwr CLI -------------------------------------------------------------------------


class FlowerCli:
    """The `flwr` commands the runner uses, against one connection in one FLWR_HOME."""

    def __init__(self, *, env: Mapping[str, str], cwd: Path):
        self.flwr = executable("flwr")
        self.env = dict(env)
        self.cwd = cwd

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

    def run(self, project_dir: Path, *, run_config: str, federation_config: str) -> str:
        """Submit the app; its run id."""
        payload = self._json(
            [
                "run",
                str(project_dir),
                CONNECTION,
                "--run-config",
                run_config,
                "--federation-config",
                federation_config,
            ]
        )
        return str(payload["run-id"])

    def status(self, run_id: str) -> dict[str, Any]:
        """The run's row of `flwr list --run-id`: "status", "status-details", "elapsed"..."""
        payload = self._json(["list", CONNECTION, "--run-id", run_id], timeout_s=60.0)
        if not payload.get("runs"):
            raise RunnerError(f"`flwr list --run-id {run_id}` returned no run.")
        return payload["runs"][0]

    def stop(self, run_id: str) -> None:
        """Ask the SuperLink to stop a run (best effort)."""
        with contextlib.suppress(RunnerError, subprocess.TimeoutExpired):
            self._json(["stop", run_id, CONNECTION], timeout_s=60.0)

    def stream_log(self, run_id: str, log: IO[bytes]) -> subprocess.Popen:
        """`flwr log --stream` into a file; it exits once the run has finished."""
        return subprocess.Popen(
            [self.flwr, "log", run_id, CONNECTION, "--stream"],
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


# --- following a run ----------------------------------------------------------------------


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
                    rows.append(report.parse_metrics_line(line, where=f"{self.path} line"))
                except ValueError as exc:
                    print(f"warning: {exc}", file=sys.stderr)
        return rows


def progress_header(row: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The line printed once before the first round: what the epsilon column means."""
    if report.number(row.get("epsilon_max")) is None and not config.get("dp-enabled"):
        return "Differential privacy is off: no epsilon is reported."
    delta = row.get("dp_delta", config.get("dp-delta"))
    unit = row.get("epsilon_unit") or "record"
    return (
        f"eps = largest epsilon over clients ({unit}-level, delta={delta}, "
        f"{row.get('accountant') or 'rdp'} accountant, "
        f"{row.get('composition') or 'cumulative'} over rounds)"
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
    if (loss := report.number(row.get("train_loss"))) is not None:
        parts.append(f"loss {loss:.4f}")
    for split in ("val", "fed", "test"):  # the first present: val preferred over fed
        if (hr := report.number(row.get(f"{split}_hr@10"))) is not None:
            parts.append(f"HR@10 {split} {hr:.4f}")
            break
    ndcg = [
        f"{split} {v:.4f}"
        for split in ("fed", "val", "test")
        if (v := report.number(row.get(f"{split}_ndcg@10"))) is not None
    ]
    if ndcg:
        parts.append("NDCG@10 " + " ".join(ndcg))
    if (eps := report.number(row.get("epsilon_max"))) is not None:
        parts.append(f"eps {eps:.3f}")
    elapsed = report.number(row.get("elapsed_s"))
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


def end_process(process: subprocess.Popen, grace_s: float) -> None:
    """Wait up to grace_s for a process to exit, then terminate (and if need be kill) it."""
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def save_run_log(cli: FlowerCli, run_id: str, path: Path) -> None:
    """The whole log of a finished run into path (`flwr log --stream` returns at the end)."""
    with open(path, "wb") as log:
        process = cli.stream_log(run_id, log)
        end_process(process, grace_s=120.0)


def strip_colours(path: Path) -> None:
    """Remove terminal colour codes from a log file in place."""
    if path.exists():
        text = path.read_text(encoding="utf-8", errors="replace")
        path.write_text(ANSI_ESCAPE.sub("", text), encoding="utf-8")


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM for a moment (while stopping processes), in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_app_config(project_dir: Path, config: Mapping[str, Any]) -> None:
    """For this project's own app, the cross-field rules of common.config.Config."""
    if project_dir != PROJECT_DIR:
        return  # another Flower app: only its keys and types were checked
    from common.config import Config  # the fedrec app's rules; not needed for other apps

    try:
        Config.from_mapping(config)
    except ValueError as exc:
        raise ScenarioError(f"Invalid run config: {exc}") from None


@dataclass
class RunOutcome:
    """What a simulation ended with."""

    status: str
    run_id: str | None
    output_dir: Path
    wall_s: float
    superlink_pid: int | None
    results: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED


def run_scenario(
    scenario: Scenario,
    *,
    output: str | Path | None = None,
    run_overrides: Mapping[str, Any] | None = None,
    port: int | None = None,
    keep_superlink: bool = False,
    overwrite: bool = False,
    project_dir: str | Path = PROJECT_DIR,
    poll_s: float = 10.0,
    timeout_s: float | None = None,
    out: IO[str] | None = None,
) -> RunOutcome:
    """Run one scenario end to end; the report is written whenever a run was submitted."""
    stream = out or sys.stdout

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    # 1. Configuration, checked before anything starts
    project_dir = Path(project_dir).resolve()
    defaults = app_defaults(project_dir)
    overrides = {**scenario.run, **(run_overrides or {})}
    output_dir = resolve_output_dir(output, overrides, scenario.name)
    overrides["output-dir"] = str(output_dir)
    overrides = check_run_config(overrides, defaults)
    config = {**defaults, **overrides}
    check_app_config(project_dir, config)
    check_output_dir(output_dir, project_dir)
    prepare_output_dir(output_dir, resume=bool(config.get("resume")), overwrite=overwrite)

    # 2. Our own SuperLink, FLWR_HOME and connection
    flwr_home = output_dir / "flwr-home"
    env = flower_env(flwr_home)
    superlink = SuperLink(port=port or free_port(), env=env, log_path=output_dir / "superlink.log")
    write_flwr_config(flwr_home, superlink.address)
    cli = FlowerCli(env=env, cwd=output_dir)
    log_path = output_dir / "run.log"
    run_id: str | None = None
    status = "not started"
    started = time.monotonic()
    error: BaseException | None = None
    say(f"Scenario {scenario.name}: {scenario.description.strip() or scenario.path}")
    say(f"Output: {output_dir}")
    try:
        superlink.start()
        say(f"SuperLink on {superlink.address} (pid {superlink.pid}), FLWR_HOME={flwr_home}")

        # 3. Submit, then follow: rounds from metrics.jsonl, status from `flwr list`
        run_id = cli.run(
            project_dir,
            run_config=to_config_string(overrides),
            federation_config=to_config_string(scenario.federation),
        )
        started = time.monotonic()
        say(f"Run {run_id} submitted: {to_config_string(scenario.federation)}")
        status = "running"
        with open(log_path, "wb") as log:
            streamer = cli.stream_log(run_id, log)
            try:
                info = follow_run(
                    cli,
                    run_id,
                    superlink=superlink,
                    streamer=streamer,
                    metrics=MetricsTail(
                        output_dir / report.METRICS_FILE,
                        skip_existing=bool(config.get("resume")),
                    ),
                    config=config,
                    poll_s=poll_s,
                    timeout_s=timeout_s,
                    say=say,
                )
                end_process(streamer, grace_s=30.0)
            finally:
                end_process(streamer, grace_s=0.0)
        status = str(info["status"])
        # The live stream may have ended early (a dropped connection): fetch the whole log again
        save_run_log(cli, run_id, log_path)
        strip_colours(log_path)
        if status != COMPLETED:
            say(f"\nRun {run_id} ended {status}: {info.get('status-details', '')}")
            say(f"--- last lines of {log_path} ---\n{tail(log_path)}\n---")
    except BaseException as exc:  # Ctrl-C included: stop what we started, report, re-raise
        error = exc
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "runner error"
    finally:
        wall_s = time.monotonic() - started
        if keep_superlink and superlink.is_running():
            say(
                f"SuperLink left running: pid {superlink.pid} on {superlink.address}. "
                f"Use it with FLWR_HOME={flwr_home} flwr list {CONNECTION}; "
                f"stop it with kill -TERM -{superlink.pid}."
            )
        else:
            with uninterrupted():
                superlink.stop()

    # 4. The report, whatever the status, once a run was submitted
    results = None
    if run_id is not None:
        try:
            results = report.write_report(
                output_dir,
                scenario={
                    "name": scenario.name,
                    "description": scenario.description,
                    "path": str(scenario.path),
                },
                config=config,
                overrides=sorted(set(scenario.run) | set(run_overrides or {}) | {"output-dir"}),
                federation=scenario.federation,
                status=status,
                run_id=run_id,
                wall_s=round(wall_s, 3),
            )
        except Exception as exc:
            if error is None:
                raise
            say(f"(The report could not be written either: {exc})")
    if error is not None:
        raise error
    if results is not None:
        say("")
        say(report.summary_text(results))
        say(f"\nReport: {output_dir / report.REPORT_FILE}")
    return RunOutcome(
        status=status,
        run_id=run_id,
        output_dir=output_dir,
        wall_s=wall_s,
        superlink_pid=superlink.pid,
        results=results,
    )


# --- command line -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedrec-simulate",
        description=(
            "Run a fedrec scenario on this machine: start a private Flower SuperLink in\n"
            "simulation mode, submit the app with the scenario's run config and federation\n"
            "size, print one line per round, stop the SuperLink and write the report\n"
            "(results.json, report.md, metrics.png, tensorboard/) into the output directory."
        ),
        epilog=(
            "Examples:\n"
            "  fedrec-simulate --config simulations/configs/demo.toml\n"
            "  fedrec-simulate --config simulations/configs/demo.toml "
            '--run-config "num-server-rounds=1 dp-enabled=false" --output /tmp/demo\n'
            "Exit status: 0 when the run finished:completed, 1 otherwise, 2 for a bad "
            "scenario or option, 130 when interrupted."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        required=True,
        type=Path,
        metavar="TOML",
        help="scenario file with [scenario], [run] (run-config overrides) and [federation] "
        "(num-supernodes, client-resources-num-cpus, client-resources-num-gpus)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="output directory (default: the scenario's output-dir, else outputs/<name>)",
    )
    parser.add_argument(
        "--run-config",
        default="",
        metavar='"KEY=VALUE ..."',
        help="more run-config overrides, TOML values (strings quoted), applied over [run]",
    )
    parser.add_argument(
        "--port", type=int, help="SuperLink port on 127.0.0.1 (default: a free port)"
    )
    parser.add_argument(
        "--keep-superlink",
        action="store_true",
        help="leave the SuperLink running afterwards (for `flwr list`/`flwr log`)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in the output directory",
    )
    parser.add_argument(
        "--project",
        type=Path,
        default=PROJECT_DIR,
        metavar="DIR",
        help=f"the Flower app to run (default: {PROJECT_DIR})",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        metavar="S",
        help="stop the run (flwr stop) after this many seconds",
    )
    parser.add_argument(
        "--poll-s",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between `flwr list` status queries (default: 10)",
    )
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """The `fedrec-simulate` command."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up like Ctrl-C does
    try:
        scenario = load_scenario(args.config)
        outcome = run_scenario(
            scenario,
            output=args.output,
            run_overrides=parse_config_string(args.run_config),
            port=args.port,
            keep_superlink=args.keep_superlink,
            overwrite=args.overwrite,
            project_dir=args.project,
            poll_s=args.poll_s,
            timeout_s=args.timeout_s,
        )
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = " (the SuperLink was left running)" if args.keep_superlink else ""
        print(f"Interrupted: the runner stopped{kept}.", file=sys.stderr)
        return 130
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
