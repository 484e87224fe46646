"""fedrec-emulate's batched round against the real ServerApp and ClientApp (in process)."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import Config
from common.weights import load_model_dir, trainable_state
from simulations.emulate import Emulation, check_emulable
from simulations.inprocess import run_inprocess
from tests.tiny import tiny_config

NUM_USERS = 24  # tests/conftest.py tiny_world


def one_step_fedadam(tmp_path, backbone, data, **changes) -> Config:
    """fed-k0's recipe on the tiny model, one user per client, every client in the round;
    float32 on the wire and no norm bound, which the emulation leaves out."""
    run = dict(
        backbone=str(backbone),
        dataset="path",
        data_path=str(data),
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
        partition="user",
        fraction_train=1.0,
        fraction_evaluate=0.0,
        central_eval=False,
        local_steps=1,
        local_optimizer="sgd",
        learning_rate=1.0,
        strategy="fedadam",
        server_learning_rate=0.01,
        # Adam divides by |update| + tau: at fed-k0's 1e-6, coordinates whose gradient is near
        # zero magnify float32 summation-order noise (batched vs per client) to 2e-5
        server_tau=1e-3,
        max_client_weight=20.0,  # binds for some users: the cap is emulated too
        wire_dtype="float32",
        update_norm_limit=0.0,
        max_tokens=8,
        batch_size=64,
    )
    return tiny_config(**{**run, **changes})


def test_emulated_rounds_move_the_model_as_the_federation_does(tmp_path, tiny_world):
    """Two rounds: the second also checks FedAdam's moments and bias correction."""
    rounds = 2
    cfg = one_step_fedadam(tmp_path, *tiny_world, num_server_rounds=rounds)
    run_inprocess(cfg)
    federated, _ = load_model_dir(tmp_path / "out" / "models" / f"round-{rounds:03d}")

    from common.task import item_states, load_data

    dataset, splits = load_data(cfg)
    users = list(splits)
    assert len(users) == NUM_USERS
    emulation = Emulation(cfg, users, item_states(cfg, dataset.catalog), len(dataset.catalog))
    start = trainable_state(emulation.model)
    for r in range(1, rounds + 1):
        emulation.step(np.arange(len(users)), r, cfg.server_learning_rate)
    emulated = trainable_state(emulation.model)
    assert federated.keys() == emulated.keys()
    moved = max(np.abs(emulated[k] - start[k]).max() for k in start)
    assert moved > 1e-3  # the round did something
    for key in federated:
        np.testing.assert_allclose(emulated[key], federated[key], rtol=0, atol=1e-6, err_msg=key)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"local_steps": 2}, "local-steps must be 1"),
        ({"strategy": "fedavg"}, "strategy must be 'fedadam'"),
        ({"num_negatives": 8}, "num-negatives must be 0"),
    ],
)
def test_what_the_emulation_cannot_reproduce_is_refused_by_name(
    tmp_path, tiny_world, changes, named
):
    with pytest.raises(ValueError, match=named):
        check_emulable(one_step_fedadam(tmp_path, *tiny_world, **changes))
