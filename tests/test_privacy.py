"""Client-side DP-SGD: adapters move, the backbone does not, the ledger composes and persists."""

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from common.privacy import BudgetExceeded, PrivacyLedger, guarantee
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
    with pytest.raises(BudgetExceeded, match="privacy budget spent.*window-level.*delta"):
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
    g = guarantee(2.5, 1e-5)
    assert g == {
        "epsilon": 2.5,
        "delta": 1e-5,
        "unit": "window",
        "accountant": "rdp",
        "composition": "cumulative",
    }
