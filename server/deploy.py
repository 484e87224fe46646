"""fedrec-server: the aggregation server of a real federation, on Flower's SuperLink.

The server's home directory holds everything that outlives a run:

    HOME/certs/        ca.crt, ca.key, server.crt, server.key   (fedrec-server init)
    HOME/devices/      NAME.pub (and NAME.key when the server made the key pair)
    HOME/devices.json  the device registry: key fingerprint, node id, active or revoked
    HOME/superlink.db  the SuperLink's state (registered nodes, runs), kept across restarts
    HOME/flwr-home/    FLWR_HOME of the `flwr` CLI: one connection to our SuperLink
    HOME/superlink.json  while `run` goes: the SuperLink's address and pid

`run` starts the SuperLink with TLS and SuperNode authentication (`--insecure` for local
experiments only), registers active devices and unregisters revoked ones, submits the fedrec
app with the given run config, prints a line per round, and exits 0 only when the run finished
`completed`. The ServerApp writes the global model of every round, the final model, the
metrics and the model pushes to the output directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common import credentials
from common.config import Config
from common.extras import require
from common.files import (
    FINAL_MODEL,
    METADATA,
    METRICS_FILE,
    MODELS_DIR,
    PUSH_FILE,
    RUN_LOG,
    SUPERLINK_LOG,
)
from common.flower.cli import COMPLETED, FlowerCli
from common.flower.config import (
    ConfigError,
    app_defaults,
    flatten,
    parse_config_string,
)
from common.flower.follow import STATUS_POLL_S, add_poll_option, launch_and_follow
from common.flower.outputs import check_output_dir, prepare_output_dir
from common.flower.processes import (
    INTERRUPTED,
    RunnerError,
    SuperLink,
    Tls,
    flower_env,
    interrupt_on_sigterm,
    uninterrupted,
    write_flwr_config,
)

PROJECT_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "fedrec"
REGISTRY = "devices.json"
DEFAULT_PORT = 8000
RUN_ARTIFACTS = (METRICS_FILE, PUSH_FILE, MODELS_DIR, RUN_LOG)
# A deployed run has no simulated partitions: these differ from the simulation defaults
DEPLOYMENT_DEFAULTS = {"min-nodes": 2, "central-eval": False, "push-model": True}


class DeviceError(ValueError):
    """A device name, key or registry entry that cannot be used."""


# --- the server's home --------------------------------------------------------------------


class ServerHome:
    """Paths and the device registry of one server."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self.certs = self.root / "certs"
        self.devices = self.root / "devices"
        self.registry_path = self.root / REGISTRY
        self.database = self.root / "superlink.db"
        self.flwr_home = self.root / "flwr-home"
        self.live = self.root / "superlink.json"

    def tls(self) -> Tls:
        files = Tls(
            ca_cert=self.certs / credentials.CA_CERT,
            cert=self.certs / credentials.SERVER_CERT,
            key=self.certs / credentials.SERVER_KEY,
        )
        missing = [str(p) for p in (files.ca_cert, files.cert, files.key) if not p.exists()]
        if missing:
            raise ConfigError(
                f"Missing {', '.join(missing)}: run `fedrec-server init --home {self.root} "
                "--host <the server's host name or IP>` first (or pass --insecure)."
            )
        return files

    def registry(self) -> dict[str, dict[str, Any]]:
        if not self.registry_path.exists():
            return {}
        return json.loads(self.registry_path.read_text(encoding="utf-8"))

    def save_registry(self, registry: Mapping[str, Any]) -> None:
        tmp = self.registry_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(registry, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self.registry_path)

    def live_superlink(self) -> dict[str, Any] | None:
        """The address of a SuperLink that `run` keeps going now, or None."""
        if not self.live.exists():
            return None
        info = json.loads(self.live.read_text(encoding="utf-8"))
        try:
            os.kill(int(info["pid"]), 0)
        except (ProcessLookupError, PermissionError, ValueError, KeyError):
            return None
        return info


def init_home(home: ServerHome, *, hosts: Sequence[str], force: bool = False) -> None:
    """Create the CA and the server certificate for these host names / IP addresses."""
    if (home.certs / credentials.CA_CERT).exists() and not force:
        raise ConfigError(
            f"{home.certs} already holds a CA: devices trust it. Pass --force to replace it "
            "(every device then needs the new ca.crt)."
        )
    home.certs.mkdir(parents=True, exist_ok=True)
    home.root.chmod(0o700)  # private keys, the node registry and the SuperLink's database
    home.devices.mkdir(parents=True, exist_ok=True)
    credentials.create_ca(home.certs)
    credentials.create_server_certificate(home.certs, hosts=hosts)


