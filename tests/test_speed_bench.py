"""fedrec-speed-benchmark's arithmetic: a pass is as many client updates as clients."""

from __future__ import annotations

import json

import pytest

from simulations import speed_bench


def a_pass(runtime: str, seconds: float, clients: int, window: int = 16) -> dict:
    return {
        "runtime": runtime,
        "adapter_k": 0,
        "seconds": seconds,
        "clients": clients,
        "pass_seconds": seconds * 943 / clients,
        "max_in_flight": window,
    }


def test_ratios_compare_whole_passes_with_the_epoch() -> None:
    # 182 rounds of 5 clients: 910 updates, scaled to a pass of 943
    inprocess = a_pass("in-process", 91.0, 910)
    windowed = a_pass("flower", 182.0, 910)
    at_once = a_pass("flower at once", 227.5, 910, window=0)
    ratios = speed_bench.ratios_of([inprocess, windowed, at_once], central_s=10.0)
    assert ratios["federated pass (in-process) / central epoch, k = 0"] == pytest.approx(9.43)
    assert ratios["federated pass (flower) / central epoch, k = 0"] == pytest.approx(18.86)
    assert ratios["Flower runtime's added wall seconds per client update"] == pytest.approx(0.1)
    assert ratios["Flower pass, 16 messages out / all out at once"] == pytest.approx(0.8)


def test_in_process_alone_has_no_flower_ratios() -> None:
    ratios = speed_bench.ratios_of([a_pass("in-process", 50.0, 943)], central_s=25.0)
    assert ratios == {"federated pass (in-process) / central epoch, k = 0": pytest.approx(2.0)}


def test_another_federation_needs_passes_only(tmp_path, capsys) -> None:
    other = tmp_path / "fed.toml"
    with pytest.raises(SystemExit):
        speed_bench.main(["--federation", str(other)])
    assert "--passes-only" in capsys.readouterr().err


def test_the_default_federation_named_by_its_path_needs_no_passes_only(monkeypatch) -> None:
    """Naming the defaults (by a relative path, say) is the full benchmark, not an error."""

    class Measured(Exception):
        """Raised by the first measurement: the arguments were accepted."""

    def first_measurement(*args, **kwargs):
        raise Measured

    monkeypatch.setattr(speed_bench, "baseline_epoch", first_measurement)
    monkeypatch.chdir(speed_bench.ROOT)
    default = speed_bench.FEDERATION.relative_to(speed_bench.ROOT)
    with pytest.raises(Measured):
        speed_bench.main(["--federation", str(default)])


def test_markdown_names_the_pair_of_a_passes_only_run() -> None:
    epoch = {
        "trainer": "sequence",
        "adapter_k": 0,
        "targets_per_s": 100.0,
        "seconds_per_epoch": 10.0,
        "extrapolated": False,
    }
    result = {
        "federation": "bench-fed-text-restart.toml",
        "central": "bench-central-text.toml",
        "epochs": [epoch],
        "passes": [],
        "ratios": {"federated pass (in-process) / central epoch, k = 0": 2.5},
        "machine": "x86_64",
    }
    text = speed_bench.markdown(result)
    assert text.startswith("Federation bench-fed-text-restart.toml against bench-central-text")
    assert "| federated pass (in-process) / central epoch, k = 0 | 2.50 |" in text


def test_the_aggregation_bench_times_both_ways_on_the_scenarios_model(tmp_path) -> None:
    from simulations import aggregation_bench

    aggregation_bench.main(["--rounds", "3", "--results", str(tmp_path)])
    result = json.loads((tmp_path / aggregation_bench.RESULT_FILE).read_text())
    assert result["clients_per_round"] == 5 and result["strategy"] == "fedadam"
    assert result["parameters"] == 178_304  # the headline model
    assert result["mean_of_replies_s"] > 0 and result["flowers_mean_s"] > 0
    table = (tmp_path / "aggregation.md").read_text()
    assert "| every reply to Flower's mean |" in table and "Ratio (one reply" in table
