"""fedrec-client: a device's side of a federation.

    fedrec-client keygen --out keys --name phone-1         # a key pair; send phone-1.pub
    fedrec-client join --superlink fedrec.example.org:8000 --root-certificates ca.crt \\
        --key phone-1.key --data my-interactions.csv --catalog items.csv --state-dir state
    fedrec-client status --state-dir state                 # installed model, privacy spent
    fedrec-client recommend --state-dir state --history 50,172,133 -k 10
    fedrec-client serve --state-dir state --port 8080      # HTTP API; docs at /docs

`join` checks the device's files first (a malformed row names its file and line), then runs a
Flower SuperNode in the foreground until it is stopped (Ctrl-C or SIGTERM stop it and every
ClientApp it started). The state directory keeps the privacy ledger, the frozen-backbone
cache of the catalog and the installed model across rounds and restarts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from client.node_config import (
    BACKBONE,
    CACHE_DIR,
    CATALOG_PATH,
    DATA_FORMAT,
    DATA_PATH,
    LEDGER_FILE,
    STATE_DIR,
)
from common import credentials
from common.data import DataError
from common.extras import require
from common.flower.config import ConfigError
from common.flower.processes import (
    INTERRUPTED,
    RunnerError,
    SuperNode,
    flower_env,
    interrupt_on_sigterm,
    tail,
)

# flower-supernode exits 1 and logs "Exit Code: 305", then the reason, when it cannot connect
# to the SuperLink: refused (key not registered or revoked), unreachable or a TLS failure.
CONNECTION_FAILED = re.compile(r"Exit Code: 305\b")
PROG = "fedrec-client"
EXIT_REFUSED = 3
REFUSED, TLS_FAILURE, UNREACHABLE = "refused", "tls", "unreachable"
# Tried in order on the logged reason. Refusal first, by the SuperLink's own answer
# (FLEET_NODE_ACTIVATION_FAILED is code 2004; gRPC's status names where Flower uses gRPC):
# a socket's "Connection refused" means nobody listens, and stays unreachable.
FAILURE_KINDS = (
    (
        REFUSED,
        re.compile(
            r"\[code: 2004\]|Failed to activate SuperNode|Invalid SuperNode authentication|"
            r"\b(?:401|403)\b|Unauthorized|Forbidden|UNAUTHENTICATED|PERMISSION_DENIED"
        ),
    ),
    (TLS_FAILURE, re.compile(r"SSL|TLS|certificate|handshake", re.IGNORECASE)),
)


def check_files(*, data: Path, catalog: Path, data_format: str) -> str:
    """Load the device's files as the ClientApp will; a one-line description."""
    from common.task import load_device_data  # torch-free, but not needed for keygen/status

    catalog_items, splits = load_device_data(
        data_path=data, catalog_path=catalog, data_format=data_format
    )
    interactions = sum(len(u.train) + (u.valid >= 0) + (u.test >= 0) for u in splits)
    return (
        f"{interactions} interactions of {len(splits)} user(s) in {data}; "
        f"catalog {catalog} has {len(catalog_items)} items"
    )


