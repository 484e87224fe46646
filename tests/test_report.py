"""Tests for simulations/report.py and the offline parts of simulations/run.py."""

from __future__ import annotations

import functools
import inspect
import json
import os
import subprocess
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.flower import cli, config, follow, outputs, processes
from common.rounds import read_rows
from simulations import report, run

# Round 0 is the initial evaluation; round 1 has a null and a missing metric; round 2 is last.
PRIVACY = {
    "dp_mode": "fedavg",
    "dp_delta": 1e-5,
    "dp_unit": "user",
    "dp_accountant": "rdp",
    "dp_composition": "cumulative over rounds",
    "dp_noise_multiplier": 1.1,
    "dp_sample_rate": 0.1,
}
ROWS = [
    {"round": 0, "val_hr@10": 0.05, "val_ndcg@10": 0.02, "elapsed_s": 1.5},
    {
        "round": 1,
        "clients_train": 4,
        "clients_declined": 0,
        "train_loss": 4.25,
        "fed_hr@10": 0.1,
        "fed_ndcg@10": None,
        "val_hr@10": 0.125,
        "val_ndcg@10": 0.0625,
        "epsilon": 0.75,
        "elapsed_s": 10.0,
        **PRIVACY,
    },
    {
        "round": 2,
        "clients_train": 3,
        "clients_declined": 1,
        "train_loss": 3.5,
        "fed_hr@10": 0.2,
        "fed_ndcg@10": 0.09,
        "val_hr@10": 0.25,
        "val_ndcg@10": 0.125,
        "test_hr@10": 0.2,
        "test_ndcg@10": 0.1,
        "test_mrr@10": 0.0875,
        "epsilon": 1.5,
        "elapsed_s": 20.0,
        **PRIVACY,
    },
]


