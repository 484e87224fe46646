"""The model keeps one example per row: Opacus's per-sample gradients are per example."""

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from common.train import batch_logits, evaluate, loss_fn, pooled_table, sample_candidates, train
from common.weights import trainable_state
from tests.tiny import NUM_ITEMS, tiny_examples, tiny_setup


@pytest.mark.parametrize("k", [0, 1])
def test_per_sample_gradients_equal_one_example_at_a_time(k):
    cfg, model, items, _ = tiny_setup(k)
    model.train()
    # Make every tensor non-trivial so that no gradient is zero by construction.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ex = tiny_examples()
    history = torch.from_numpy(ex.history[:5])
    target = torch.from_numpy(ex.target[:5])
    candidates = sample_candidates(
        target,
        num_items=NUM_ITEMS,
        num_negatives=cfg.num_negatives,
        generator=torch.Generator().manual_seed(0),
    )
    table = pooled_table(model, items)

    def loss_of(module, rows):
        logits = batch_logits(
            module, history[rows], candidates[rows], items=items, table=table, k=k
        )
        return loss_fn(logits) * len(rows)  # summed over examples

    # Reference: one backward pass per example.
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reference = []
    for i in range(len(target)):
        model.zero_grad()
        loss_of(model, [i]).backward()
        reference.append({n: p.grad.clone() for n, p in params.items()})

    # Opacus's hooks on the batch.
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm.zero_grad()
    loss_of(gsm, list(range(len(target)))).backward()
    for name, p in params.items():
        assert p.grad_sample.shape[0] == len(target), name
        for i in range(len(target)):
            torch.testing.assert_close(p.grad_sample[i], reference[i][name], rtol=1e-4, atol=1e-5)
    gsm.remove_hooks()


@pytest.mark.parametrize("k", [0, 1])
def test_training_lowers_the_loss_and_improves_ranking(k):
    cfg, model, items, _ = tiny_setup(k, learning_rate=0.01)
    ex = tiny_examples(num_users=8)
    first = train(model=model, cfg=cfg, examples=ex, items=items, epochs=1, seed=0)
    for epoch in range(1, 8):
        last = train(model=model, cfg=cfg, examples=ex, items=items, epochs=1, seed=epoch)
    assert last.loss < first.loss
    assert last.num_examples == len(ex)


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
    from common.train import EvalCase, item_vectors, left_pad, user_vectors

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


@pytest.mark.parametrize("k", [0, 1])
def test_shared_fast_path_gives_the_same_logits(k):
    cfg, model, items, _ = tiny_setup(k)
    ex = tiny_examples()
    history, target = torch.from_numpy(ex.history[:6]), torch.from_numpy(ex.target[:6])
    candidates = sample_candidates(
        target, num_items=NUM_ITEMS, num_negatives=4, generator=torch.Generator().manual_seed(1)
    )
    model.eval()
    table = pooled_table(model, items)
    with torch.no_grad():
        per_example = batch_logits(model, history, candidates, items=items, table=table, k=k)
        shared = batch_logits(
            model, history, candidates, items=items, table=table, k=k, shared=True
        )
    torch.testing.assert_close(shared, per_example, rtol=1e-4, atol=1e-5)
