"""fedrec-emulate's batched round against the real ServerApp and ClientApp (in process)."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import Config
from common.weights import load_model_dir, trainable_state
from simulations.emulate import (
    Emulation,
    check_emulable,
    emulate,
    kept_runs,
    markdown,
    summarise,
)
from simulations.inprocess import run_inprocess
from tests.tiny import world_config

NUM_USERS = 24  # tests/conftest.py tiny_world


def one_step_fedadam(tmp_path, backbone, data, **changes) -> Config:
    """fed-k0's recipe on the tiny model, one user per client, every client in the round;
    float32 on the wire and no norm bound, which the emulation leaves out."""
    run = dict(
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
    return world_config(tmp_path, backbone, data, **{**run, **changes})


@pytest.mark.parametrize("restart_every", [0, 1])
def test_emulated_rounds_move_the_model_as_the_federation_does(tmp_path, tiny_world, restart_every):
    """Two rounds: the second also checks FedAdam's moments and bias correction (at a
    server-beta2 other than Flower's default, and restarted every round with
    server-restart-every = 1), and the server's moving average of the global model
    (server-ema)."""
    rounds = 2
    cfg = one_step_fedadam(
        tmp_path,
        *tiny_world,
        num_server_rounds=rounds,
        server_ema=0.5,
        server_beta2=0.9,
        server_restart_every=restart_every,
    )
    run_inprocess(cfg)
    checkpoint = tmp_path / "out" / "models" / f"round-{rounds:03d}"
    federated, _ = load_model_dir(checkpoint)
    federated_average, _ = load_model_dir(checkpoint / "average")

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
        # float32 sums in another order: a few units in the last place of values near 2
        np.testing.assert_allclose(emulated[key], federated[key], rtol=1e-6, atol=1e-6, err_msg=key)
    names = [n for n, p in emulation.model.named_parameters() if p.requires_grad]
    for key, average in zip(names, emulation.average, strict=True):
        np.testing.assert_allclose(
            average.numpy(), federated_average[key], rtol=0, atol=1e-6, err_msg=key
        )


def test_a_growing_cohort_draws_as_many_clients_a_round_as_the_strategy(tmp_path, tiny_world):
    """1 of 24 users in round 1 to all 24 in round 3: int(24 x 25/48) = 12 in round 2, the
    sizes server/strategy.py's scheduled_fraction gives Flower's FedAvg."""
    cfg = one_step_fedadam(
        tmp_path,
        *tiny_world,
        num_server_rounds=3,
        evaluate_every=3,
        fraction_train=1 / NUM_USERS,
        fraction_train_final=1.0,
    )
    result = emulate(cfg, progress=False)
    assert (result["cohort"], result["client_updates"]) == ("1-24", 1 + 12 + 24)


def test_shuffled_cohorts_go_over_every_user_once_a_pass(tmp_path, tiny_world, monkeypatch):
    """client-sampling = shuffled: 6 of 24 users a round, rounds 1-4 and 5-8 each train all 24
    once (fresh draws, the default, repeat some users within 4 rounds)."""
    cohorts = []
    step = Emulation.step

    def recording(self, cohort, server_round, server_rate):
        cohorts.append(sorted(int(u) for u in cohort))
        return step(self, cohort, server_round, server_rate)

    monkeypatch.setattr(Emulation, "step", recording)
    for sampling in ("shuffled", "random"):
        cfg = one_step_fedadam(
            tmp_path,
            *tiny_world,
            num_server_rounds=8,
            evaluate_every=8,
            fraction_train=6 / NUM_USERS,
            client_sampling=sampling,
        )
        emulate(cfg, progress=False)
    shuffled, fresh = cohorts[:8], cohorts[8:]
    assert sorted(sum(shuffled[:4], [])) == sorted(sum(shuffled[4:], [])) == list(range(24))
    assert len(set(sum(fresh[:4], []))) < 24


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


def test_the_table_gives_mean_and_spread_over_seeds_and_one_seed_without_a_spread():
    def run(seed, val, test):
        return {
            "seed": seed,
            "best_val_ndcg@10": val,
            "test_ndcg@10": test,
            "test_hr@10": 0.2,
            "rounds": 750,
            "cohort": 18,
        }

    three = summarise(
        "a", {"fraction-train": 0.02}, [run(42, 0.1, 0.08), run(43, 0.12, 0.1), run(44, 0.11, 0.09)]
    )
    one = summarise("b", {}, [run(42, 0.1, 0.08)])
    table = markdown([three, one]).splitlines()
    assert table[2] == (
        "| a | fraction-train=0.02 | 750 x 18 | 42, 43, 44 | 0.1100 ± 0.0082 | 0.0900 ± 0.0082 |"
    )
    assert table[3] == "| b | — | 750 x 18 | 42 | 0.1000 | 0.0800 |"


def test_rerunning_some_seeds_keeps_the_others_only_for_the_same_variant(
    tmp_path, monkeypatch, capsys
):
    import json

    import simulations.emulate as emu

    def fake(cfg, progress=True, clients="users"):  # a run's record, from the config
        return {
            "seed": cfg.seed,
            "best_val_ndcg@10": cfg.server_learning_rate + cfg.seed / 1000,
            "best_round": 1,
            "test_ndcg@10": 0.1,
            "test_hr@10": 0.2,
            "rounds": cfg.num_server_rounds,
            "cohort": 5,
        }

    monkeypatch.setattr(emu, "emulate", fake)
    scenario = tmp_path / "scenario.toml"
    scenario.write_text("[run]\nnum-server-rounds = 10\n")
    variants = tmp_path / "v.toml"

    def run(rate, *seeds):
        variants.write_text(f'["a"]\nserver-learning-rate = {rate}\n')
        argv = ["--scenario", str(scenario), "--variants", str(variants)]
        emu.main([*argv, "--results", str(tmp_path), "--seeds", *map(str, seeds)])
        (row,) = json.loads((tmp_path / "v.json").read_text())
        return [(r["seed"], round(r["best_val_ndcg@10"], 4)) for r in row["per_seed"]]

    assert run(0.01, 43, 44) == [(43, 0.053), (44, 0.054)]
    assert run(0.01, 42) == [(42, 0.052), (43, 0.053), (44, 0.054)]  # 42 added
    assert run(0.01, 43) == [(42, 0.052), (43, 0.053), (44, 0.054)]  # 43 replaced
    assert "replacing them" not in capsys.readouterr().err
    assert run(0.02, 42) == [(42, 0.062)]  # other overrides: the stored seeds are not its own
    assert "replacing them" in capsys.readouterr().err


def test_kept_runs_need_the_same_scenario():
    stored = summarise(
        "a",
        {},
        [
            {
                "seed": 43,
                "best_val_ndcg@10": 0.1,
                "test_ndcg@10": 0.1,
                "test_hr@10": 0.2,
                "rounds": 1,
                "cohort": 1,
            }
        ],
        "x.toml",
    )
    new = [dict(stored["per_seed"][0], seed=42)]
    assert [r["seed"] for r in kept_runs(stored, {}, "x.toml", new)] == [42, 43]
    assert [r["seed"] for r in kept_runs(stored, {}, "y.toml", new)] == [42]
    assert [r["seed"] for r in kept_runs(None, {}, "x.toml", new)] == [42]


def test_windows_as_clients_take_the_same_full_cohort_step_as_users(tmp_path, tiny_world):
    """Every window its own client (the diagnostic of central batches): with every client in
    the round and no weight cap, each target weighs 1/W either way, so one step is the same."""
    import torch

    from common.task import item_states, load_data

    cfg = one_step_fedadam(tmp_path, *tiny_world, max_client_weight=1e9, wire_dtype="half")
    dataset, splits = load_data(cfg)
    users = list(splits)
    items = item_states(cfg, dataset.catalog)
    after = {}
    for clients in ("users", "windows"):
        torch.manual_seed(0)
        run = Emulation(cfg, users, items, len(dataset.catalog), clients=clients)
        run.step(np.arange(len(run.windows)), 1, cfg.server_learning_rate)
        after[clients] = trainable_state(run.model)
    assert len(run.windows) == len(run.records.user) > len(users)
    for key, value in after["users"].items():
        np.testing.assert_allclose(after["windows"][key], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="clients must be"):
        Emulation(cfg, users, items, len(dataset.catalog), clients="items")
