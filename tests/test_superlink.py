"""End to end: fedrec-simulate through a real `flower-superlink --simulation` process.

Each test uses its own free port and FLWR_HOME (under tmp_path) and checks that every process
it caused to start is gone afterwards.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.flower import cli, config, processes
from common.rounds import read_rows
from simulations import report, run
from tests.fixtures import make_synthetic_dataset, make_tiny_backbone
from tests.tiny import tiny_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Process bookkeeping: every Flower process the runner starts carries FLWR_HOME in its
# environment (Ray workers included), which identifies them by id without touching others.
# --------------------------------------------------------------------------------------------


def pids_with_flwr_home(flwr_home: Path) -> list[int]:
    return processes.processes_with_env("FLWR_HOME", str(flwr_home))


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def ray_is_up(flwr_home: Path) -> bool:
    """A raylet started under this FLWR_HOME is running."""
    for pid in pids_with_flwr_home(flwr_home):
        with contextlib.suppress(OSError):
            if b"raylet" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
    return False


def wait_until_gone(flwr_home: Path, timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := pids_with_flwr_home(flwr_home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def kill_leftovers(flwr_home: Path) -> None:
    for pid in pids_with_flwr_home(flwr_home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def output(tmp_path: Path):
    out = tmp_path / "out"
    yield out
    kill_leftovers(out / "flwr-home")  # only if a test failed half-way


# --------------------------------------------------------------------------------------------
# The real app on a tiny backbone and a synthetic catalog
# --------------------------------------------------------------------------------------------


def tiny_scenario(tmp_path: Path, *, rounds: int = 2, supernodes: int = 3) -> Path:
    backbone = make_tiny_backbone(tmp_path / "bert")
    data = make_synthetic_dataset(tmp_path / "data", num_users=30, num_items=36, seed=0)
    path = tmp_path / "tiny.toml"
    model = tiny_run(history_len=8, num_negatives=8, max_tokens=8)
    tiny = "\n".join(f"{key} = {config.format_toml_value(v)}" for key, v in model.items())
    path.write_text(
        f"""
[scenario]
name = "tiny"
description = "Tiny random BERT, synthetic catalog, {supernodes} clients, {rounds} rounds."

[run]
dataset = "path"
data-path = "{data}"
data-format = "csv"
backbone = "{backbone}"
cache-dir = "{tmp_path / "cache"}"
partition = "iid"
num-partitions = {supernodes}
num-server-rounds = {rounds}
{tiny}
dp-mode = "sgd"
fraction-evaluate = 0.0
central-eval = true

[federation]
num-supernodes = {supernodes}
client-resources-num-cpus = 1
""",
        encoding="utf-8",
    )
    return path


def test_real_app_runs_to_completion_and_reports(tmp_path: Path, output: Path) -> None:
    scenario = run.load_scenario(tiny_scenario(tmp_path))
    printed = io.StringIO()
    outcome = run.run_scenario(
        scenario, output=output, port=processes.free_port(), timeout_s=900, out=printed
    )
    text = printed.getvalue()

    assert outcome.status == cli.COMPLETED, text + processes.tail(output / "run.log", 80)
    rows = read_rows(output / report.METRICS_FILE)
    assert sorted({row["round"] for row in rows if row["round"] > 0}) == [1, 2]
    assert "round 1/2" in text and "round 2/2" in text
    for name in (report.RESULTS_FILE, report.REPORT_FILE, report.PLOT_FILE, "run.log"):
        assert (output / name).stat().st_size > 0, name
    assert list((output / report.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    results = json.loads((output / report.RESULTS_FILE).read_text())
    assert results["status"] == cli.COMPLETED
    assert results["run_id"] == outcome.run_id
    assert results["final"]["round"] == 2
    assert "delta" in results["privacy"]["statement"]

    # The SuperLink we started, and everything below it, is gone
    assert outcome.superlink_pid is not None and not is_alive(outcome.superlink_pid)
    assert wait_until_gone(output / "flwr-home") == []


# --------------------------------------------------------------------------------------------
# Failure and interruption, on a stub app (fast, and independent of the real one)
# --------------------------------------------------------------------------------------------

STUB_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "stubapp"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "test"

[tool.flwr.app.components]
serverapp = "stub.server_app:app"
clientapp = "stub.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 2
output-dir = ""
fail = false
round-sleep = 0.0
"""

STUB_SERVER = """
import json
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["output-dir"]))
    if context.run_config["fail"]:
        raise RuntimeError("stub failure requested")
    for rnd in range(1, int(context.run_config["num-server-rounds"]) + 1):
        time.sleep(float(context.run_config["round-sleep"]))
        with open(out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"round": rnd, "train_loss": 1.0 / rnd}) + "\\n")
"""

STUB_CLIENT = """
from flwr.clientapp import ClientApp

app = ClientApp()
"""


def stub_app(tmp_path: Path) -> Path:
    project = tmp_path / "stubapp"
    (project / "stub").mkdir(parents=True)
    (project / "pyproject.toml").write_text(STUB_PYPROJECT)
    (project / "stub" / "__init__.py").write_text("")
    (project / "stub" / "server_app.py").write_text(STUB_SERVER)
    (project / "stub" / "client_app.py").write_text(STUB_CLIENT)
    return project


def stub_scenario(tmp_path: Path, run_table: str) -> Path:
    path = tmp_path / "stub.toml"
    path.write_text(
        f"[run]\n{run_table}\n[federation]\nnum-supernodes = 2\nclient-resources-num-cpus = 1\n"
    )
    return path


def runner_command(tmp_path: Path, scenario: Path, output: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "simulations.run",
        "--config",
        str(scenario),
        "--project",
        str(stub_app(tmp_path)),
        "--output",
        str(output),
    ]


def test_a_failed_run_exits_non_zero_with_the_log_tail(tmp_path: Path, output: Path) -> None:
    command = runner_command(tmp_path, stub_scenario(tmp_path, "fail = true"), output)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "finished:failed" in done.stdout
    assert "stub failure requested" in done.stdout  # the tail of run.log
    assert json.loads((output / report.RESULTS_FILE).read_text())["status"] == "finished:failed"
    assert wait_until_gone(output / "flwr-home") == []


def test_sigterm_stops_the_superlink_and_the_simulation(tmp_path: Path, output: Path) -> None:
    scenario = stub_scenario(tmp_path, "num-server-rounds = 5\nround-sleep = 20.0")
    command = runner_command(tmp_path, scenario, output)
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as runner:
        try:
            # wait until the simulation and Ray are up: the stub's first round is running
            flwr_home = output / "flwr-home"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not ray_is_up(flwr_home):
                time.sleep(0.5)
            assert ray_is_up(flwr_home)
            runner.send_signal(signal.SIGTERM)
            printed, _ = runner.communicate(timeout=120)
        finally:
            if runner.poll() is None:
                runner.kill()
    assert runner.returncode == 130, printed
    assert "Interrupted" in printed
    assert wait_until_gone(output / "flwr-home") == []
    assert json.loads((output / report.RESULTS_FILE).read_text())["status"] == "interrupted"