def write_metrics(directory: Path, rows: list[dict] = ROWS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / report.METRICS_FILE
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_report(directory: Path) -> dict:
    return report.write_report(
        directory,
        scenario={"name": "unit", "description": "hand-written metrics", "path": "unit.toml"},
        config={"num-server-rounds": 2, "dp-mode": "fedavg", "dp-delta": 1e-5},
        overrides=["num-server-rounds"],
        federation={"num-supernodes": 4, "client-resources-num-cpus": 1},
        status="finished:completed",
        run_id="123",
        wall_s=21.0,
    )


# --------------------------------------------------------------------------------------------
# report.py
# --------------------------------------------------------------------------------------------


def test_results_json_has_every_round_and_the_last_as_final(tmp_path: Path) -> None:
    write_metrics(tmp_path)
    write_report(tmp_path)
    results = json.loads((tmp_path / report.RESULTS_FILE).read_text())
    assert results["status"] == "finished:completed"
    assert results["run_id"] == "123"
    assert results["wall_s"] == 21.0
    assert results["scenario"]["name"] == "unit"
    assert results["config"]["num-server-rounds"] == 2
    assert [row["round"] for row in results["rounds"]] == [0, 1, 2]
    assert results["final"] == ROWS[-1]
    assert results["privacy"]["epsilon"] == 1.5
    assert results["privacy"]["delta"] == 1e-5


def test_report_md_states_privacy_with_delta_unit_accountant_composition(tmp_path: Path) -> None:
    write_metrics(tmp_path)
    write_report(tmp_path)
    text = (tmp_path / report.REPORT_FILE).read_text()
    privacy = text.split("## Privacy", 1)[1].split("##", 1)[0]
    for term in ("epsilon", "1.5", "delta = 1e-05", "user-level", "rdp", "cumulative", "1.1"):
        assert term in privacy
    assert "after round 2" in privacy
    assert "![" in text and report.PLOT_FILE in text
    assert "| num-server-rounds | `2` | override |" in text
    assert "finished:completed" in text
    # per-round table: one row per round, null and missing cells shown as '-'
    section = text.split("## Rounds", 1)[1].split("## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(ROWS)
    assert " - |" in table[2]


def test_epsilon_is_never_bare(tmp_path: Path) -> None:
    write_metrics(tmp_path)
    write_report(tmp_path)
    for line in (tmp_path / report.REPORT_FILE).read_text().splitlines():
        if "epsilon" in line and not line.startswith("|"):  # table headers point to Privacy
            assert "delta" in line, line


def test_privacy_statement_when_dp_is_off_claims_nothing() -> None:
    rows = [{"round": 1, "train_loss": 1.0}]
    statement = report.privacy_summary(rows, {"dp-mode": "off"})["statement"]
    assert "disabled" in statement and "no privacy guarantee" in statement
    enabled = report.privacy_summary(rows, {"dp-mode": "fedavg"})["statement"]
    assert "enabled" in enabled and "no guarantee" in enabled


def test_plot_is_a_non_empty_png(tmp_path: Path) -> None:
    write_metrics(tmp_path)
    write_report(tmp_path)
    data = (tmp_path / report.PLOT_FILE).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_tensorboard_scalars_read_back_equal_the_metrics(tmp_path: Path) -> None:
    write_metrics(tmp_path)
    write_report(tmp_path)
    write_report(tmp_path)  # regenerating must not duplicate the curves
    events = list((tmp_path / report.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / report.TENSORBOARD_DIR))
    acc.Reload()
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in ROWS:
        for key, value in row.items():
            if key != "round" and isinstance(value, int | float):
                expected.setdefault(report.tag_of(key), []).append((row["round"], value))
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert "val/ndcg@10" in expected and "privacy/epsilon" in expected


def test_regenerating_keeps_the_run_facts(tmp_path: Path, capsys) -> None:
    write_metrics(tmp_path)
    write_report(tmp_path)
    assert report.main([str(tmp_path)]) == 0
    results = json.loads((tmp_path / report.RESULTS_FILE).read_text())
    assert results["status"] == "finished:completed"
    assert results["scenario"]["name"] == "unit"
    printed = capsys.readouterr().out
    assert "finished:completed" in printed and "delta = 1e-05" in printed


def test_report_cli_refuses_a_directory_without_metrics(tmp_path: Path, capsys) -> None:
    assert report.main([str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_read_metrics_skips_an_unfinished_last_line(tmp_path: Path) -> None:
    path = write_metrics(tmp_path)
    with open(path, "a") as fh:
        fh.write('{"round": 3, "train_lo')
    with pytest.warns(UserWarning, match="unfinished"):
        rows = read_rows(path)
    assert [row["round"] for row in rows] == [0, 1, 2]


def test_read_metrics_names_the_line_of_a_broken_row(tmp_path: Path) -> None:
    path = tmp_path / report.METRICS_FILE
    path.write_text('{"round": 1}\nnot json\n{"round": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_rows(path)


def test_a_repeated_round_keeps_its_last_row() -> None:
    rows = [{"round": 1, "train_loss": 9.0}, {"round": 2}, {"round": 1, "train_loss": 1.0}]
    rounds = report.rounds_of(rows)
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["train_loss"] == 1.0


def test_empty_run_still_gets_a_report(tmp_path: Path) -> None:
    results = report.write_report(tmp_path, status="finished:failed")
    assert results["final"] is None
    assert "No round was logged" in (tmp_path / report.REPORT_FILE).read_text()
    assert (tmp_path / report.PLOT_FILE).stat().st_size > 0


# --------------------------------------------------------------------------------------------
# run.py: scenario files, run-config strings, progress lines
# --------------------------------------------------------------------------------------------

GOOD_SCENARIO = """
[scenario]
name = "tiny"
description = "a test"

[run]
num-server-rounds = 2
dataset = "path"
dp-mode = "sgd"

[federation]
num-supernodes = 3
client-resources-num-cpus = 1
"""


def scenario_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return path


def test_load_scenario_reads_all_three_tables(tmp_path: Path) -> None:
    scenario = run.load_scenario(scenario_file(tmp_path, GOOD_SCENARIO))
    assert scenario.name == "tiny"
    assert scenario.description == "a test"
    assert scenario.run == {"num-server-rounds": 2, "dataset": "path", "dp-mode": "sgd"}
    assert scenario.federation == {"num-supernodes": 3, "client-resources-num-cpus": 1}


def test_scenario_name_defaults_to_the_file_name(tmp_path: Path) -> None:
    text = GOOD_SCENARIO.replace('name = "tiny"\n', "")
    assert run.load_scenario(scenario_file(tmp_path, text)).name == "scenario"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD_SCENARIO + "\n[server]\nx = 1\n", "unknown table.*server"),
        (GOOD_SCENARIO.replace("num-supernodes = 3\n", ""), "must set num-supernodes"),
        (GOOD_SCENARIO + "num-gpus = 1\n", "unknown key 'num-gpus'"),
        (GOOD_SCENARIO.replace("num-supernodes = 3", 'num-supernodes = "3"'), "must be a int"),
        (GOOD_SCENARIO.replace("num-supernodes = 3", "num-supernodes = 0"), "at least 1"),
        (GOOD_SCENARIO.replace('name = "tiny"', 'name = "a/b"'), "name 'a/b'"),
        (GOOD_SCENARIO + "\n[run\n", "not valid TOML"),
        ('[scenario]\nnam = "x"\n', "unknown key 'nam'"),
    ],
)
def test_bad_scenarios_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(run.ScenarioError, match=message):
        run.load_scenario(scenario_file(tmp_path, text))


def test_missing_scenario_file(tmp_path: Path) -> None:
    with pytest.raises(run.ScenarioError, match="does not exist"):
        run.load_scenario(tmp_path / "nope.toml")


def test_run_config_is_checked_by_config_for_fedrec_and_by_the_defaults_for_another_app(
    tmp_path: Path,
) -> None:
    checked = run.check_app_config(run.PROJECT_DIR, {"num-server-rounds": 2, "learning-rate": 1})
    assert checked == {"num-server-rounds": 2, "learning-rate": 1.0}
    assert isinstance(checked["learning-rate"], float)
    with pytest.raises(run.ScenarioError, match="Unknown config key.*rounds"):
        run.check_app_config(run.PROJECT_DIR, {"rounds": 2})
    with pytest.raises(run.ScenarioError, match="num-server-rounds must be an integer"):
        run.check_app_config(run.PROJECT_DIR, {"num-server-rounds": 2.5})
    with pytest.raises(run.ScenarioError, match="needs num-partitions"):  # a cross-field rule
        run.check_app_config(run.PROJECT_DIR, {"partition": "iid"})
    other = tmp_path / "other-app"  # any Flower app: its keys and types only
    other.mkdir()
    (other / "pyproject.toml").write_text(
        '[tool.flwr.app.config]\nnum-server-rounds = 10\nlr = 0.1\ndataset = "x"\n'
    )
    assert run.check_app_config(other, {"lr": 1}) == {"lr": 1.0}
    with pytest.raises(run.ScenarioError, match="Unknown run-config key 'rounds'"):
        run.check_app_config(other, {"rounds": 2})
    with pytest.raises(run.ScenarioError, match="num-server-rounds must be a int"):
        run.check_app_config(other, {"num-server-rounds": 2.5})
    with pytest.raises(run.ScenarioError, match="dataset must be a str"):
        run.check_app_config(other, {"dataset": 1})


def test_run_config_string_quotes_strings_and_lowercases_bools() -> None:
    values = {
        "dataset": "path",
        "data-path": "/tmp/my data/x",
        "central-eval": True,
        "resume": False,
        "num-server-rounds": 3,
        "dp-delta": 1e-5,
        "learning-rate": 0.001,
    }
    text = config.to_config_string(values)
    assert "dataset='path'" in text
    assert "central-eval=true" in text and "resume=false" in text
    assert "num-server-rounds=3" in text and "dp-delta=1e-05" in text
    # the reference: Flower's own parser reads back exactly the values
    assert parse_config_args([text]) == values
    assert config.parse_config_string(text) == values


def test_strings_with_quotes_still_round_trip_through_flower() -> None:
    values = {"a": "it's", "b": 'say "hi"', "c": "back\\slash"}
    assert parse_config_args([config.to_config_string(values)]) == values
    with pytest.raises(run.ScenarioError, match="both kinds of quote"):
        config.format_toml_value('it\'s "both"')


def test_parse_config_string_rejects_garbage() -> None:
    with pytest.raises(run.ScenarioError, match="key=value"):
        config.parse_config_string("num-server-rounds 3")
    with pytest.raises(run.ScenarioError, match="not valid"):
        config.parse_config_string("dataset=ml-100k")  # an unquoted string


def test_shipped_scenarios_are_valid_for_the_app() -> None:
    configs = run.PROJECT_DIR / "simulations" / "configs"
    others = [configs / "demo.toml", configs / "ml-latest-small.toml"]
    for path in [*others, *sorted(configs.glob("bench-fed*.toml"))]:
        run.check_app_config(run.PROJECT_DIR, run.load_scenario(path).run)
    demo = run.load_scenario(run.PROJECT_DIR / "simulations" / "configs" / "demo.toml")
    assert demo.run["partition"] == "user" and demo.run["dp-mode"] == "fedavg"
    assert demo.federation["num-supernodes"] == 943


def test_the_app_bundle_is_the_code_and_its_configs() -> None:
    """Every run ships the project as a FAB, which Flower caps at 10 MB: the result files (their
    metrics.jsonl files alone are over the cap) stay out, the apps' code and configs go in."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    fab = build_fab_from_disk(run.PROJECT_DIR)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert len(fab) < FAB_MAX_SIZE / 4
    assert not [n for n in names if n.startswith(("simulations/results/", "tests/", "docs/"))]
    for needed in ("server/server_app.py", "client/client_app.py", "common/config.py"):
        assert needed in names
    assert "simulations/configs/demo.toml" in names


def test_output_dir_inside_the_project_must_be_ignored(tmp_path: Path) -> None:
    (tmp_path / ".gitignore").write_text("outputs/\n")
    outputs.check_output_dir(tmp_path / "outputs" / "demo", tmp_path)
    outputs.check_output_dir(tmp_path.parent / "elsewhere", tmp_path)
    with pytest.raises(run.ScenarioError, match="app bundle"):
        outputs.check_output_dir(tmp_path / "results", tmp_path)


def test_a_resumed_run_appends_its_log_after_a_marker(tmp_path: Path) -> None:
    """run.log of a killed run survives its resume: the new run's log (which `flwr log`
    rewrites whole at the end) goes below the old one and a marker line."""
    log_path = tmp_path / "run.log"
    log_path.write_bytes(b"INFO [ROUND 7/10]\nkilled here\n")

    class Cli:  # `flwr log --stream` of the new run: writes its lines and ends
        def stream_log(self, run_id, fh):
            fh.write(f"INFO [ROUND 1/3] of run {run_id}\n".encode())
            fh.flush()
            return subprocess.Popen(["true"])

    assert cli.earlier_log(log_path, run_id="2", resume=False) == b""
    earlier = cli.earlier_log(log_path, run_id="2", resume=True)
    cli.save_run_log(Cli(), "2", log_path, earlier=earlier)
    lines = log_path.read_text().splitlines()
    assert lines[:2] == ["INFO [ROUND 7/10]", "killed here"]
    assert lines[3].startswith("===== fedrec: resumed as Flower run 2 at ")
    assert lines[4] == "INFO [ROUND 1/3] of run 2"


def test_an_old_run_is_not_mixed_into_a_new_one(tmp_path: Path) -> None:
    write_metrics(tmp_path)
    prepare = functools.partial(outputs.prepare_output_dir, tmp_path, artifacts=run.RUN_ARTIFACTS)
    with pytest.raises(run.ScenarioError, match="--overwrite"):
        prepare(resume=False, overwrite=False)
    prepare(resume=True, overwrite=False)  # resume appends
    assert (tmp_path / report.METRICS_FILE).exists()
    (tmp_path / "keep.txt").write_text("not a run artifact")
    prepare(resume=False, overwrite=True)
    assert not (tmp_path / report.METRICS_FILE).exists()
    assert (tmp_path / "keep.txt").exists()


def test_metrics_tail_returns_whole_new_lines_only(tmp_path: Path) -> None:
    path = tmp_path / report.METRICS_FILE
    tail = follow.MetricsTail(path)
    assert tail.poll() == []
    path.write_text('{"round": 1}\n{"round": 2')
    assert tail.poll() == [{"round": 1}]
    with open(path, "a") as fh:
        fh.write(', "train_loss": 1.0}\n')
    assert tail.poll() == [{"round": 2, "train_loss": 1.0}]
    assert tail.poll() == []


def test_progress_line_prefers_val_hr_and_shows_both_ndcgs() -> None:
    line = follow.progress_line(ROWS[2], total_rounds=2, wall_s=99.0)
    assert line.startswith("round 2/2 | clients 3 (1 declined)")
    assert "loss 3.5000" in line
    assert "HR@10 val 0.2500" in line
    assert "NDCG@10 fed 0.0900 val 0.1250 test 0.1000" in line
    assert "eps 1.500" in line and line.endswith("20.0 s")
    bare = follow.progress_line({"round": 0}, total_rounds=None, wall_s=3.0)
    assert bare == "round 0 | 3.0 s"
    header = follow.progress_header(ROWS[1], {"dp-mode": "fedavg"})
    assert all(t in header for t in ("user-level", "delta=1e-05", "rdp", "cumulative", "FedAvg"))
    assert "off" in follow.progress_header({"round": 1}, {"dp-mode": "off"})


def test_flwr_config_toml_names_our_connection(tmp_path: Path) -> None:
    import tomllib

    path = processes.write_flwr_config(
        tmp_path, connection=run.CONNECTION, address="127.0.0.1:1234"
    )
    data = tomllib.loads(path.read_text())
    assert data["superlink"]["default"] == run.CONNECTION
    assert data["superlink"][run.CONNECTION] == {"address": "127.0.0.1:1234", "insecure": True}


def test_flower_processes_find_this_venvs_scripts_without_activation(tmp_path: Path) -> None:
    import sys

    env = processes.flower_env(tmp_path / "home")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_metrics_tail_skips_a_malformed_row_with_a_warning_naming_it(
    tmp_path: Path, caplog
) -> None:
    path = tmp_path / report.METRICS_FILE
    path.write_text('{"round": 1}\nnot json\n{"round": 2}\n')
    with caplog.at_level("WARNING", logger="common.flower.follow"):
        rows = follow.MetricsTail(path).poll()
    assert rows == [{"round": 1}, {"round": 2}]
    assert str(path) in caplog.text and "line" in caplog.text


def test_a_row_key_that_the_contract_does_not_declare_is_refused(tmp_path):
    from common.rounds import check_row
    from server.runlog import RunLog

    with pytest.raises(ValueError, match=r"\['val_ndgc@10'\] are not declared.*RoundRow"):
        RunLog(tmp_path).append_metrics({"round": 1, "val_ndgc@10": 0.1})
    assert not (tmp_path / "metrics.jsonl").exists()
    assert check_row({"round": 1, "val_ndcg@10": 0.1}) == {"round": 1, "val_ndcg@10": 0.1}


def test_status_is_asked_at_the_poll_period_while_the_log_streams_and_at_once_when_it_ends(
    tmp_path: Path, monkeypatch
) -> None:
    """follow_run on a fake clock, at fedrec-simulate's default period: the log stream's end
    is the cue that the run finished; status queries (each a new `flwr` process) stay rare."""
    clock = {"now": 0.0}
    monkeypatch.setattr(follow.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(follow.time, "sleep", lambda s: clock.__setitem__("now", clock["now"] + s))
    asked: list[float] = []

    class FakeCli:
        def status(self, run_id: str) -> dict:
            asked.append(clock["now"])
            return {"status": cli.COMPLETED if clock["now"] >= 200 else "running"}

    class Stream:  # `flwr log --stream`, ending with the run at t = 200 s
        def poll(self):
            return 0 if clock["now"] >= 200 else None

    class Link:
        def is_running(self) -> bool:
            return True

    info = follow.follow_run(
        FakeCli(),
        "7",
        superlink=Link(),
        streamer=Stream(),
        metrics=follow.MetricsTail(tmp_path / report.METRICS_FILE),
        config={},
        poll_s=inspect.signature(run.run_scenario).parameters["poll_s"].default,
        timeout_s=None,
        say=lambda text: None,
    )
    assert info["status"] == cli.COMPLETED
    assert asked == [2.0, 62.0, 122.0, 182.0, 200.0]  # not every few seconds
