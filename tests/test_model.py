"""The model and its losses, checked against references: one example at a time, the slow
per-record path, direct autograd, Opacus's per-sample gradients versus a loop."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule

from common.records import build_records, left_pad
from common.train import (
    AdaptedTable,
    EvalCase,
    encoded_items,
    evaluate,
    item_vectors,
    record_candidates,
    record_loss,
    sample_candidates,
    shared_loss,
    train,
    user_vectors,
)
from common.weights import trainable_state
from tests.tiny import NUM_ITEMS, tiny_records, tiny_sequences, tiny_setup


def perturbed(model):
    """Every trainable tensor made non-trivial (LoRA's B and the adapter start at zero)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def batch_of(records):
    return torch.from_numpy(records.inputs), torch.from_numpy(records.targets)


def full_catalog():
    return sample_candidates(
        torch.zeros(0, dtype=torch.long),
        num_items=NUM_ITEMS,
        num_negatives=0,
        generator=torch.Generator(),
    )


@pytest.mark.parametrize("k", [0, 1])
def test_sequence_loss_equals_the_sum_of_per_example_losses(k):
    """One causal pass over each sequence = one pass per (history, next item) example, each
    ranked against the whole catalog minus the items seen before it."""
    cfg, model, items, _ = tiny_setup(k)
    perturbed(model).eval()
    sequences = tiny_sequences(num_users=3, length=5)  # shorter than the history length (6)
    records = build_records(sequences, history_len=cfg.history_len)
    inputs, targets = batch_of(records)
    table = encoded_items(model, items, torch.arange(NUM_ITEMS))
    with torch.no_grad():
        sequence = shared_loss(model, inputs, targets, table, *full_catalog())
    sequence = float(sequence) * records.num_targets  # mean -> sum

    vectors = item_vectors(model, items)  # (N, D)
    reference = 0.0
    for seq in sequences:
        for t in range(1, len(seq)):
            user = user_vectors(model, vectors, left_pad(seq[:t], cfg.history_len)[None])
            logits = (user @ vectors.T)[0]
            logits[torch.from_numpy(seq[:t])] = float("-inf")  # seen before: not a candidate
            reference += float(F.cross_entropy(logits[None], torch.tensor([seq[t]])))
    assert sequence == pytest.approx(reference, rel=1e-5)


def test_sampled_softmax_with_every_item_drawn_equals_the_full_softmax():
    cfg, model, items, _ = tiny_setup(0)
    perturbed(model).eval()
    inputs, targets = batch_of(tiny_records())
    own = torch.cat([inputs.flatten(), targets.flatten()])
    candidates, log_q = sample_candidates(
        own, num_items=NUM_ITEMS, num_negatives=2000, generator=torch.Generator().manual_seed(0)
    )
    assert candidates.tolist() == list(range(NUM_ITEMS))  # 2000 draws of 24 items: all in
    assert torch.all(log_q[torch.isin(candidates, own)] == 0)
    with torch.no_grad():
        sampled = shared_loss(model, inputs, targets, items.states, candidates, log_q)
        full = shared_loss(model, inputs, targets, items.states, *full_catalog())
    assert float(sampled) == pytest.approx(float(full), rel=1e-6)


def test_sampled_candidates_correct_for_inclusion_probability():
    own = torch.tensor([3, 5, -1])
    candidates, log_q = sample_candidates(
        own, num_items=1000, num_negatives=10, generator=torch.Generator().manual_seed(1)
    )
    assert {3, 5} <= set(candidates.tolist()) and -1 not in candidates.tolist()
    drawn = ~torch.isin(candidates, own)
    expected = np.log(1 - (1 - 1 / 1000) ** 10)
    np.testing.assert_allclose(log_q[drawn].numpy(), expected, rtol=1e-6)


def test_k1_fast_path_logits_equal_the_per_record_path():
    """Items encoded once in a shared table (fast) = items run through LoRA inside each
    record with block-diagonal attention (slow, Opacus-safe): history and candidates alike."""
    cfg, model, items, _ = tiny_setup(1)
    perturbed(model).eval()
    inputs, targets = batch_of(tiny_records(num_users=2))
    candidates, input_col, _, _ = record_candidates(
        inputs, targets, num_items=NUM_ITEMS, num_negatives=4, generator=torch.Generator()
    )
    with torch.no_grad():
        slow = model(
            inputs, input_col, candidates, items.states[candidates], items.mask[candidates]
        )  # (B, L, C)
        table = encoded_items(model, items, torch.arange(NUM_ITEMS))
        vectors = model.items.head(table, torch.arange(NUM_ITEMS))
        states = model.user_states(vectors[inputs.clamp(min=0)], inputs >= 0)  # (B, L, D)
        fast = torch.einsum("bld,bcd->blc", states, vectors[candidates])
    valid = inputs >= 0
    torch.testing.assert_close(fast[valid], slow[valid], rtol=1e-4, atol=1e-5)


def test_adapted_table_gives_lora_the_same_gradient_as_direct_autograd():
    cfg, model, items, _ = tiny_setup(1)
    perturbed(model)
    inputs, targets = batch_of(tiny_records())
    candidates, log_q = full_catalog()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_" in n for n in params)

    model.zero_grad()  # direct: the table itself is computed with autograd through the blocks
    direct_table = model.items.encode(items.states, items.mask)
    shared_loss(model, inputs, targets, direct_table, candidates, log_q).backward()
    direct = {n: p.grad.clone() for n, p in params.items()}

    model.zero_grad()  # fast: a plain table, its gradient sent back through the blocks later
    adapted = AdaptedTable(model, items)
    shared_loss(model, inputs, targets, adapted.covering(candidates), candidates, log_q).backward()
    assert all(params[n].grad is None for n in params if ".lora_" in n)  # nothing yet
    adapted.flush()
    for name, p in params.items():
        torch.testing.assert_close(p.grad, direct[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_moves_only_at_a_refresh_and_the_table_follows():
    cfg, model, items, _ = tiny_setup(1, adapter_refresh_steps=2, learning_rate=0.01)
    perturbed(model)
    records = tiny_records()
    lora = lambda: {n: v for n, v in trainable_state(model).items() if ".lora_" in n}  # noqa: E731
    before = lora()
    train(model=model, cfg=cfg, records=records, items=items, steps=1, seed=0)
    # steps=1 is also the last step: the gathered gradient is applied at the end
    assert any(not np.array_equal(before[n], v) for n, v in lora().items())
    cfg2, model2, items2, _ = tiny_setup(1, adapter_refresh_steps=3, learning_rate=0.01)
    perturbed(model2)
    first = {n: v for n, v in trainable_state(model2).items() if ".lora_" in n}
    adapted = AdaptedTable(model2, items2)
    table = adapted.covering(torch.arange(NUM_ITEMS)).detach().clone()
    torch.testing.assert_close(table, model2.items.encode(items2.states, items2.mask).detach())
    assert first  # the table is what the blocks compute now, row for row


@pytest.mark.parametrize("k", [0, 1])
def test_per_sample_gradients_equal_one_record_at_a_time(k):
    cfg, model, items, _ = tiny_setup(k)
    perturbed(model).train()
    inputs, targets = batch_of(tiny_records(num_users=3))
    inputs, targets = inputs[:4], targets[:4]
    drawn = record_candidates(
        inputs, targets, num_items=NUM_ITEMS, num_negatives=3, generator=torch.Generator()
    )

    def loss_of(module, rows):
        return record_loss(module, inputs[rows], [d[rows] for d in drawn], items=items, k=k)

    # Reference: one backward pass per record.
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reference = []
    for i in range(len(inputs)):
        model.zero_grad()
        loss_of(model, [i]).backward()
        reference.append({n: p.grad.clone() for n, p in params.items()})

    # Opacus's hooks on the batch.
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm.zero_grad()
    loss_of(gsm, list(range(len(inputs)))).backward()
    for name, p in params.items():
        assert p.grad_sample.shape[0] == len(inputs), name
        for i in range(len(inputs)):
            torch.testing.assert_close(p.grad_sample[i], reference[i][name], rtol=1e-4, atol=1e-5)
    gsm.remove_hooks()


@pytest.mark.parametrize("k", [0, 1])
def test_training_lowers_the_loss(k):
    cfg, model, items, _ = tiny_setup(k, learning_rate=0.01)
    records = tiny_records(num_users=8)
    first = train(model=model, cfg=cfg, records=records, items=items, epochs=1, seed=0)
    for epoch in range(1, 8):
        last = train(model=model, cfg=cfg, records=records, items=items, epochs=1, seed=epoch)
    assert last.loss < first.loss
    assert last.num_targets == records.num_targets and last.num_windows == len(records)


def test_a_client_takes_the_fixed_number_of_steps_whatever_its_size():
    cfg, model, items, _ = tiny_setup(0, batch_size=4)
    small = build_records(tiny_sequences(num_users=1, length=4), history_len=6)  # one window
    large = tiny_records(num_users=8, length=20)  # 32 windows: 8 batches per pass
    for records in (small, large):
        result = train(model=model, cfg=cfg, records=records, items=items, steps=5, seed=0)
        assert result.steps == 5


def test_new_items_beyond_the_id_table_fall_back_to_text():
    cfg, model, items, _ = tiny_setup(0)
    ids = torch.tensor([[0, NUM_ITEMS + 3]])
    pooled = items.states[[0, 1]][None]
    with torch.no_grad():
        model.items.id_embedding.weight.fill_(1.0)
        with_id = model.items.head(pooled, ids)
        text_only = model.items.proj(model.items.adapter(pooled))
    torch.testing.assert_close(with_id[0, 1], text_only[0, 1])  # unknown id: text alone
    torch.testing.assert_close(with_id[0, 0], text_only[0, 0] + 1.0)


def test_evaluate_excludes_seen_items_and_matches_a_numpy_reference():
    from common.metrics import rank_of_target, ranking_metrics

    cfg, model, items, _ = tiny_setup(0)
    rng = np.random.default_rng(1)
    cases = []
    for _ in range(6):
        seq = rng.permutation(NUM_ITEMS)[:8]
        cases.append(EvalCase(seq[:-1], int(seq[-1]), seq[:-1]))
    metrics, ranks = evaluate(model=model, cfg=cfg, items=items, cases=cases, k=5)
    vectors = item_vectors(model, items)
    users = user_vectors(model, vectors, np.stack([left_pad(c.history, 6) for c in cases]))
    scores = (users @ vectors.T).numpy()
    expected = [rank_of_target(s, c.target, c.exclude) for s, c in zip(scores, cases, strict=True)]
    assert ranks.tolist() == expected
    assert metrics == ranking_metrics(np.array(expected), k=5)
    assert all(r <= NUM_ITEMS - 7 for r in ranks)  # 7 seen items never rank


def test_trainable_state_has_no_backbone_tensor():
    _, model, _, bert = tiny_setup(1)
    state = trainable_state(model)
    backbone_names = {n for n, _ in bert.named_parameters()}
    assert state and all(".lora_" in n or not n.startswith("items.blocks") for n in state)
    assert not any(n.split("items.blocks.0.")[-1] in backbone_names for n in state)


def test_sampled_table_rows_give_lora_an_unbiased_gradient():
    """With adapter-rows, only some rows go back through the blocks, importance-weighted:
    averaged over draws, LoRA's gradient is the full one."""
    cfg, model, items, _ = tiny_setup(1)
    perturbed(model)
    inputs, targets = batch_of(tiny_records(num_users=1))
    own = torch.cat([inputs.flatten(), targets.flatten()])
    candidates, log_q = full_catalog()
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}

    def lora_grad(max_rows, generator=None):
        model.zero_grad()
        adapted = AdaptedTable(model, items)
        table = adapted.covering(candidates, own)
        shared_loss(model, inputs, targets, table, candidates, log_q).backward()
        adapted.flush(max_rows=max_rows, generator=generator)
        return torch.cat([p.grad.flatten() for p in lora.values()])

    full = lora_grad(0)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([lora_grad(8, gen) for _ in range(400)])  # 8 of 24 rows each time
    assert not torch.allclose(draws[0], full, rtol=1e-3)  # one draw is an estimate...
    error = (draws.mean(0) - full).norm() / full.norm()
    assert error < 0.1, error  # ...and their mean is the full gradient


def test_the_adapted_table_is_computed_once_per_global_lora():
    from common import train as train_module

    cfg, model, items, _ = tiny_setup(1)
    perturbed(model)
    train_module._TABLES.clear()
    first = train_module.adapted_table(model, items)
    again = train_module.adapted_table(model, items)
    assert again is first and len(train_module._TABLES) == 1
    torch.testing.assert_close(first, model.items.encode(items.states, items.mask).detach())
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if ".lora_B" in n).add_(1.0)
    assert not torch.equal(train_module.adapted_table(model, items), first)  # new LoRA, new table


def test_a_reused_model_carries_nothing_from_one_client_to_the_next(tiny_backbone):
    from common.config import Config
    from common.task import build_model, reusable_model
    from common.weights import load_trainable_state
    from tests.tiny import TINY_CONFIG

    cfg = Config(**{**TINY_CONFIG, "max_tokens": 8, "learning_rate": 0.1})
    cfg = cfg.replace(adapter_k=1, backbone=str(tiny_backbone))
    _, _, items, _ = tiny_setup(1)
    items = type(items)(items.states[..., :32], items.mask)  # the tiny backbone is 32 wide
    start = trainable_state(perturbed(build_model(cfg, num_items=NUM_ITEMS)))

    def client(model, records):
        load_trainable_state(model, start)
        train(model=model, cfg=cfg, records=records, items=items, steps=2, seed=0)
        return trainable_state(model)

    first = reusable_model(cfg, num_items=NUM_ITEMS)
    client(first, tiny_records(seed=1))  # another client trains first
    again = reusable_model(cfg, num_items=NUM_ITEMS)
    assert again is first
    reused = client(again, tiny_records(seed=2))
    fresh = client(build_model(cfg, num_items=NUM_ITEMS), tiny_records(seed=2))
    for name in fresh:
        np.testing.assert_array_equal(reused[name], fresh[name], err_msg=name)
