"""Flower's processes: SuperLink and SuperNode in their own process groups, their environment
and FLWR_HOME config, and stopping them with everything they started (psutil).
"""

from __future__ import annotations

import contextlib
import json
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
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from common.flower.config import ConfigError, to_config_string

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RunnerError(RuntimeError):
    """A Flower process or the flwr CLI did not behave as expected."""


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


INTERRUPTED = 130  # exit status of a command stopped by Ctrl-C or SIGTERM (128 + SIGINT)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """From now on SIGTERM raises KeyboardInterrupt, so `kill` cleans up as Ctrl-C does (the
    command then exits with INTERRUPTED)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
