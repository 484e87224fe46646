"""Local training and full-ranking evaluation as plain functions (no Flower)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from common.backbone import ItemStates
from common.config import Config
from common.metrics import ranking_metrics
from common.model import Recommender
from common.privacy import BudgetExceeded, PrivacyLedger, choose_noise_multiplier

PAD = -1  # history padding id


@dataclass(frozen=True)
class Examples:
    """Training examples: each is one target interaction with the history before it."""

    history: np.ndarray  # (n, L) int64 item ids, left-padded with PAD
    target: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return int(self.target.shape[0])


def left_pad(items: np.ndarray, length: int) -> np.ndarray:
    """The last `length` items, left-padded with PAD: (len,) -> (length,)."""
    out = np.full(length, PAD, dtype=np.int64)
    tail = np.asarray(items, dtype=np.int64)[-length:]
    if len(tail):
        out[-len(tail) :] = tail
    return out


def build_examples(sequences: list[np.ndarray], *, history_len: int) -> Examples:
    """One example per interaction after a user's first: (last L items before it, it)."""
    histories, targets = [], []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        for t in range(1, len(seq)):
            histories.append(left_pad(seq[:t], history_len))
            targets.append(seq[t])
    if not targets:
        return Examples(np.zeros((0, history_len), np.int64), np.zeros(0, np.int64))
    return Examples(np.stack(histories), np.asarray(targets, dtype=np.int64))


def sample_candidates(
    target: torch.Tensor, *, num_items: int, num_negatives: int, generator: torch.Generator
) -> torch.Tensor:
    """Each example's target followed by its own uniform negatives: (B,) -> (B, 1+N)."""
    b = target.shape[0]
    neg = torch.randint(0, num_items, (b, num_negatives), generator=generator)
    # A negative that hits the target is moved to another item (uniform over the rest).
    shift = torch.randint(1, max(num_items, 2), (b, num_negatives), generator=generator)
    clash = neg == target[:, None]
    neg = torch.where(clash, (neg + shift) % num_items, neg)
    return torch.cat([target[:, None], neg], dim=1)


@torch.no_grad()
def pooled_table(model: Recommender, items: ItemStates, batch_size: int = 256) -> torch.Tensor:
    """Pooled states of every catalog item after the adapted blocks, without gradient: (N, H)."""
    if not model.items.k:
        return items.states
    was_training = model.training
    model.eval()
    out = [
        model.items.pooled(
            items.states[i : i + batch_size][:, None], items.mask[i : i + batch_size][:, None]
        )[:, 0]
        for i in range(0, items.states.shape[0], batch_size)
    ]
    model.train(was_training)
    return torch.cat(out)


def batch_logits(
    model: torch.nn.Module,
    history: torch.Tensor,
    candidates: torch.Tensor,
    *,
    items: ItemStates,
    table: torch.Tensor,
    k: int,
    shared: bool = False,
) -> torch.Tensor:
    """Logits (B, C) for a batch.

    Per-example (default): every tensor keeps the example as its first dimension, as DP-SGD
    needs. `shared`: each distinct item is encoded once per batch (non-private only).
    """
    if shared:
        return model.forward_shared(history, candidates, table, items.states, items.mask)
    hist_pooled = table[history.clamp(min=0)]  # (B, L, H), frozen for this round
    if k:
        states, mask = items.states[candidates], items.mask[candidates]  # (B, C, T, H), (B, C, T)
    else:
        states, mask = items.states[candidates], None  # (B, C, H)
    return model(history, hist_pooled, candidates, states, mask)


def loss_fn(logits: torch.Tensor) -> torch.Tensor:
    """Sampled softmax: the target is candidate 0."""
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))


@dataclass(frozen=True)
class PrivacySettings:
    """Client-side DP-SGD for one round."""

    ledger: PrivacyLedger
    noise_multiplier: float  # 0 = calibrate to the budget over `planned_rounds`
    max_grad_norm: float
    delta: float
    target_epsilon: float
    planned_rounds: int


@dataclass(frozen=True)
class TrainResult:
    """What a local training round produced."""

    loss: float  # mean training loss over the round's batches
    num_examples: int
    steps: int
    seconds: float
    epsilon: float | None  # cumulative, record-level, at the ledger's delta
    noise_multiplier: float | None


