"""Federations of a tiny model: one through Flower's Ray simulation runtime, the rest in-process
(simulations/inprocess.py: the same ServerApp and ClientApp without Flower's transport)."""

import json
import random

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.simulation import run_simulation
from opacus.accountants import RDPAccountant

from client.client_app import create_app as create_client_app
from common.config import Config
from common.rounds import read_rows
from common.weights import load_model_dir, to_arrays
from common.wire import update_shape
from server.server_app import create_app as create_server_app
from server.server_app import run_federation
from simulations.inprocess import InProcessGrid, run_inprocess
from tests.tiny import NUM_CLIENTS, tiny_cfg


def run(cfg: Config) -> list[dict]:
    run_simulation(
        server_app=create_server_app(cfg),
        client_app=create_client_app(cfg),
        num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    lines = (cfg.output_path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow  # Flower's Ray simulation runtime
def test_two_rounds_lower_the_loss_and_write_metrics_and_checkpoints(tmp_path, tiny_world):
    cfg = tiny_cfg(tmp_path, *tiny_world, adapter_k=1)  # LoRA in the top block of 2
    rows = run(cfg)
    by_round = {r["round"]: r for r in rows}
    assert sorted(by_round) == [0, 1, 2]
    assert by_round[2]["train_loss"] < by_round[1]["train_loss"]
    for key in ("fed_hr@10", "fed_ndcg@10", "fed_mrr@10", "val_ndcg@10"):
        assert 0.0 <= by_round[2][key] <= 1.0
    assert "test_ndcg@10" in by_round[2] and "test_ndcg@10" not in by_round[1]
    assert by_round[2]["clients_train"] == NUM_CLIENTS
    assert by_round[2]["bytes_up"] > 0 and by_round[2]["bytes_down"] > by_round[2]["bytes_up"]
    final = cfg.output_path / "models" / "final"
    state, meta = load_model_dir(final)
    assert meta["round"] == 2 and meta["catalog_items"] == 60
    # Only trainable tensors travelled: inside the adapted block, LoRA factors alone.
    block_tensors = [n for n in state if n.startswith("items.blocks.")]
    assert block_tensors and all(".lora_A." in n or ".lora_B." in n for n in block_tensors)
    assert (final / "adapter_config.json").exists() and (
        final / "adapter_model.safetensors"
    ).exists()
    # bytes_up counts serialized tensors: int8 rows with their scales (the default wire
    # format, common/wire.py) plus a small header per tensor
    raw = sum(np.prod(update_shape(v.shape, cfg.wire_dtype)) for v in state.values())
    per_client = by_round[2]["bytes_up"] / NUM_CLIENTS
    assert raw <= per_client <= raw + 256 * len(state)
    assert (cfg.output_path / "models" / "round-002" / "fedrec.json").exists()


def test_resume_continues_the_round_count(tmp_path, tiny_world):
    """The ServerApp's resume (in-process: Flower's runtime is not what is tested here)."""
    cfg = tiny_cfg(tmp_path, *tiny_world, num_server_rounds=1)
    run_inprocess(cfg, num_nodes=NUM_CLIENTS)
    run_inprocess(cfg.replace(num_server_rounds=2, resume=True), num_nodes=NUM_CLIENTS)
    rows = read_rows(cfg.output_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    _, meta = load_model_dir(cfg.output_path / "models" / "final")
    assert meta["round"] == 2


def test_server_ema_serves_a_moving_average_that_survives_a_resume(tmp_path, tiny_world):
    """With server-ema the round checkpoint keeps the global model for training and the moving
    average beside it; the average is what is selected and saved as final, and a resumed run
    continues it rather than restarting it from the global model."""
    decay = 0.5
    cfg = tiny_cfg(tmp_path, *tiny_world, server_ema=decay, fraction_evaluate=0.0)
    run_inprocess(cfg, num_nodes=NUM_CLIENTS)
    run_inprocess(cfg.replace(num_server_rounds=3, resume=True), num_nodes=NUM_CLIENTS)
    models = cfg.output_path / "models"
    state = {r: load_model_dir(models / f"round-{r:03d}")[0] for r in (1, 2, 3)}
    average = {r: load_model_dir(models / f"round-{r:03d}" / "average")[0] for r in (1, 2, 3)}
    for r in (2, 3):
        for name, value in state[r].items():
            expected = decay * average[r - 1][name] + (1 - decay) * value
            np.testing.assert_allclose(average[r][name], expected, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(average[3][n], state[3][n]) for n in state[3])
    final, _ = load_model_dir(models / "final")
    best, meta = load_model_dir(models / "best")
    for name in final:
        np.testing.assert_array_equal(final[name], average[3][name])
        np.testing.assert_array_equal(best[name], average[meta["round"]][name])


def test_int8_down_federates_at_one_byte_a_weight_down_and_two_up(tmp_path, tiny_world):
    cfg = tiny_cfg(
        tmp_path, *tiny_world, num_server_rounds=1, fraction_evaluate=0.0, wire_dtype="int8-down"
    )
    run_inprocess(cfg, num_nodes=NUM_CLIENTS)
    row = read_rows(cfg.output_path / "metrics.jsonl")[-1]
    state, _ = load_model_dir(cfg.output_path / "models" / "final")
    weights = sum(v.size for v in state.values())
    scales = 2 * sum(v.shape[0] if v.ndim > 1 else 1 for v in state.values())
    clients = row["clients_train"]
    assert clients == NUM_CLIENTS and row["train_loss"] > 0
    header = 256 * len(state)  # per serialized tensor, as above
    assert weights + scales <= row["bytes_down"] / clients <= weights + scales + 2 * header
    assert 2 * weights <= row["bytes_up"] / clients <= 2 * weights + header


def private_cfg(tmp_path, tiny_world, mode: str, **changes) -> Config:
    return tiny_cfg(
        tmp_path, *tiny_world, dp_mode=mode, fraction_evaluate=0.0, dp_delta=1e-3, **changes
    )


def test_clients_past_their_budget_decline_and_the_round_goes_on(tmp_path, tiny_world):
    # DP-SGD with a tiny budget and fixed noise: every client declines from the first round
    # on, and the federation still completes both rounds with an unchanged model.
    cfg = private_cfg(tmp_path, tiny_world, "sgd", dp_noise_multiplier=0.5, dp_target_epsilon=0.01)
    run_inprocess(cfg, num_nodes=NUM_CLIENTS)
    rows = read_rows(cfg.output_path / "metrics.jsonl")
    last = {r["round"]: r for r in rows}[2]
    assert last["clients_declined"] == NUM_CLIENTS and last["clients_train"] == 0
    assert (last["epsilon"], last["dp_unit"], last["dp_composition"]) == (
        0.01,
        "user",
        "cumulative per client, capped",
    )


class RecordingGrid(InProcessGrid):
    """Notes what every training reply carried as it left the client."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[set[str], dict]] = []

    def push_messages(self, messages):
        ids = list(super().push_messages(messages))
        for reply in (self.replies[i] for i in ids):
            assert not reply.has_error(), reply.error
            if reply.metadata.message_type == "train":
                self.seen.append((set(reply.content.keys()), dict(reply.content["metrics"])))
        return ids


@pytest.mark.parametrize("mode", ["fedavg", "sgd"])
def test_a_private_reply_carries_the_noised_or_clipped_update_and_nothing_else(
    tmp_path, tiny_world, mode
):
    cfg = private_cfg(
        tmp_path,
        tiny_world,
        mode,
        partition="user",
        fraction_train=0.5,
        dp_noise_multiplier=1.0,
        dp_target_epsilon=1000.0,
    )
    grid = RecordingGrid(create_client_app(cfg), num_nodes=24)
    run_federation(grid, cfg)
    assert grid.seen
    for keys, metrics in grid.seen:
        assert keys == {"arrays", "metrics"}
        assert metrics == {"num-examples": 1, "declined": 0}
    # asked to evaluate anyway (another ServerApp), a private client declines
    final = to_arrays(load_model_dir(cfg.output_path / "models" / "final")[0])
    content = RecordDict({"arrays": final, "config": ConfigRecord({"split": "valid"})})
    ask = grid.create_message(content, "evaluate", next(iter(grid.contexts)), "x")
    (answer,) = grid.send_and_receive([ask])
    assert dict(answer.content["metrics"]) == {"num-examples": 0, "declined": 1}


def test_dp_fedavg_accounts_epsilon_over_rounds_at_the_sampling_rate(tmp_path, tiny_world):
    cfg = private_cfg(
        tmp_path,
        tiny_world,
        "fedavg",
        partition="user",
        fraction_train=0.25,
        num_server_rounds=3,
        dp_target_epsilon=20.0,
    )
    run_federation(InProcessGrid(create_client_app(cfg), num_nodes=24), cfg)
    lines = (cfg.output_path / "metrics.jsonl").read_text().splitlines()
    rows = {r["round"]: r for r in map(json.loads, lines)}
    sigma = rows[3]["dp_noise_multiplier"]
    accountant = RDPAccountant()  # the reference: one Poisson-sampled Gaussian step per round
    for rnd in (1, 2, 3):
        accountant.step(noise_multiplier=sigma, sample_rate=0.25)
        assert rows[rnd]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-3), rel=1e-9)
    assert rows[3]["epsilon"] == pytest.approx(20.0, rel=1e-3)  # calibrated: spends the budget
    assert rows[3]["dp_noise_std"] == pytest.approx(sigma * 1.0 / (0.25 * 24))
    assert (rows[3]["dp_unit"], rows[3]["dp_accountant"], rows[3]["dp_delta"]) == (
        "user",
        "rdp",
        1e-3,
    )
    _, meta = load_model_dir(cfg.output_path / "models" / "final")
    assert meta["privacy"]["epsilon"] == rows[3]["epsilon"]
    assert meta["privacy"]["dp_composition"] == "cumulative over rounds"
    with pytest.raises(ValueError, match="more than 1 / 24 users"):
        run_federation(
            InProcessGrid(create_client_app(cfg), num_nodes=24), cfg.replace(dp_delta=0.1)
        )


def test_a_run_repeats_with_its_seed(tmp_path, tiny_world):
    """Half the clients a round: Flower draws the cohort with Python's random, which the
    ServerApp seeds from the run, so the same config gives the same rows."""

    def rows(name: str) -> list[tuple]:
        cfg = tiny_cfg(
            tmp_path / name,
            *tiny_world,
            fraction_train=0.5,
            fraction_evaluate=0.0,
            num_partitions=8,
            num_server_rounds=3,
        )
        run_inprocess(cfg, num_nodes=8)
        lines = (cfg.output_path / "metrics.jsonl").read_text().splitlines()
        return [
            (r["round"], r.get("train_loss"), r.get("val_ndcg@10")) for r in map(json.loads, lines)
        ]

    first = rows("a")
    random.seed(12345)  # whatever else used the global generator in between
    assert rows("b") == first


@pytest.mark.parametrize(
    ("changes", "fix"),
    [
        ({"partition": "user"}, 'num-supernodes=24"'),  # 24 users, one client each
        ({"partition": "iid", "num_partitions": 4}, 'num-partitions=3"'),
    ],
)
def test_a_simulation_with_the_wrong_node_count_fails_at_once_naming_the_fix(
    tmp_path, tiny_world, changes, fix
):
    """`flwr run .` on Flower's default local federation has a handful of nodes: the ServerApp
    says which setting to change instead of waiting forever for the rest."""
    cfg = tiny_cfg(tmp_path, *tiny_world, **changes)
    grid = InProcessGrid(create_client_app(cfg), num_nodes=3)
    with pytest.raises(ValueError, match="has 3 node") as caught:
        run_federation(grid, cfg)
    assert fix in str(caught.value)
    assert not (cfg.output_path / "metrics.jsonl").exists()  # failed before round 0


def test_every_key_of_a_round_row_is_declared_with_its_type(tmp_path, tiny_world):
    """The metrics row is a contract (common/rounds.py RoundRow): what the ServerApp writes,
    with central and federated evaluation on, is declared there with the type written."""
    import typing

    from common.rounds import ROUND_KEYS, RoundRow

    cfg = tiny_cfg(tmp_path, *tiny_world, fraction_evaluate=1.0, num_server_rounds=2)
    run_inprocess(cfg, num_nodes=NUM_CLIENTS)
    rows = read_rows(cfg.output_path / "metrics.jsonl")
    hints = typing.get_type_hints(RoundRow)
    written = {key for row in rows for key in row}
    assert {"val_ndcg@10", "test_ndcg@10", "fed_ndcg@10", "bytes_per_client"} <= written
    assert written <= ROUND_KEYS
    for row in rows:
        for key, value in row.items():
            allowed = typing.get_args(hints[key]) or (hints[key],)
            kinds = tuple(typing.get_origin(a) or a for a in allowed)
            kinds = tuple(type(None) if a is None else a for a in kinds)
            if float in kinds:
                kinds += (int,)  # JSON writes 3.0 as 3.0, but a float field may hold an int
            assert isinstance(value, kinds), (key, value, hints[key])
