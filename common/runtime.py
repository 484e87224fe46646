"""Flower's runtime from Python: SuperLink and SuperNode processes, the `flwr` CLI, run configs.

Shared by fedrec-simulate (a simulation SuperLink on loopback), fedrec-server (a SuperLink with
TLS and SuperNode authentication) and fedrec-client (a SuperNode). Every process is started in
its own process group, so stopping it also stops what it started (SuperExec, ServerApp,
ClientApps). Run status always comes from `flwr list --format json`: `flwr` exits 0 on a failed
run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pathspec
import psutil

from common.files import METRICS_FILE
from common.metrics import finite_number
from common.rounds import parse_row

log = logging.getLogger(__name__)

FINISHED = "finished"
COMPLETED = "finished:completed"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ConfigError(ValueError):
    """A run config, option or output directory that cannot be run."""


class RunnerError(RuntimeError):
    """A Flower process or the flwr CLI did not behave as expected."""


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


def app_defaults(project_dir: str | Path) -> dict[str, Any]:
    """The app's run-config defaults: [tool.flwr.app.config] of its pyproject.toml."""
    pyproject = Path(project_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(f"{project_dir} is not a Flower app: it has no pyproject.toml.")
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    try:
        return flatten(data["tool"]["flwr"]["app"]["config"])
    except KeyError:
        raise ConfigError(f"{pyproject} has no [tool.flwr.app.config] table.") from None


def check_run_config(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides checked against the app's keys and value types (ints become floats for floats)."""
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in defaults:
            raise ConfigError(
                f"Unknown run-config key {key!r}: the app's keys are {', '.join(defaults)}."
            )
        if isinstance(value, dict | list) or value is None:
            raise ConfigError(f"Run-config {key} must be a bool, number or string: {value!r}.")
        kind = type(defaults[key])
        if not _is_type(value, kind):
            raise ConfigError(
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
        raise ConfigError(
            f"The string {value!r} contains both kinds of quote; flwr --run-config cannot carry it."
        )
    raise ConfigError(f"{value!r} is not a TOML scalar (bool, int, float or string).")


def to_config_string(values: Mapping[str, Any]) -> str:
    """key=value pairs as `flwr run --run-config` and `--federation-config` take them."""
    return " ".join(f"{key}={format_toml_value(value)}" for key, value in values.items())


def parse_config_string(text: str) -> dict[str, Any]:
    """The inverse of to_config_string (what `--run-config "k=v ..."` on our CLI means)."""
    # The same pattern flwr uses for its own --run-config
    pairs = re.findall(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", text)
    leftover = re.sub(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", "", text).strip()
    if leftover:
        raise ConfigError(f"Cannot read {leftover!r} in --run-config: use key=value pairs.")
    try:
        return tomllib.loads("\n".join(f'"{key}" = {value}' for key, value in pairs))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"--run-config {text!r} is not valid: values must be TOML (strings quoted, "
            f"e.g. dataset='ml-100k'); {exc}."
        ) from None


def check_output_dir(output: Path, project_dir: Path, *, what: str = "Output directory") -> None:
    """Refuse a directory that `flwr run` would pack into the app bundle (and so send to
    every node): one inside the project that .gitignore does not exclude."""
    try:
        relative = output.relative_to(project_dir.resolve())
    except ValueError:
        return  # outside the project
    gitignore = project_dir / ".gitignore"
    lines = gitignore.read_text(encoding="utf-8").splitlines() if gitignore.exists() else []
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    if not spec.match_file(f"{relative.as_posix()}/metrics.jsonl"):
        raise ConfigError(
            f"{what} {output} lies inside the app ({project_dir}) and is not git-ignored, so "
            "`flwr run` would pack its files into the app bundle: choose a directory under "
            "outputs/ or outside the project."
        )


def prepare_output_dir(
    output: Path, *, resume: bool, overwrite: bool, artifacts: Sequence[str]
) -> None:
    """Create the output directory; refuse to mix a new run into an old run's metrics.

    With `overwrite`, the `artifacts` a previous run left (names inside `output`) are removed.
    """
    if (output / METRICS_FILE).exists() and not resume:
        if not overwrite:
            raise ConfigError(
                f"{output} already holds a run ({METRICS_FILE} exists). Pass "
                "--overwrite to replace it, --output to write elsewhere, or set resume = true "
                "to continue it."
            )
        for name in artifacts:
            target = output / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    output.mkdir(parents=True, exist_ok=True)


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


def write_flwr_config(
    flwr_home: Path, *, connection: str, address: str, root_certificates: Path | None = None
) -> Path:
    """FLWR_HOME/config.toml with one connection, the default: TLS with a CA file, else insecure."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    security = (
        f"root-certificates = {json.dumps(str(root_certificates))}\n"
        if root_certificates
        else "insecure = true\n"
    )
    path.write_text(
        f'[superlink]\ndefault = "{connection}"\n\n'
        f'[superlink.{connection}]\naddress = "{address}"\n{security}',
        encoding="utf-8",
    )
    return path


@dataclass(frozen=True)
class Tls:
    """The server side of TLS: the CA certificate, the server certificate and its key."""

    ca_cert: Path
    cert: Path
    key: Path


class FlowerProcess:
    """A long-running Flower command in its own process group, logging to a file."""

    name = "flower process"

    def __init__(self, *, command: Sequence[str], env: Mapping[str, str], log_path: Path):
        self.command = list(command)
        self.env = dict(env)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process else None

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the command and wait until it is ready (`is_ready`)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,  # cwd is ours: relative paths in configs mean the same
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our group: stopped together, untouched by Ctrl-C
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RunnerError(
                    f"{self.name} exited with code {self.process.returncode} while "
                    f"starting:\n{tail(self.log_path)}"
                )
            if self.is_ready():
                return
            time.sleep(0.2)
        self.stop()
        raise RunnerError(
            f"{self.name} was not ready within {timeout_s:.0f} s:\n{tail(self.log_path)}"
        )

    def is_ready(self) -> bool:
        return True

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 20.0, *, sig: signal.Signals = signal.SIGTERM) -> None:
        """Signal the process group and every stray (descendants in other sessions, such as
        Ray's daemons, and processes started with our FLWR_HOME), then SIGKILL what is left."""
        if self.process is None:
            return
        group = self.process.pid  # start_new_session: the group id is the leader's pid
        strays = set(_descendants(group)) | set(self._with_our_home())
        for current in (sig, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, current)
            for pid in strays:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, current)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                continue
            deadline = time.monotonic() + 5.0  # strays exit a moment after their parent
            while time.monotonic() < deadline and any(_alive(pid) for pid in strays):
                time.sleep(0.2)
            # a process started while we were stopping (a Ray worker mid-spawn) is caught too
            strays = {p for p in strays if _alive(p)} | set(self._with_our_home())
            if not strays:
                break

    def _with_our_home(self) -> list[int]:
        """Live processes whose environment holds this process's FLWR_HOME."""
        home = self.env.get("FLWR_HOME")
        return processes_with_env("FLWR_HOME", home) if home else []

    def kill(self) -> None:
        """SIGKILL the whole group at once: a crash, not a shutdown."""
        self.stop(timeout_s=10.0, sig=signal.SIGKILL)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SuperLink(FlowerProcess):
    """`flower-superlink`: for simulation, or for deployment with TLS and SuperNode auth."""

    name = "flower-superlink"

    def __init__(
        self,
        *,
        port: int,
        env: Mapping[str, str],
        log_path: Path,
        host: str = "127.0.0.1",
        simulation: bool = False,
        tls: Tls | None = None,
        supernode_auth: bool = False,
        database: Path | None = None,
    ):
        if supernode_auth and tls is None:
            raise ConfigError("SuperNode authentication needs TLS: give certificates.")
        command = [executable("flower-superlink"), "--host", host, "--port", str(port)]
        if simulation:
            command.append("--simulation")
        if tls is None:
            command.append("--insecure")
        else:
            command += ["--ssl-ca-certfile", str(tls.ca_cert)]
            command += ["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
        if supernode_auth:
            command.append("--enable-supernode-auth")
        if database is not None:
            command += ["--database", str(database)]
        command.append("--disable-runtime-dependency-installation")
        super().__init__(command=command, env=env, log_path=log_path)
        self.port = port
        self.tls = tls
        # where this machine reaches it (a wildcard bind is reached on loopback)
        local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.address = f"{local}:{port}"

    def is_ready(self) -> bool:
        """Whether its HTTP API answers /health (over TLS, checked against our CA)."""
        scheme, context = "http", None
        if self.tls is not None:
            scheme, context = "https", ssl.create_default_context(cafile=str(self.tls.ca_cert))
        try:
            url = f"{scheme}://{self.address}/health"
            with urllib.request.urlopen(url, timeout=1, context=context) as res:
                return res.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def is_healthy(self) -> bool:
        return self.is_ready()


class SuperNode(FlowerProcess):
    """`flower-supernode`: one device in a federation, running a ClientApp per message."""

    name = "flower-supernode"

    def __init__(
        self,
        *,
        superlink: str,
        env: Mapping[str, str],
        log_path: Path,
        port: int,
        node_config: Mapping[str, Any],
        root_certificates: Path | None = None,
        private_key: Path | None = None,
        max_wait_s: float | None = None,
    ):
        command = [executable("flower-supernode"), "--superlink", superlink]
        if root_certificates is None:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(root_certificates)]
        if private_key is not None:
            command += ["--auth-supernode-private-key", str(private_key)]
        if max_wait_s is not None:
            command += ["--max-wait-time", str(max_wait_s)]
        command += ["--port", str(port), "--node-config", to_config_string(node_config)]
        super().__init__(command=command, env=env, log_path=log_path)


def processes_with_env(key: str, value: str) -> list[int]:
    """Live processes (other than this one) whose environment sets key=value."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(key) == value and _alive(proc.pid):
                found.append(proc.pid)
        except (psutil.Error, OSError):  # gone, or not ours to read
            continue
    return found


def _descendants(pid: int) -> list[int]:
    """Process ids below pid (children, grandchildren...); [] when pid is gone."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a text file, without terminal colour codes."""
    if not path.exists():
        return f"({path} does not exist)"
    text = ANSI_ESCAPE.sub("", path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(text.splitlines()[-lines:])


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


def save_run_log(cli: FlowerCli, run_id: str, path: Path, *, earlier: bytes = b"") -> None:
    """The whole log of a finished run into path (`flwr log --stream` returns at the end),
    after `earlier` (the log of the runs a resumed run continues)."""
    with open(path, "wb") as log:
        log.write(earlier)
        log.flush()
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