def train(
    *,
    model: Recommender,
    cfg: Config,
    examples: Examples,
    items: ItemStates,
    epochs: int,
    seed: int,
    privacy: PrivacySettings | None = None,
    max_seconds: float | None = None,
) -> TrainResult:
    """Train the model's trainable tensors in place; privately when `privacy` is given.

    `max_seconds` stops early (a wall-clock budget for benchmarks); the ledger still records
    exactly the steps taken.
    """
    start = time.perf_counter()
    n = len(examples)
    if n == 0:
        return TrainResult(0.0, 0, 0, 0.0, None, None)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(torch.from_numpy(examples.history), torch.from_numpy(examples.target))
    loader = DataLoader(
        dataset, batch_size=min(cfg.batch_size, n), shuffle=True, generator=generator
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate)
    train_model: torch.nn.Module = model
    engine = sigma = None
    model.train()
    if privacy is not None:
        train_model, optimizer, loader, engine, sigma = _make_private(
            model, optimizer, loader, privacy=privacy, epochs=epochs
        )
    table = pooled_table(model, items)
    num_items = items.states.shape[0]
    losses, steps = [], 0
    for _ in range(epochs):
        for history, target in loader:
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
            candidates = sample_candidates(
                target, num_items=num_items, num_negatives=cfg.num_negatives, generator=generator
            )
            optimizer.zero_grad(set_to_none=True)
            logits = batch_logits(
                train_model,
                history,
                candidates,
                items=items,
                table=table,
                k=model.items.k,
                shared=privacy is None,
            )
            loss = loss_fn(logits) if len(target) else logits.sum() * 0.0
            with warnings.catch_warnings():
                # Opacus hooks fire on module outputs: the frozen inputs need no gradient.
                warnings.filterwarnings("ignore", message="Full backward hook")
                loss.backward()
            optimizer.step()
            steps += 1
            if len(target):
                losses.append(float(loss.detach()))
    model.eval()
    epsilon = None
    if privacy is not None:
        privacy.ledger.record(engine.accountant.history)
        privacy.ledger.save()
        epsilon = privacy.ledger.epsilon(privacy.delta)
        train_model.remove_hooks()  # the plain model is used again (evaluation, export)
    return TrainResult(
        loss=float(np.mean(losses)) if losses else float("nan"),
        num_examples=n,
        steps=steps,
        seconds=time.perf_counter() - start,
        epsilon=epsilon,
        noise_multiplier=sigma,
    )


def _make_private(model, optimizer, loader, *, privacy: PrivacySettings, epochs: int):
    """Wrap with Opacus (Poisson sampling, RDP accountant); refuse if over budget."""
    from opacus import PrivacyEngine

    sample_rate = 1.0 / len(loader)
    steps_per_round = len(loader) * epochs
    sigma = choose_noise_multiplier(
        privacy.ledger,
        configured=privacy.noise_multiplier,
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        sample_rate=sample_rate,
        planned_steps=steps_per_round * privacy.planned_rounds,
    )
    projected = privacy.ledger.epsilon(privacy.delta, [(sigma, sample_rate, steps_per_round)])
    if projected > privacy.target_epsilon * (1 + 1e-6):
        spent = privacy.ledger.epsilon(privacy.delta)
        raise BudgetExceeded(
            f"privacy budget spent: epsilon {spent:.3f} so far, {projected:.3f} after this round "
            f"> target {privacy.target_epsilon} (record-level, delta={privacy.delta}, rdp, "
            "cumulative)"
        )
    with warnings.catch_warnings():
        # Opacus's default RNG is not cryptographically secure; fine for research runs.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        engine = PrivacyEngine(accountant="rdp")
        dp_model, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=True,
        )
    return dp_model, dp_optimizer, dp_loader, engine, sigma


@dataclass(frozen=True)
class EvalCase:
    """One user's held-out item with what the ranking sees and excludes."""

    history: np.ndarray  # chronological item ids before the target
    target: int
    exclude: np.ndarray  # items the user interacted with before the target


@torch.no_grad()
def item_vectors(model: Recommender, items: ItemStates) -> torch.Tensor:
    """One vector per catalog item: (N, D)."""
    model.eval()
    table = pooled_table(model, items)  # (N, H)
    ids = torch.arange(table.shape[0])
    return model.items.head(table[None], ids[None])[0]


@torch.no_grad()
def user_vectors(model: Recommender, vectors: torch.Tensor, histories: np.ndarray) -> torch.Tensor:
    """User vectors from left-padded histories (B, L) and item vectors (N, D): (B, D)."""
    model.eval()
    hist = torch.from_numpy(histories)
    valid = hist >= 0
    h = vectors[hist.clamp(min=0)] * valid.unsqueeze(-1)  # (B, L, D)
    return model.user(h, valid)


@torch.no_grad()
def evaluate(
    *,
    model: Recommender,
    cfg: Config,
    items: ItemStates,
    cases: list[EvalCase],
    k: int = 10,
    batch_size: int = 256,
) -> tuple[dict[str, float], np.ndarray]:
    """Full-ranking HR@k / NDCG@k / MRR@k over `cases`, and each case's 1-based rank."""
    if not cases:
        return ranking_metrics(np.zeros(0), k), np.zeros(0, dtype=np.int64)
    vectors = item_vectors(model, items)  # (N, D)
    ranks = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start : start + batch_size]
        histories = np.stack([left_pad(c.history, cfg.history_len) for c in chunk])
        scores = user_vectors(model, vectors, histories) @ vectors.T  # (B, N)
        targets = torch.tensor([c.target for c in chunk])
        target_scores = scores[torch.arange(len(chunk)), targets]  # (B,)
        for row, case in enumerate(chunk):
            if len(case.exclude):
                scores[row, torch.from_numpy(np.asarray(case.exclude, dtype=np.int64))] = -np.inf
            scores[row, case.target] = -np.inf
        # Ties count against the target (see common.metrics.rank_of_target).
        ranks.append((scores >= target_scores[:, None]).sum(1) + 1)
    ranks_np = torch.cat(ranks).numpy().astype(np.int64)
    return ranking_metrics(ranks_np, k), ranks_np
