"""A two-round federation in-process: the loss falls, metrics and checkpoints are produced."""

import json

import numpy as np
import pytest
from flwr.simulation import run_simulation

from client.client_app import create_app as create_client_app
from common.config import Config
from common.weights import load_model_dir
from common.wire import update_shape
from server.server_app import create_app as create_server_app
from tests.fixtures import make_synthetic_dataset, make_tiny_backbone

NUM_CLIENTS = 4


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return make_tiny_backbone(root / "bert"), make_synthetic_dataset(root / "data", num_users=24)


def run(cfg: Config) -> list[dict]:
    run_simulation(
        server_app=create_server_app(cfg),
        client_app=create_client_app(cfg),
        num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    lines = (cfg.output_path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def tiny_cfg(tmp_path, backbone, data, **changes) -> Config:
    base = dict(
        backbone=str(backbone),
        dataset="path",
        data_path=str(data),
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
        partition="iid",
        num_partitions=NUM_CLIENTS,
        num_server_rounds=2,
        local_steps=3,
        learning_rate=0.01,
        model_dim=16,
        bottleneck_dim=8,
        history_len=8,
        num_negatives=8,
        user_layers=1,
        max_tokens=8,
        batch_size=16,
    )
    return Config(**{**base, **changes})


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
    cfg = tiny_cfg(tmp_path, *tiny_world, num_server_rounds=1)
    run(cfg)
    rows = run(cfg.replace(num_server_rounds=2, resume=True))
    assert [r["round"] for r in rows] == [0, 1, 2]
    _, meta = load_model_dir(cfg.output_path / "models" / "final")
    assert meta["round"] == 2


def test_clients_past_their_budget_decline_and_the_round_goes_on(tmp_path, tiny_world):
    # Tiny budget with fixed noise: every client declines from the first round on, and the
    # federation still completes both rounds with an unchanged model.
    cfg = tiny_cfg(
        tmp_path, *tiny_world, dp_enabled=True, dp_noise_multiplier=0.5, dp_target_epsilon=0.01
    )
    rows = run(cfg)
    last = {r["round"]: r for r in rows}[2]
    assert last["clients_declined"] == NUM_CLIENTS and last["clients_train"] == 0


def test_private_federation_reports_cumulative_epsilon(tmp_path, tiny_world):
    cfg = tiny_cfg(
        tmp_path, *tiny_world, dp_enabled=True, dp_noise_multiplier=1.0, dp_target_epsilon=1000.0
    )
    rows = {r["round"]: r for r in run(cfg)}
    assert rows[2]["epsilon_max"] > rows[1]["epsilon_max"] > 0
    assert rows[2]["epsilon_mean"] <= rows[2]["epsilon_max"]
    assert (rows[2]["epsilon_unit"], rows[2]["accountant"], rows[2]["composition"]) == (
        "window",
        "rdp",
        "cumulative",
    )
    assert rows[2]["dp_delta"] == cfg.dp_delta
    _, meta = load_model_dir(cfg.output_path / "models" / "final")
    privacy = meta["privacy"]
    assert privacy["epsilon"] == max(r["epsilon_max"] for r in rows.values() if r["round"])
    assert (privacy["delta"], privacy["unit"], privacy["composition"]) == (
        cfg.dp_delta,
        "window",
        "cumulative",
    )
