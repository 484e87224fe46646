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
import re
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from common.extras import require
from common.files import MODELS_DIR, RUN_LOG, SUPERLINK_LOG
from common.flower.cli import COMPLETED, FlowerCli
from common.flower.config import (
    ConfigError,
    _is_type,
    app_defaults,
    check_run_config,
    flatten,
    parse_config_string,
    to_config_string,
)
from common.flower.follow import STATUS_POLL_S, add_poll_option, launch_and_follow
from common.flower.outputs import check_output_dir, prepare_output_dir
from common.flower.processes import (
    INTERRUPTED,
    RunnerError,
    SuperLink,
    flower_env,
    free_port,
    interrupt_on_sigterm,
    write_flwr_config,
)
from simulations import report

PROJECT_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "fedrec-sim"  # the SuperLink connection's name in FLWR_HOME/config.toml
SCENARIO_TABLES = ("scenario", "run", "federation")
# runtime and seeds are read by fedrec-benchmark only (simulations/benchmark.py)
SCENARIO_KEYS = {"name": str, "description": str, "runtime": str, "seeds": int}
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
    MODELS_DIR,
    RUN_LOG,
    SUPERLINK_LOG,
    "flwr-home",
)


ScenarioError = ConfigError  # a scenario's run config is checked like any other


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


# --- run config ---------------------------------------------------------------------------


def resolve_output_dir(output: str | Path | None, run: Mapping[str, Any], name: str) -> Path:
    """--output, else the run config's output-dir, else outputs/<scenario name>; absolute."""
    chosen = output or run.get("output-dir") or Path("outputs") / name
    return Path(chosen).expanduser().resolve()


def check_app_config(project_dir: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The run-config overrides, checked: for fedrec by `Config` (keys, types, cross-field
    rules), for another Flower app against the keys and types of its pyproject defaults."""
    if project_dir != PROJECT_DIR:
        return check_run_config(overrides, app_defaults(project_dir))
    from common.config import Config  # the fedrec app's rules; not needed for other apps

    try:
        return Config.checked(overrides)
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
    poll_s: float = STATUS_POLL_S,
    timeout_s: float | None = None,
    out: IO[str] | None = None,
) -> RunOutcome:
    """Run one scenario end to end; the report is written whenever a run was submitted."""
    stream = out or sys.stdout

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    # 1. Configuration, checked before anything starts
    require("sim", "ray", "matplotlib", "tensorboard", what="fedrec-simulate")
    project_dir = Path(project_dir).resolve()
    defaults = app_defaults(project_dir)
    overrides = {**scenario.run, **(run_overrides or {})}
    output_dir = resolve_output_dir(output, overrides, scenario.name)
    overrides["output-dir"] = str(output_dir)
    overrides = check_app_config(project_dir, overrides)
    config = {**defaults, **overrides}
    check_output_dir(output_dir, project_dir)
    prepare_output_dir(
        output_dir,
        resume=bool(config.get("resume")),
        overwrite=overwrite,
        artifacts=RUN_ARTIFACTS,
    )

    # 2. Our own SuperLink, FLWR_HOME and connection
    flwr_home = output_dir / "flwr-home"
    env = flower_env(flwr_home)
    superlink = SuperLink(
        port=port or free_port(),
        env=env,
        log_path=output_dir / SUPERLINK_LOG,
        simulation=True,
    )
    write_flwr_config(flwr_home, connection=CONNECTION, address=superlink.address)
    cli = FlowerCli(env=env, cwd=output_dir, connection=CONNECTION)
    log_path = output_dir / RUN_LOG
    run_id: str | None = None
    status = "not started"
    started = time.monotonic()
    error: BaseException | None = None
    say(f"Scenario {scenario.name}: {scenario.description.strip() or scenario.path}")
    say(f"Output: {output_dir}")

    def submitted(new_run_id: str) -> None:
        nonlocal run_id, started, status
        run_id, started, status = new_run_id, time.monotonic(), "running"
        say(f"Run {run_id} submitted: {to_config_string(scenario.federation)}")

    # 3. Start, submit, then follow: rounds from metrics.jsonl, status from `flwr list`
    try:
        _, info = launch_and_follow(
            superlink,
            cli,
            project_dir=project_dir,
            run_config=overrides,
            federation_config=scenario.federation,
            config=config,
            output_dir=output_dir,
            log_path=log_path,
            poll_s=poll_s,
            timeout_s=timeout_s,
            say=say,
            on_start=lambda: say(
                f"SuperLink on {superlink.address} (pid {superlink.pid}), FLWR_HOME={flwr_home}"
            ),
            on_submit=submitted,
            keep_superlink=keep_superlink,
        )
        status = str(info["status"])
    except BaseException as exc:  # Ctrl-C included: what we started is stopped; report, re-raise
        error = exc
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "runner error"
    wall_s = time.monotonic() - started
    if keep_superlink and superlink.is_running():
        say(
            f"SuperLink left running: pid {superlink.pid} on {superlink.address}. "
            f"Use it with FLWR_HOME={flwr_home} flwr list {CONNECTION}; "
            f"stop it with kill -TERM -{superlink.pid}."
        )

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
            '--run-config "num-server-rounds=1 dp-mode=off" --output /tmp/demo\n'
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
    add_poll_option(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The `fedrec-simulate` command."""
    args = parse_args(argv)
    interrupt_on_sigterm()  # `kill` cleans up like Ctrl-C does
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
        return INTERRUPTED
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