def join(args: argparse.Namespace) -> int:
    """Run a SuperNode for this device until it is stopped; its exit code."""
    state = args.state_dir.expanduser().resolve()
    data, catalog = args.data.expanduser().resolve(), args.catalog.expanduser().resolve()
    for path, what in ((data, "--data"), (catalog, "--catalog")):
        if not path.exists():
            raise ConfigError(f"{what} {path} does not exist.")
    if not args.insecure:
        for path, what in ((args.root_certificates, "--root-certificates"), (args.key, "--key")):
            if path is None or not path.exists():
                raise ConfigError(f"{what} is required (and must exist) unless --insecure.")
    print(check_files(data=data, catalog=catalog, data_format=args.data_format), flush=True)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    node_config = {
        DATA_PATH: str(data),
        CATALOG_PATH: str(catalog),
        DATA_FORMAT: args.data_format,
        STATE_DIR: str(state),
    }
    if args.backbone:
        node_config[BACKBONE] = str(Path(args.backbone).expanduser().resolve())
    log_path = state / "supernode.log"
    node = SuperNode(
        superlink=args.superlink,
        env=flower_env(state / "flwr-home"),
        log_path=log_path,
        port=args.port,
        node_config=node_config,
        root_certificates=None if args.insecure else args.root_certificates.resolve(),
        private_key=None if args.insecure else args.key.resolve(),
        max_wait_s=args.max_wait_s,
    )
    interrupt_on_sigterm()
    try:
        node.start()
        print(
            f"SuperNode started (pid {node.pid}) for {args.superlink}; state {state}; "
            f"log {log_path}. Ctrl-C stops it.",
            flush=True,
        )
        while node.is_running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("Stopping the SuperNode.", flush=True)
        node.stop()
        return INTERRUPTED
    finally:
        node.stop()
    code = node.returncode
    failure = connection_failure(tail(log_path, 200)) if code else None
    if failure is not None:
        kind, reason = failure
        print(
            f"{failure_message(kind, reason, superlink=args.superlink, max_wait_s=args.max_wait_s)}"
            f"\n{tail(log_path, 12)}",
            file=sys.stderr,
        )
        return EXIT_REFUSED if kind == REFUSED else 1
    if code == 0:  # it was not asked to stop: the SuperLink ended the session (revoked key)
        print(
            "The server ended this device's session: its key was probably revoked (ask the "
            f"operator).\n{tail(log_path, 12)}",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    print(f"The SuperNode exited with code {code}.\n{tail(log_path, 12)}", file=sys.stderr)
    return 1


def connection_failure(log_text: str) -> tuple[str, str] | None:
    """Why a SuperNode could not connect, from its log: (kind, the reason it logged), kind
    one of REFUSED, TLS_FAILURE, UNREACHABLE; None when the log shows no failed connection."""
    found = list(CONNECTION_FAILED.finditer(log_text))
    if not found:
        return None
    reason = []
    for line in log_text[found[-1].end() :].splitlines()[1:]:
        line = line.strip()
        if not line or line.startswith("The SuperNode could not establish"):
            break
        if not line.startswith("Failed to initialize the connection"):
            reason.append(line)
    text = " ".join(reason) or "no reason logged"
    kind = next((k for k, pattern in FAILURE_KINDS if pattern.search(text)), UNREACHABLE)
    return kind, text


def failure_message(kind: str, reason: str, *, superlink: str, max_wait_s: float | None) -> str:
    """What `join` tells the user when the SuperNode could not connect."""
    reason = reason if reason.endswith(".") else reason + "."
    if kind == REFUSED:
        return (
            f"The server at {superlink} refused this device: its key is not registered or was "
            f"revoked (ask the operator to run `fedrec-server device add`). It said: {reason}"
        )
    if kind == TLS_FAILURE:
        host = superlink.rsplit(":", 1)[0]
        return (
            f"TLS failure with the server at {superlink}: {reason} Check that "
            "--root-certificates is the server's ca.crt and that the server's certificate "
            f"names {host}."
        )
    waited = f" (gave up after --max-wait-s {max_wait_s:g} s)" if max_wait_s else ""
    return (
        f"The server at {superlink} could not be reached{waited}: {reason} Check the address "
        "and port, that the server is running and that this machine can reach it."
    )


def status(state_dir: Path) -> dict:
    """What a device holds: installed model, privacy spent, cache and disk use."""
    state_dir = state_dir.expanduser().resolve()
    if not state_dir.is_dir():
        raise ConfigError(f"{state_dir} is not a state directory.")
    from client.installed import installed_metadata  # torch and the model: only when asked

    info: dict = {"state_dir": str(state_dir)}
    meta = installed_metadata(state_dir)
    info["model"] = (
        None
        if meta is None
        else {k: meta.get(k) for k in ("version", "round", "run_id", "installed_at", "privacy")}
    )
    ledger = state_dir / LEDGER_FILE
    info["privacy_ledger"] = json.loads(ledger.read_text()) if ledger.exists() else None
    info["cache_bytes"] = disk_bytes(state_dir / CACHE_DIR)
    info["disk_bytes"] = disk_bytes(state_dir)
    return info


def disk_bytes(path: Path) -> int:
    """Bytes of a file, or of every file below a directory (0 when absent)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def open_recommender(args: argparse.Namespace):
    """The recommender over --model or the model installed in --state-dir."""
    from client.installed import installed_metadata
    from client.recommender import LocalRecommender  # torch and the model: only for these
    from common.config import Config
    from common.readers import load_catalog
    from common.task import load_run_catalog
    from common.weights import read_metadata

    if (args.model is None) == (args.state_dir is None):
        raise ConfigError("Give exactly one of --model DIR and --state-dir DIR.")
    if args.state_dir is not None:  # the newest installed version whose fedrec.json reads
        meta = installed_metadata(args.state_dir)
        if meta is None:
            raise ConfigError(f"No model is installed in {args.state_dir} yet.")
    else:
        meta = read_metadata(args.model)  # ModelDirError naming the file
    if args.catalog is not None:
        catalog = load_catalog(args.catalog)
    else:  # the catalog the model was trained on, where this machine has it
        catalog = load_run_catalog(Config.from_mapping(meta["config"]))
    options = {"device": args.device, "quantize": args.quantize, "runtime": args.runtime}
    if args.backbone:
        options["backbone"] = args.backbone
    if args.state_dir is not None:
        return LocalRecommender.installed(args.state_dir, catalog=catalog, **options)
    return LocalRecommender.load(args.model, catalog=catalog, **options)


def recommend(args: argparse.Namespace) -> int:
    """Print a ranked list for one history."""
    from client.recommender import UnknownItems

    rec = open_recommender(args)
    history = [i.strip() for i in args.history.split(",") if i.strip()]
    try:
        items = rec.recommend(history, args.k, exclude_seen=not args.include_seen)
    except UnknownItems as exc:
        print(f"{PROG}: error: {exc} Item ids are the catalog's (first column).", file=sys.stderr)
        return 2
    meta = rec.metadata
    print(
        f"Model {meta.get('version', '?')} (round {meta.get('round', '?')}), "
        f"{rec.num_items} items; history of {len(history)} item(s)."
    )
    width = max([len("item"), *(len(r.item_id) for r in items)])
    print(f"{'#':>3}  {'item':<{width}}  {'score':>8}  title")
    for rank, r in enumerate(items, start=1):
        print(f"{rank:>3}  {r.item_id:<{width}}  {r.score:>8.3f}  {r.title}")
    return 0


def serve(args: argparse.Namespace) -> int:
    """Run the HTTP service until stopped."""
    require("serve", "fastapi", "uvicorn", what="fedrec-client serve")
    import uvicorn

    from client.service import create_service, service_token

    rec = open_recommender(args)
    watch = args.watch_s if args.state_dir is not None and args.watch_s > 0 else None
    token, kept_in = service_token(token_file=args.token_file, state_dir=args.state_dir)
    app = create_service(rec, watch_s=watch, token=token)
    # the token itself is shown only when it is kept nowhere else (no --state-dir)
    where = f"the token in {kept_in}" if kept_in else f"this token, new at each start: {token}"
    print(
        f"Serving model {rec.metadata.get('version')} ({rec.num_items} items) on "
        f"http://{args.host}:{args.port} (docs at /docs)"
        + (f"; new installs are loaded every {watch:g} s" if watch else ""),
        flush=True,
    )
    print(f"POST /items and /reload need `Authorization: Bearer <token>` with {where}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedrec-client",
        description="A device of a fedrec federation: keys, joining, what it holds.",
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    keygen = sub.add_parser("keygen", help="make this device's key pair (EC P-384)")
    keygen.add_argument("--name", required=True, help="device name (file names NAME.key/.pub)")
    keygen.add_argument("--out", type=Path, default=Path("."), help="directory (default: .)")

    go = sub.add_parser(
        "join",
        help="join a federation: run a SuperNode until stopped",
        epilog="Exit status: 130 when stopped (Ctrl-C, SIGTERM), 3 when the server refuses "
        "this device (unregistered or revoked key), 2 for bad files or options, 1 when the "
        "SuperNode fails otherwise.",
    )
    go.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the server")
    go.add_argument("--root-certificates", type=Path, metavar="CA", help="the server's ca.crt")
    go.add_argument("--key", type=Path, help="this device's private key (NAME.key)")
    go.add_argument("--data", type=Path, required=True, help="this device's interactions file")
    go.add_argument(
        "--catalog",
        type=Path,
        required=True,
        help="the item catalog (the same file the server uses)",
    )
    go.add_argument("--data-format", default="auto", help="auto | csv | atomic | ml-100k ...")
    go.add_argument(
        "--state-dir",
        type=Path,
        required=True,
        help="privacy ledger, caches and installed model (kept across restarts)",
    )
    go.add_argument("--backbone", help="path of the backbone on this device (default: bundled)")
    go.add_argument("--port", type=int, default=9094, help="local port of the SuperNode (9094)")
    go.add_argument(
        "--max-wait-s",
        type=float,
        help="give up when the server stays unreachable this long (default: retry forever)",
    )
    go.add_argument("--insecure", action="store_true", help="no TLS, no key: local tests only")

    show = sub.add_parser("status", help="installed model version, privacy spent, disk use")
    show.add_argument("--state-dir", type=Path, required=True)

    for name, text in (
        ("recommend", "print the top-k items for a history"),
        ("serve", "serve recommendations over HTTP (FastAPI)"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--model", type=Path, help="a model directory (e.g. models/final)")
        cmd.add_argument(
            "--state-dir", type=Path, help="use the model installed in this device state"
        )
        cmd.add_argument(
            "--catalog",
            type=Path,
            help="the item catalog (default: the one the model was trained on)",
        )
        cmd.add_argument("--device", default="auto", help="auto (GPU if available) | cpu | cuda")
        cmd.add_argument(
            "--runtime",
            default="auto",
            choices=("auto", "torch", "onnx"),
            help="user tower on ONNX Runtime or PyTorch (auto: ONNX Runtime on CPU)",
        )
        cmd.add_argument(
            "--quantize",
            default="none",
            choices=("none", "int8"),
            help="dynamic int8 (PyTorch on CPU; slower here, see docs/serving.md)",
        )
        cmd.add_argument("--backbone", help="path of the backbone (default: the model's)")
        if name == "recommend":
            cmd.add_argument(
                "--history", required=True, metavar="ID,ID,...", help="item ids, oldest first"
            )
            cmd.add_argument("-k", type=int, default=10, help="how many items (default 10)")
            cmd.add_argument(
                "--include-seen", action="store_true", help="do not exclude history items"
            )
        else:
            cmd.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
            cmd.add_argument("--port", type=int, default=8080, help="port (default 8080)")
            cmd.add_argument(
                "--watch-s",
                type=float,
                default=10.0,
                help="with --state-dir: check for a newer installed model this often (0: never)",
            )
            cmd.add_argument(
                "--token-file",
                type=Path,
                help="file holding the token that POST /items and /reload need (default: "
                "$FEDREC_SERVICE_TOKEN, else a new one written to STATE_DIR/service.token)",
            )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The `fedrec-client` command."""
    args = parse_args(argv)
    try:
        if args.command == "keygen":
            private, public = credentials.create_device_key(args.out, args.name)
            print(f"Private key {private} (keep it on this device); public key {public}.")
            print(
                "Send the public key to the server's operator: fedrec-server device add "
                f"{args.name} --public-key {public.name}"
            )
            return 0
        if args.command == "status":
            print(json.dumps(status(args.state_dir), indent=2, default=str))
            return 0
        if args.command == "recommend":
            return recommend(args)
        if args.command == "serve":
            return serve(args)
        return join(args)
    # a one-line error naming the file, never a traceback (InstalledModelError, ModelDirError
    # and DataError are ValueErrors)
    except (ConfigError, DataError, OSError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except RunnerError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
