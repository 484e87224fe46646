"""A real deployment on one machine: fedrec-server and fedrec-client processes on loopback.

Drives the same commands an operator and device owners type (TLS, device keys, a SuperLink
and one SuperNode per device), for the end-to-end tests and the deployment benchmark:

    with LoopbackFederation(root, catalog=..., server_data=..., run_config={...}) as fed:
        fed.add_devices({"dev-a": "a.csv", "dev-b": "b.csv"})
        fed.start_server()
        fed.start_device("dev-a"); fed.start_device("dev-b")
        assert fed.wait_server(600) == 0
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.flower.cli import FlowerCli
from common.flower.config import format_toml_value
from common.flower.processes import RunnerError, flower_env, free_port, tail, write_flwr_config
from common.rounds import read_rows

STARTED = re.compile(r"SuperNode started \(pid (\d+)\)")


@dataclass
class Device:
    """One device: its files and its `fedrec-client join` process."""

    name: str
    data: Path
    state_dir: Path
    key: Path
    out: Path
    process: subprocess.Popen | None = None


class LoopbackFederation:
    """A server home, devices and their processes under one directory."""

    def __init__(
        self,
        root: Path,
        *,
        catalog: Path,
        server_data: Path | None,
        run_config: Mapping[str, Any],
        backbone: Path | None = None,
    ):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = self.root / "server"
        self.output = self.root / "server-run"
        self.catalog = Path(catalog).resolve()
        self.backbone = backbone
        files = {"dataset": "path", "data-path": str(server_data)} if server_data else {}
        self.run_config = {**files, **run_config}
        if backbone is not None:
            self.run_config["backbone"] = str(backbone)
        self.port = free_port()
        self.devices: dict[str, Device] = {}
        self.server: subprocess.Popen | None = None
        self.groups: set[int] = set()  # process groups we started (each leader's pid)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self._cli("server", "init", "--host", "localhost")

    # --- commands -----------------------------------------------------------------------

    def _command(self, tool: str, *args: str) -> list[str]:
        module = {"server": "server.deploy", "client": "client.device"}[tool]
        home = ["--home", str(self.home)] if tool == "server" else []
        return [sys.executable, "-m", module, *home, *args]

    def _cli(self, tool: str, *args: str) -> str:
        done = subprocess.run(
            self._command(tool, *args), env=self.env, capture_output=True, text=True, timeout=300
        )
        if done.returncode:
            raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def _spawn(self, command: list[str], out: Path) -> subprocess.Popen:
        with open(out, "ab") as fh:
            process = subprocess.Popen(
                command, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.groups.add(process.pid)
        return process

    # --- devices ------------------------------------------------------------------------

    def add_devices(self, files: Mapping[str, Path]) -> None:
        """Register devices with the server (`fedrec-server device add`)."""
        for name, data in files.items():
            self._cli("server", "device", "add", name)
            self.devices[name] = self._device(name, data, self.home / "devices" / f"{name}.key")

    def outsider(self, name: str, data: Path) -> Device:
        """A device with a key of its own that the server never registered."""
        keys = self.root / "outsider-keys"
        self._cli("client", "keygen", "--name", name, "--out", str(keys))
        self.devices[name] = self._device(name, data, keys / f"{name}.key")
        return self.devices[name]

    def _device(self, name: str, data: Path, key: Path) -> Device:
        return Device(
            name=name,
            data=Path(data).resolve(),
            state_dir=self.root / "devices" / name,
            key=key,
            out=self.root / f"{name}.out",
        )

    def node_ids(self) -> dict[str, int | None]:
        """Each registered device's node id, once `fedrec-server run` registered it."""
        path = self.home / "devices.json"
        registry = json.loads(path.read_text()) if path.exists() else {}
        return {name: entry.get("node_id") for name, entry in registry.items()}

    def start_device(self, name: str) -> Device:
        device = self.devices[name]
        command = self._command(
            "client",
            "join",
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--root-certificates",
            str(self.home / "certs" / "ca.crt"),
            "--key",
            str(device.key),
            "--data",
            str(device.data),
            "--catalog",
            str(self.catalog),
            "--state-dir",
            str(device.state_dir),
            "--port",
            str(free_port()),
            *(["--backbone", str(self.backbone)] if self.backbone else []),
        )
        device.process = self._spawn(command, device.out)
        return device

    def supernode_pid(self, name: str, timeout_s: float = 60.0) -> int:
        """The pid of a device's SuperNode, from its `join` output."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = self.devices[name].out
            found = STARTED.findall(out.read_text()) if out.exists() else []
            if found:
                self.groups.add(int(found[-1]))
                return int(found[-1])
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not start its SuperNode:\n{tail(self.devices[name].out)}")

    def wait_until_active(self, name: str, timeout_s: float = 120.0) -> None:
        """Until a device's SuperNode was accepted by the SuperLink (it logs its node id)."""
        log = self.devices[name].state_dir / "supernode.log"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if log.exists() and "SuperNode ID:" in log.read_text(errors="replace"):
                return
            time.sleep(0.3)
        raise TimeoutError(f"{name} was not accepted by the SuperLink:\n{tail(log)}")

    def revoke(self, name: str) -> None:
        """`fedrec-server device revoke NAME`."""
        self._cli("server", "device", "revoke", name)

    def crash_device(self, name: str) -> None:
        """SIGKILL a device's SuperNode and everything it started: a crash, not a stop."""
        pid = self.supernode_pid(name)
        os.killpg(pid, signal.SIGKILL)  # the SuperNode leads its own process group
        process = self.devices[name].process
        if process is not None:
            process.wait(timeout=60)

    # --- the server ---------------------------------------------------------------------

    def start_server(self, *, timeout_s: float = 120.0, extra: list[str] = ()) -> None:
        """`fedrec-server run`, returning once every added device is registered."""
        config = self.root / "run.toml"
        lines = [f"{key} = {format_toml_value(v)}" for key, v in self.run_config.items()]
        config.write_text("[run]\n" + "\n".join(lines) + "\n")
        command = self._command(
            "server",
            "run",
            "--config",
            str(config),
            "--port",
            str(self.port),
            "--output",
            str(self.output),
            *extra,
        )
        self.server = self._spawn(command, self.root / "server.out")
        deadline = time.monotonic() + timeout_s
        wanted = set(self.node_ids())
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"fedrec-server exited:\n{tail(self.root / 'server.out')}")
            ids = self.node_ids()
            live = self.home / "superlink.json"
            if all(ids.get(n) is not None for n in wanted) and live.exists():
                self.groups.add(int(json.loads(live.read_text())["pid"]))
                return
            time.sleep(0.3)
        raise TimeoutError(f"No devices registered:\n{tail(self.root / 'server.out')}")

    def probe_control_api(self, work: Path, public_key: Path) -> dict[str, str | None]:
        """What someone with nothing but ca.crt gets from the Control API at the devices'
        address: each attempt's error (None if it went through)."""
        from server.deploy import PROJECT_DIR

        home = Path(work) / "outsider-flwr-home"
        write_flwr_config(
            home,
            connection="probe",
            address=f"127.0.0.1:{self.port}",
            root_certificates=self.home / "certs" / "ca.crt",
        )
        probe = FlowerCli(env=flower_env(home), cwd=Path(work), connection="probe")
        attempts = {
            "list_nodes": probe.nodes,
            "list_runs": lambda: probe.status("1"),
            "register_node": lambda: probe.register_node(public_key, name="outsider"),
            "submit_run": lambda: probe.run(PROJECT_DIR, run_config=""),
        }
        errors: dict[str, str | None] = {}
        for what, attempt in attempts.items():
            try:
                attempt()
                errors[what] = None
            except RunnerError as exc:
                lines = [line for line in str(exc).splitlines() if line.strip()]
                errors[what] = lines[-1].strip()[:200]  # the CLI's last word: why it failed
        return errors

    def wait_server(self, timeout_s: float) -> int:
        assert self.server is not None
        return self.server.wait(timeout=timeout_s)

    def rounds(self) -> list[dict[str, Any]]:
        path = self.output / "metrics.jsonl"
        return read_rows(path) if path.exists() else []

    def wait_for_round(self, round_: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(r.get("round", 0) >= round_ for r in self.rounds()):
                return
            if self.server is not None and self.server.poll() is not None:
                raise RuntimeError(f"fedrec-server exited:\n{tail(self.root / 'server.out')}")
            time.sleep(0.5)
        raise TimeoutError(f"Round {round_} did not finish within {timeout_s:.0f} s.")

    # --- cleanup ------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM every process we started (each stops its own children), then SIGKILL."""
        processes = [d.process for d in self.devices.values() if d.process] + [self.server]
        for process in [p for p in processes if p is not None and p.poll() is None]:
            process.send_signal(signal.SIGTERM)
        for process in [p for p in processes if p is not None]:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def leftovers(self) -> list[str]:
        """Live processes in a group we started, or whose command names our directory."""
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                text = (
                    (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
                )
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            state, group = fields[0], int(fields[2])
            ours = group in self.groups or str(self.root) in text
            if ours and state != "Z" and int(proc.name) != os.getpid():
                found.append(f"{proc.name}: {text.strip()}")
        return found

    def __enter__(self) -> LoopbackFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
