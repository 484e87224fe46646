"""User-level DP: DP-SGD's adapters move and the backbone does not, the ledger composes and
persists, the noise cannot be replayed, and the terms of every epsilon are named."""

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from common.privacy import BudgetExceeded, PrivacyLedger, fedavg_epsilon, guarantee
from common.train import PrivacySettings, train
from common.weights import trainable_state
from tests.tiny import tiny_records, tiny_setup


def settings(path, **changes):
    base = dict(
        ledger=PrivacyLedger.load(path),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-5,
        target_epsilon=100.0,
        planned_rounds=3,
    )
    return PrivacySettings(**{**base, **changes})


def step(model, cfg, records, items, *, seed, privacy):
    """One local epoch of private training."""
    return train(
        model=model,
        cfg=cfg,
        records=records,
        items=items,
        epochs=1,
        seed=seed,
        privacy=privacy,
    )


@pytest.mark.parametrize("k", [0, 1])
def test_one_private_step_moves_every_adapter_and_no_backbone_tensor(tmp_path, k):
    cfg, model, items, bert = tiny_setup(k, batch_size=64, num_negatives=3)
    ex = tiny_records(num_users=2, length=6)  # 2 windows: one Poisson batch per epoch
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    bert_before = {n: p.detach().clone() for n, p in bert.named_parameters()}
    before = trainable_state(model)
    result = step(model, cfg, ex, items, seed=0, privacy=settings(tmp_path / "ledger.json"))
    assert result.steps == 1
    after = trainable_state(model)
    unchanged = [n for n in before if np.array_equal(before[n], after[n])]
    assert not unchanged, f"private step left these trainable tensors unchanged: {unchanged}"
    if k:
        assert any(".lora_A." in n for n in before) and any(".lora_B." in n for n in before)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.detach().equal(frozen[name]), name  # bit-identical
    for name, p in bert.named_parameters():
        assert p.detach().equal(bert_before[name]), name


def test_epsilon_composes_across_rounds_and_survives_a_restart(tmp_path):
    cfg, model, items, _ = tiny_setup(0, num_negatives=3)
    ex = tiny_records()
    path = tmp_path / "client" / "ledger.json"
    first = train(
        model=model, cfg=cfg, records=ex, items=items, epochs=1, seed=0, privacy=settings(path)
    )
    # A restart: a new process reads the ledger from disk.
    reloaded = PrivacyLedger.load(path)
    assert reloaded.epsilon(1e-5) == pytest.approx(first.epsilon)
    second = train(
        model=model, cfg=cfg, records=ex, items=items, epochs=1, seed=1, privacy=settings(path)
    )
    assert second.epsilon > first.epsilon  # never resets
    # Reference: one accountant that saw both rounds' steps.
    history = PrivacyLedger.load(path).history
    steps = sum(n for _, _, n in history)
    sigma, q, _ = history[0]
    reference = RDPAccountant()
    reference.history = [(sigma, q, steps)]
    assert second.epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)


def test_spent_budget_declines_and_leaves_the_ledger_untouched(tmp_path):
    cfg, model, items, _ = tiny_setup(0, num_negatives=3)
    ex = tiny_records()
    path = tmp_path / "ledger.json"
    first = step(model, cfg, ex, items, seed=0, privacy=settings(path, target_epsilon=50.0))
    spent = PrivacyLedger.load(path).history
    with pytest.raises(BudgetExceeded, match="privacy budget spent.*user-level.*delta"):
        step(
            model,
            cfg,
            ex,
            items,
            seed=1,
            privacy=settings(path, target_epsilon=first.epsilon * 1.01),
        )
    assert PrivacyLedger.load(path).history == spent


def test_calibrated_noise_spends_the_budget_over_the_planned_rounds(tmp_path):
    cfg, model, items, _ = tiny_setup(0, num_negatives=3)
    ex = tiny_records()
    path = tmp_path / "ledger.json"
    eps = []
    for r in range(3):
        res = step(
            model,
            cfg,
            ex,
            items,
            seed=r,
            privacy=settings(path, noise_multiplier=0.0, target_epsilon=4.0),
        )
        eps.append(res.epsilon)
    assert eps[0] < eps[1] < eps[2] <= 4.0 * 1.001
    assert eps[2] == pytest.approx(4.0, rel=0.02)
    with pytest.raises(BudgetExceeded):
        step(
            model,
            cfg,
            ex,
            items,
            seed=9,
            privacy=settings(path, noise_multiplier=0.0, target_epsilon=4.0),
        )


def test_unreadable_ledger_refuses_instead_of_resetting(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable.*Refusing to train"):
        PrivacyLedger.load(path)


def test_guarantee_names_delta_unit_accountant_and_composition():
    assert guarantee(2.5, 1e-5, "fedavg") == {
        "epsilon": 2.5,
        "dp_delta": 1e-5,
        "dp_unit": "user",
        "dp_mode": "fedavg",
        "dp_accountant": "rdp",
        "dp_composition": "cumulative over rounds",
    }
    assert guarantee(8.0, 1e-5, "sgd")["dp_composition"] == "cumulative per client, capped"


def test_a_replay_with_everything_the_server_knows_does_not_reproduce_the_update(tmp_path):
    """The server knows the global model, the config and the seed a client derives from the
    run seed, the round and its node id. Replaying the client's round with all of them
    reproduces a non-private update bit for bit, and no tensor of a private one."""

    def client_round(privacy):
        cfg, model, items, _ = tiny_setup(0, num_negatives=3, batch_size=4)
        step(model, cfg, tiny_records(), items, seed=42 + 100_003 * 3 + 7, privacy=privacy)
        return trainable_state(model)

    plain = client_round(None), client_round(None)
    assert all(np.array_equal(plain[0][k], plain[1][k]) for k in plain[0])
    private = [client_round(settings(tmp_path / f"{i}" / "ledger.json")) for i in (0, 1)]
    assert not [k for k in private[0] if np.array_equal(private[0][k], private[1][k])]


def test_fedavg_epsilon_equals_a_fresh_accountant_stepped_once_per_round():
    sigma, q, delta = 1.1, 0.1, 1e-5
    accountant = RDPAccountant()
    for rounds in range(1, 31):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
        if rounds in (1, 10, 30):
            reference = accountant.get_epsilon(delta)
            assert fedavg_epsilon(sigma, q, rounds, delta) == pytest.approx(reference, rel=1e-9)
    assert fedavg_epsilon(sigma, q, 0, delta) == 0.0