# --- devices ------------------------------------------------------------------------------


def add_device(home: ServerHome, name: str, *, public_key: Path | None = None) -> dict[str, Any]:
    """Add a device: make its key pair (or take its public key); register it when live."""
    credentials.check_name(name)
    registry = home.registry()
    if name in registry and registry[name]["status"] == "active":
        raise DeviceError(f"Device {name!r} is already registered.")
    home.devices.mkdir(parents=True, exist_ok=True)
    pub = home.devices / f"{name}.pub"
    for old in (pub, home.devices / f"{name}.key"):
        old.unlink(missing_ok=True)  # a revoked device gets a new key
    if public_key is None:
        credentials.create_device_key(home.devices, name)
    else:
        credentials.check_public_key(public_key)
        pub.write_bytes(Path(public_key).read_bytes())
    registry[name] = {
        "public_key": str(pub.relative_to(home.root)),
        "fingerprint": credentials.check_public_key(pub),
        "status": "active",
        "node_id": None,
        "added": time.time(),
    }
    home.save_registry(registry)
    _sync_if_live(home)
    return home.registry()[name]


def revoke_device(home: ServerHome, name: str) -> dict[str, Any]:
    """Revoke a device: the SuperLink refuses its key from now on."""
    registry = home.registry()
    if name not in registry:
        raise DeviceError(f"No device {name!r}; `fedrec-server device list` shows them.")
    registry[name]["status"] = "revoked"
    registry[name]["revoked"] = time.time()
    home.save_registry(registry)
    _sync_if_live(home)
    return home.registry()[name]


def sync_devices(home: ServerHome, cli: FlowerCli, say=print) -> None:
    """Make the SuperLink's registered keys match the registry (register, unregister)."""
    registry = home.registry()
    for name, entry in sorted(registry.items()):
        if entry["status"] == "active" and entry.get("node_id") is None:
            entry["node_id"] = cli.register_node(home.root / entry["public_key"], name=name)
            say(f"Registered device {name} as node {entry['node_id']}.")
        elif entry["status"] == "revoked" and entry.get("node_id") is not None:
            with contextlib.suppress(RunnerError):  # already gone from this database
                cli.unregister_node(int(entry["node_id"]))
            say(f"Unregistered revoked device {name} (node {entry['node_id']}).")
            entry["node_id"] = None
        home.save_registry(registry)


def _sync_if_live(home: ServerHome) -> None:
    if home.live_superlink() is not None:
        sync_devices(
            home, FlowerCli(env=flower_env(home.flwr_home), cwd=home.root, connection=CONNECTION)
        )


# --- a run --------------------------------------------------------------------------------


def load_run_config(path: Path | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """DEPLOYMENT_DEFAULTS, then the TOML file's [run] table, then overrides; checked."""
    values: dict[str, Any] = dict(DEPLOYMENT_DEFAULTS)
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"Cannot read run config {path}: {exc}") from None
        unknown = sorted(set(data) - {"run"})
        if unknown:
            raise ConfigError(f"{path}: only a [run] table is allowed, found {unknown}.")
        values.update(flatten(data.get("run", {})))
    values.update(overrides)
    try:
        return Config.checked(values)
    except ValueError as exc:
        raise ConfigError(f"Invalid run config: {exc}") from None


def run(
    home: ServerHome,
    *,
    run_config: Mapping[str, Any],
    output: Path,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    operator_port: int | None = None,
    insecure: bool = False,
    overwrite: bool = False,
    poll_s: float = STATUS_POLL_S,
    timeout_s: float | None = None,
    say=print,
) -> str:
    """Start the SuperLink and its Fleet gate, submit the run, follow it; its final status.

    Devices reach host:port, where the gate (server/gate.py) forwards the Fleet API and nothing
    else; the SuperLink itself, with its Control and Runtime APIs, listens on loopback only, at
    operator_port (default port + 1), for this process, the `flwr` CLI and the ServerApp.
    """
    # 1. Configuration and output directory, checked before anything starts
    require("server", "uvicorn", "httpx", "starlette", what="fedrec-server run")
    output = output.expanduser().resolve()
    run_config = {**run_config, "output-dir": str(output)}
    check_output_dir(output, PROJECT_DIR)
    check_output_dir(home.root, PROJECT_DIR, what="The server's home (private keys!)")
    resume = bool(run_config.get("resume"))
    prepare_output_dir(output, resume=resume, overwrite=overwrite, artifacts=RUN_ARTIFACTS)
    home.root.mkdir(parents=True, exist_ok=True)
    home.root.chmod(0o700)  # private keys, the node registry and the SuperLink's database
    if (live := home.live_superlink()) is not None:
        raise ConfigError(f"A SuperLink of {home.root} already runs (pid {live['pid']}).")

    # 2. The SuperLink: TLS and SuperNode authentication unless --insecure
    tls = None if insecure else home.tls()
    env = flower_env(home.flwr_home)
    operator_port = port + 1 if operator_port is None else operator_port
    if operator_port == port:
        raise ConfigError(f"The operator port must differ from the devices' port {port}.")
    superlink = SuperLink(
        port=operator_port,
        host="127.0.0.1",
        env=env,
        log_path=home.root / SUPERLINK_LOG,
        tls=tls,
        supernode_auth=not insecure,
        database=home.database,
    )
    write_flwr_config(
        home.flwr_home,
        connection=CONNECTION,
        address=superlink.address,
        root_certificates=tls.ca_cert if tls else None,
    )
    cli = FlowerCli(env=env, cwd=home.root, connection=CONNECTION)
    gate = None

    def serve_devices() -> None:  # once the SuperLink answers
        nonlocal gate
        _private(home.database)
        home.live.write_text(json.dumps({"pid": superlink.pid, "address": superlink.address}))
        from server.gate import start_gate  # uvicorn and httpx: the server extra

        gate = start_gate(host=host, port=port, upstream_port=operator_port, tls=tls)
        mode = "insecure (no TLS, no device authentication)" if insecure else "TLS, device auth"
        say(
            f"Fleet API for devices on {host}:{port} ({mode}); SuperLink (pid {superlink.pid}) "
            f"for the operator on {superlink.address} only; state {home.database}"
        )
        if not insecure:
            sync_devices(home, cli, say=say)
            active = [n for n, e in home.registry().items() if e["status"] == "active"]
            if len(active) < int(run_config["min-nodes"]):
                say(
                    f"warning: {len(active)} active device(s) for min-nodes "
                    f"{run_config['min-nodes']}: add more with `fedrec-server --home "
                    f"{home.root} device add NAME` (this run registers them as they are added)."
                )

    # 3. Start, submit, then follow: rounds from metrics.jsonl, status from `flwr list`
    try:
        _, info = launch_and_follow(
            superlink,
            cli,
            project_dir=PROJECT_DIR,
            run_config=run_config,
            config={**app_defaults(PROJECT_DIR), **run_config},
            output_dir=output,
            log_path=output / RUN_LOG,
            poll_s=poll_s,
            timeout_s=timeout_s,
            say=say,
            on_start=serve_devices,
            on_submit=lambda run_id: say(
                f"Run {run_id} submitted; waiting for {run_config['min-nodes']} device(s)."
            ),
        )
    finally:
        with uninterrupted():
            if gate is not None:
                gate.stop()
            home.live.unlink(missing_ok=True)
    status = str(info["status"])
    say(_summary(output))
    return status


def _private(path: Path) -> None:
    """Owner-only permissions on a file the SuperLink made (its node keys and runs)."""
    for candidate in (path, *path.parent.glob(path.name + "-*")):  # SQLite's -wal, -shm
        with contextlib.suppress(FileNotFoundError):
            candidate.chmod(0o600)


def _summary(output: Path) -> str:
    """What the run left: the final model, its pushes and the metrics file (how it ended is
    printed by launch_and_follow)."""
    lines = []
    final = output / MODELS_DIR / FINAL_MODEL / METADATA
    if final.exists():
        meta = json.loads(final.read_text())
        lines.append(f"Final model {meta.get('version')}: {final.parent}")
    pushes = output / PUSH_FILE
    if pushes.exists():
        for line in pushes.read_text().splitlines():
            push = json.loads(line)
            lines.append(
                f"Push of {push['version']}: installed on {len(push['installed'])} of "
                f"{len(push['nodes'])} node(s)"
                + (f"; failed: {push['failed']}" if push["failed"] else "")
            )
    lines.append(f"Metrics: {output / METRICS_FILE}")
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedrec-server",
        description="Run the aggregation server of a fedrec federation (Flower SuperLink).",
        epilog=(
            "Typical use:\n"
            "  fedrec-server --home srv init --host fedrec.example.org\n"
            "  fedrec-server --home srv device add phone-1   # hand srv/devices/phone-1.key\n"
            "                                                # and srv/certs/ca.crt to it\n"
            "  fedrec-server --home srv run --config server/deploy.toml --host 0.0.0.0\n"
            "Exit status of run: 0 when the run finished completed, 1 otherwise, 2 for a bad\n"
            "option or config, 130 when interrupted."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--home",
        type=Path,
        default=Path("fedrec-server"),
        help="the server's directory: certificates, devices, SuperLink state "
        "(default: ./fedrec-server)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create the CA and the server's TLS certificate")
    init.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="a host name or IP address devices use to reach the server (repeatable; "
        "localhost and 127.0.0.1 are always included)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA")

    device = sub.add_parser("device", help="add, revoke or list devices")
    actions = device.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="make a device key pair (or take --public-key)")
    add.add_argument("name", help="device name: letters, digits, '.', '_', '-'")
    add.add_argument(
        "--public-key",
        type=Path,
        metavar="FILE",
        help="the device's own public key (fedrec-client keygen) instead of a new pair",
    )
    revoke = actions.add_parser("revoke", help="refuse a device's key from now on")
    revoke.add_argument("name")
    actions.add_parser("list", help="the registered and revoked devices")

    go = sub.add_parser("run", help="start the SuperLink and run a federation")
    go.add_argument("--config", type=Path, metavar="TOML", help="run config: a [run] table")
    go.add_argument(
        "--run-config",
        default="",
        metavar='"KEY=VALUE ..."',
        help="more run-config overrides (TOML values, strings quoted)",
    )
    go.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="where models and metrics go (default: HOME/run)",
    )
    go.add_argument(
        "--host",
        default="127.0.0.1",
        help="address devices reach (0.0.0.0: every interface); only the Fleet API is served there",
    )
    go.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="devices' port, the Fleet gate (8000)"
    )
    go.add_argument(
        "--operator-port",
        type=int,
        metavar="PORT",
        help="the SuperLink's own port, on 127.0.0.1 only: Control and Runtime APIs for the "
        "operator's `flwr` CLI and the ServerApp (default: --port + 1)",
    )
    go.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no device authentication: local experiments only",
    )
    go.add_argument("--overwrite", action="store_true", help="replace an earlier run's output")
    go.add_argument("--timeout-s", type=float, metavar="S", help="stop the run after S seconds")
    add_poll_option(go)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The `fedrec-server` command."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    home = ServerHome(args.home)
    try:
        if args.command == "init":
            if not args.host:
                raise ConfigError("Give at least one --host: the name devices use to reach you.")
            init_home(home, hosts=args.host, force=args.force)
            names = credentials.certificate_names(home.certs / credentials.SERVER_CERT)
            print(f"CA and server certificate in {home.certs} (valid for {', '.join(names)}).")
            print(f"Give {home.certs / credentials.CA_CERT} to every device.")
        elif args.command == "device":
            return _device(home, args)
        else:
            interrupt_on_sigterm()  # `kill` cleans up like Ctrl-C does
            config = load_run_config(args.config, parse_config_string(args.run_config))
            status = run(
                home,
                run_config=config,
                output=args.output or home.root / "run",
                host=args.host,
                port=args.port,
                operator_port=args.operator_port,
                insecure=args.insecure,
                overwrite=args.overwrite,
                poll_s=args.poll_s,
                timeout_s=args.timeout_s,
            )
            return 0 if status == COMPLETED else 1
    except (ConfigError, DeviceError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted: the SuperLink was stopped.", file=sys.stderr)
        return INTERRUPTED
    return 0


def _device(home: ServerHome, args: argparse.Namespace) -> int:
    if args.action == "add":
        entry = add_device(home, args.name, public_key=args.public_key)
        key = home.devices / f"{args.name}.key"
        print(f"Device {args.name} added (key fingerprint {entry['fingerprint'][:16]}).")
        if key.exists():
            print(f"Give the device {key} (secret) and {home.certs / credentials.CA_CERT}.")
        if entry.get("node_id") is None:
            print("It is registered with the SuperLink when `fedrec-server run` starts.")
    elif args.action == "revoke":
        entry = revoke_device(home, args.name)
        live = home.live_superlink() is not None
        print(
            f"Device {args.name} revoked"
            + (": the SuperLink refuses it now." if live else "; refused from the next run on.")
        )
    else:
        registry = home.registry()
        if not registry:
            print(f"No devices in {home.registry_path}.")
        for name, entry in sorted(registry.items()):
            node = entry.get("node_id")
            print(
                f"{name:24} {entry['status']:8} node {node if node is not None else '-':>20} "
                f"key {entry['fingerprint'][:16]}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
