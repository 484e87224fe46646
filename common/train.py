"""Local training and full-ranking evaluation as plain functions (no Flower).

A training step reads a batch of records (windows of users' sequences, common/records.py) and
predicts every position's next item in one pass of the causal user tower. The loss is the
softmax cross-entropy over the whole catalog (num-negatives = 0) or over a sampled set: the
batch's own items plus num-negatives uniform draws, with the sampling bias corrected.

Non-private training computes each distinct item's vector once per step (the shared path).
With adapted BERT blocks (adapter-k > 0) the pooled states of the items after those blocks
form a table that every step reads, for history and candidates alike; the steps add their
gradients with respect to that table, and every `adapter-refresh-steps` steps (and at the end)
the summed gradient is sent back through the blocks into the LoRA factors, the optimizer
steps them and the table is recomputed. LoRA changes only at a refresh, so the table is never
stale. DP-SGD (Opacus) uses the per-record path instead: every item vector is computed inside
its record, so a per-sample gradient is one record's.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.backbone import ItemStates
from common.config import Config
from common.metrics import ranking_metrics
from common.model import NEG_INF, Recommender
from common.privacy import (
    ACCOUNTANT,
    BudgetExceeded,
    PrivacyLedger,
    choose_noise_multiplier,
    secure_generator,
)
from common.records import PAD, Records, left_pad

BUCKET = 256  # items per length bucket when encoding the catalog through adapted blocks


# --- batches and candidates ----------------------------------------------------------------


def batches(
    num_windows: int, *, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[np.ndarray]:
    """`steps` batches of window indices: shuffled epochs, cycled as often as needed."""
    size = min(batch_size, num_windows)
    drawn = 0
    while drawn < steps:
        order = torch.randperm(num_windows, generator=generator).numpy()
        for start in range(0, num_windows, size):
            if drawn == steps:
                return
            yield order[start : start + size]
            drawn += 1


def steps_per_epoch(num_windows: int, batch_size: int) -> int:
    """Batches in one pass over the windows."""
    return math.ceil(num_windows / min(batch_size, max(num_windows, 1))) if num_windows else 0


def inclusion_probability(num_items: int, num_negatives: int) -> float:
    """Chance that an item is among `num_negatives` uniform draws (with replacement)."""
    return 1.0 - (1.0 - 1.0 / num_items) ** num_negatives


def sample_candidates(
    own: torch.Tensor, *, num_items: int, num_negatives: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate items (U,) sorted, and the log-probability (U,) that each is in the set.

    The batch's own items (inputs and targets) are always in; the rest come from uniform
    draws. Subtracting the log-probability from the logits makes the sampled softmax's
    normaliser an unbiased estimate of the full one (Horvitz-Thompson); with
    num_negatives = 0 the set is the whole catalog and nothing is subtracted.
    """
    if num_negatives == 0:
        return torch.arange(num_items), torch.zeros(num_items)
    own = torch.unique(own[own >= 0])
    drawn = torch.randint(0, num_items, (num_negatives,), generator=generator)
    candidates = torch.unique(torch.cat([own, drawn]))  # (U,) sorted
    log_q = torch.full(candidates.shape, math.log(inclusion_probability(num_items, num_negatives)))
    log_q[torch.isin(candidates, own)] = 0.0
    return candidates, log_q


def seen_before(input_col: torch.Tensor, target_col: torch.Tensor, width: int) -> torch.Tensor:
    """(B, L, C) True where column c holds an item the record's history had by position l.

    Evaluation ranks a user's next item among items not seen before, so training does the
    same: a position's softmax leaves out the items before it (its own target always stays).
    """
    b, length = input_col.shape
    hit = torch.zeros(b, length, width + 1, dtype=torch.uint8)  # column `width`: padding
    cols = torch.where(input_col >= 0, input_col, torch.full_like(input_col, width))
    hit.scatter_(2, cols[..., None], 1)
    seen = torch.cummax(hit, dim=1).values[..., :width].bool()  # (B, L, C)
    targets = torch.where(target_col >= 0, target_col, torch.full_like(target_col, width))
    own = torch.zeros(b, length, width + 1, dtype=torch.bool)
    own.scatter_(2, targets[..., None], True)
    return seen & ~own[..., :width]


def position_of(ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Column of each id among sorted candidates; PAD stays PAD: (...) -> (...)."""
    pos = torch.searchsorted(candidates, ids.clamp(min=0))
    return torch.where(ids >= 0, pos, torch.full_like(pos, PAD))


# --- the shared path -----------------------------------------------------------------------


def length_buckets(mask: torch.Tensor, size: int = BUCKET) -> list[tuple[torch.Tensor, int]]:
    """Rows grouped by token count (shortest first), each with its longest real length."""
    lengths = mask.sum(1)  # (M,)
    order = torch.argsort(lengths, stable=True)
    return [(chunk, max(int(lengths[chunk].max()), 1)) for chunk in order.split(size) if len(chunk)]


def encoded_items(model: Recommender, items: ItemStates, ids: torch.Tensor) -> torch.Tensor:
    """Pooled states of `ids` after the adapted blocks, length-bucketed, no gradient: (M, H)."""
    if not model.items.k:
        return items.states[ids]
    out = torch.empty(len(ids), items.states.shape[-1], device=items.states.device)
    mask = items.mask[ids]
    with torch.no_grad():
        for rows, t in length_buckets(mask):
            chosen = ids[rows]
            out[rows] = model.items.encode(items.states[chosen, :t], items.mask[chosen, :t])
    return out


def backward_through_blocks(
    model: Recommender, items: ItemStates, ids: torch.Tensor, grad: torch.Tensor
) -> None:
    """Accumulate the adapters' gradients given d(loss)/d(pooled state) of `ids`: (M, H)."""
    for rows, t in length_buckets(items.mask[ids]):
        chosen = ids[rows]
        pooled = model.items.encode(items.states[chosen, :t], items.mask[chosen, :t])
        pooled.backward(grad[rows])


def shared_loss(
    model: Recommender,
    inputs: torch.Tensor,  # (B, L) item ids, PAD-padded
    targets: torch.Tensor,  # (B, L) next item ids, PAD where none
    table: torch.Tensor,  # (N, H) pooled state of every catalog item
    candidates: torch.Tensor,  # (U,) sorted item ids the softmax runs over
    log_q: torch.Tensor,  # (U,) log-probability that each candidate is in the set
) -> torch.Tensor:
    """Mean cross-entropy of every position's next item; each distinct item encoded once."""
    vectors = model.items.head(table[candidates], candidates)  # (U, D)
    input_col, target_col = position_of(inputs, candidates), position_of(targets, candidates)
    history = vectors[input_col.clamp(min=0)]  # (B, L, D)
    states = model.user_states(history, inputs >= 0)  # (B, L, D)
    logits = (states @ vectors.T - log_q).masked_fill(
        seen_before(input_col, target_col, len(candidates)), NEG_INF
    )  # (B, L, U)
    has_target = targets >= 0
    return F.cross_entropy(logits[has_target], target_col[has_target])


def sequence_logits(model: Recommender, inputs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Logits (B, L, N) of every position against the whole catalog (shared path)."""
    ids = torch.arange(table.shape[0])
    vectors = model.items.head(table, ids)  # (N, D)
    states = model.user_states(vectors[inputs.clamp(min=0)], inputs >= 0)
    return states @ vectors.T


# --- the per-record path (DP-SGD) -----------------------------------------------------------


def record_candidates(
    inputs: torch.Tensor, targets: torch.Tensor, *, num_items: int, num_negatives: int, generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each record's own candidates: its targets, its inputs, then its own uniform draws.

    Returns candidates (B, C), the column of each input (B, L), the column of each target
    (B, L) and an additive logit correction (B, C): -log(inclusion probability) for drawn
    items, NEG_INF for padding and for repeats of an item already in an earlier column.
    """
    b, length = inputs.shape
    drawn = torch.randint(0, num_items, (b, num_negatives), generator=generator)
    candidates = torch.cat([targets, inputs, drawn], dim=1)  # (B, C)
    same = candidates[:, :, None] == candidates[:, None, :]  # (B, C, C)
    first = same.to(torch.int8).argmax(-1)  # (B, C) first column holding each item
    columns = torch.arange(candidates.shape[1])
    correction = torch.zeros(candidates.shape)
    if num_negatives:
        correction[:, 2 * length :] = -math.log(inclusion_probability(num_items, num_negatives))
    own = torch.zeros(candidates.shape, dtype=torch.bool)
    own[:, : 2 * length] = True
    # a drawn item that is also the record's own item is certain to be in: no correction
    own_first = torch.gather(own, 1, first)
    correction = torch.where(own_first, torch.zeros_like(correction), correction)
    dead = (first != columns[None]) | (candidates < 0)
    correction = correction.masked_fill(dead, NEG_INF)
    target_col = torch.where(targets >= 0, first[:, :length], torch.full_like(targets, PAD))
    input_col = torch.where(
        inputs >= 0, first[:, length : 2 * length], torch.full_like(inputs, PAD)
    )
    return candidates.clamp(min=0), input_col, target_col, correction


def record_loss(
    module: torch.nn.Module,
    inputs: torch.Tensor,  # (B, L)
    drawn: tuple[torch.Tensor, ...],  # record_candidates(...) of these records
    *,
    items: ItemStates,
    k: int,
) -> torch.Tensor:
    """Summed cross-entropy of every position, item vectors computed inside each record."""
    candidates, input_col, target_col, correction = drawn
    states = items.states[candidates]  # (B, C, T, H) | (B, C, H)
    mask = items.mask[candidates] if k else None
    logits = module(inputs, input_col, candidates, states, mask) + correction[:, None]  # (B,L,C)
    logits = logits.masked_fill(seen_before(input_col, target_col, candidates.shape[1]), NEG_INF)
    has_target = target_col >= 0
    return F.cross_entropy(logits[has_target], target_col[has_target], reduction="sum")


# --- training --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrivacySettings:
    """Client-side DP-SGD for one round (one record = one user: common/task.py)."""

    ledger: PrivacyLedger
    noise_multiplier: float  # 0 = calibrate to the budget over `planned_rounds`
    max_grad_norm: float
    delta: float
    target_epsilon: float
    planned_rounds: int


@dataclass(frozen=True)
class TrainResult:
    """What a local training run produced."""

    loss: float  # mean training loss per predicted interaction over the run's steps
    num_targets: int  # interactions predicted (each once per pass)
    num_windows: int
    steps: int
    seconds: float
    epsilon: float | None  # DP-SGD: cumulative, user-level, at the ledger's delta
    noise_multiplier: float | None


def make_optimizer(params: list[torch.nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    """The local optimizer named by `local-optimizer`."""
    if cfg.local_optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, foreach=True)
    return torch.optim.Adam(params, lr=cfg.learning_rate, foreach=True)


def train(
    *,
    model: Recommender,
    cfg: Config,
    records: Records,
    items: ItemStates,
    seed: int,
    steps: int | None = None,
    epochs: int | None = None,
    privacy: PrivacySettings | None = None,
    max_seconds: float | None = None,
) -> TrainResult:
    """Train the model's trainable tensors in place for `steps` batches (or `epochs` passes);
    privately when `privacy` is given. `max_seconds` stops early (a benchmark's wall-clock
    budget); the ledger still records exactly the steps taken."""
    start = time.perf_counter()
    if (steps is None) == (epochs is None):
        raise ValueError("train() needs exactly one of steps and epochs.")
    if not len(records):
        return TrainResult(float("nan"), 0, 0, 0, 0.0, None, None)
    if steps is None:
        steps = epochs * steps_per_epoch(len(records), cfg.batch_size)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    model.train()
    if privacy is not None:
        losses, taken, epsilon, sigma = _train_private(
            model, optimizer, cfg, records, items, steps, generator, privacy, start, max_seconds
        )
    else:
        losses, taken = _train_shared(
            model, optimizer, cfg, records, items, steps, generator, start, max_seconds
        )
        epsilon = sigma = None
    model.eval()
    return TrainResult(
        loss=float(np.mean(losses)) if losses else float("nan"),
        num_targets=records.num_targets,
        num_windows=len(records),
        steps=taken,
        seconds=time.perf_counter() - start,
        epsilon=epsilon,
        noise_multiplier=sigma,
    )


def _out_of_time(start: float, max_seconds: float | None) -> bool:
    return max_seconds is not None and time.perf_counter() - start > max_seconds


# The adapted table of the newest global LoRA, per process: every client of a round starts
# from the same global model, so in simulation (Ray reuses its worker processes) the catalog
# goes through the adapted blocks once per worker per round, not once per client. Keyed by the
# item states' identity and a digest of the adapted blocks' trainable tensors; a documented
# cache like the backbone's (common/backbone.py), holding at most two tables.
_TABLES: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()


def adapted_table(model: Recommender, items: ItemStates) -> torch.Tensor:
    """Pooled states of every catalog item after the model's adapted blocks: (N, H)."""
    digest = hashlib.sha256()
    for name, p in model.items.blocks.named_parameters():
        if p.requires_grad:
            digest.update(name.encode() + p.detach().numpy().tobytes())
    key = (id(items.states), digest.hexdigest())
    if key not in _TABLES:
        _TABLES[key] = encoded_items(model, items, torch.arange(items.states.shape[0]))
        while len(_TABLES) > 2:
            _TABLES.popitem(last=False)
    return _TABLES[key]


class AdaptedTable:
    """Pooled states of catalog items after the adapted blocks, each row computed on first
    use; the steps' gradients with respect to it add up in `values.grad` until `flush`."""

    def __init__(self, model: Recommender, items: ItemStates, *, whole: bool = False):
        self.model, self.items = model, items
        num_items = items.states.shape[0]
        if whole:  # every row at once, from the per-process cache
            self.values = adapted_table(model, items).clone()
            self.ready = torch.ones(num_items, dtype=torch.bool)
        else:
            self.values = torch.zeros(num_items, items.states.shape[-1])  # (N, H)
            self.ready = torch.zeros(num_items, dtype=torch.bool)
        self.values.requires_grad_(True)
        self.own = torch.zeros(num_items, dtype=torch.bool)  # items of the batches themselves

    def covering(self, ids: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
        """The table, with at least the rows of `ids` computed; `own`: the batch's items."""
        missing = ids[~self.ready[ids]]
        if len(missing):
            with torch.no_grad():
                self.values[missing] = encoded_items(self.model, self.items, missing)
            self.ready[missing] = True
        if own is not None:
            self.own[own[own >= 0]] = True
        return self.values

    def flush(self, *, max_rows: int = 0, generator: torch.Generator | None = None) -> None:
        """Send the gathered gradient through the blocks (into LoRA); forget every row, as the
        optimizer is about to change the blocks.

        With `max_rows`, at most that many rows go back through the blocks: the batches' own
        items (up to half the rows) and uniformly drawn other rows, each stratum's gradient
        scaled by its size over its draws, so the LoRA gradient stays unbiased.
        """
        grad = self.values.grad
        if grad is not None:
            touched = torch.nonzero(grad.abs().sum(1) > 0)[:, 0]
            rows, scale = touched, torch.ones(len(touched))
            if max_rows and len(touched) > max_rows:
                mine, others = touched[self.own[touched]], touched[~self.own[touched]]
                n_mine = min(len(mine), max(max_rows // 2, max_rows - len(others)))
                picked, weights = [], []
                for stratum, n in ((mine, n_mine), (others, max_rows - n_mine)):
                    if n and len(stratum):
                        draw = torch.randperm(len(stratum), generator=generator)[:n]
                        picked.append(stratum[draw])
                        weights.append(torch.full((n,), len(stratum) / n))
                rows, scale = torch.cat(picked), torch.cat(weights)
            backward_through_blocks(self.model, self.items, rows, grad[rows] * scale[:, None])
            self.values.grad = None
        self.ready[:] = False
        self.own[:] = False


def _train_shared(model, optimizer, cfg, records, items, steps, generator, start, max_seconds):
    num_items = items.states.shape[0]
    adapted = None
    if model.items.k:  # a full softmax needs every row: take them from the per-process cache
        adapted = AdaptedTable(model, items, whole=cfg.num_negatives == 0)
    losses = []
    for rows in batches(len(records), batch_size=cfg.batch_size, steps=steps, generator=generator):
        if _out_of_time(start, max_seconds):
            break
        inputs = torch.from_numpy(records.inputs[rows])
        targets = torch.from_numpy(records.targets[rows])
        own = torch.cat([inputs.flatten(), targets.flatten()])
        candidates, log_q = sample_candidates(
            own, num_items=num_items, num_negatives=cfg.num_negatives, generator=generator
        )
        table = items.states if adapted is None else adapted.covering(candidates, own)
        optimizer.zero_grad(set_to_none=True)
        loss = shared_loss(model, inputs, targets, table, candidates, log_q)
        loss.backward()
        losses.append(float(loss.detach()))
        last = len(losses) == steps
        if adapted is not None and (len(losses) % cfg.adapter_refresh_steps == 0 or last):
            # LoRA gets the summed gradient of the steps since the last flush
            adapted.flush(max_rows=cfg.adapter_rows, generator=generator)
        optimizer.step()  # parameters without a gradient (LoRA between flushes) stay put
    if adapted is not None and adapted.values.grad is not None:  # stopped early
        optimizer.zero_grad(set_to_none=True)
        adapted.flush(max_rows=cfg.adapter_rows, generator=generator)
        optimizer.step()
    return losses, len(losses)


def _train_private(
    model, optimizer, cfg, records, items, steps, generator, privacy, start, max_seconds
):
    from torch.utils.data import DataLoader, TensorDataset

    if cfg.num_negatives == 0:
        raise ValueError(
            "DP-SGD computes item vectors inside each record: set num-negatives >= 1 "
            "(the whole catalog per record would be too costly)."
        )
    windows = torch.arange(len(records))
    loader = DataLoader(
        TensorDataset(windows), batch_size=min(cfg.batch_size, len(records)), generator=generator
    )
    dp_model, optimizer, loader, engine, sigma = _make_private(
        model, optimizer, loader, privacy=privacy, steps=steps
    )
    losses, taken = [], 0
    while taken < steps and not _out_of_time(start, max_seconds):
        for (rows,) in loader:
            if taken == steps or _out_of_time(start, max_seconds):
                break
            inputs = torch.from_numpy(records.inputs[rows.numpy()])
            targets = torch.from_numpy(records.targets[rows.numpy()])
            optimizer.zero_grad(set_to_none=True)
            if len(rows):
                drawn = record_candidates(
                    inputs,
                    targets,
                    num_items=items.states.shape[0],
                    num_negatives=cfg.num_negatives,
                    generator=generator,
                )
                loss = record_loss(dp_model, inputs, drawn, items=items, k=model.items.k)
                count = int((targets >= 0).sum())
            else:  # an empty Poisson batch still takes a (pure-noise) step
                loss, count = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0, 0
            with warnings.catch_warnings():
                # Opacus hooks fire on module outputs: the frozen inputs need no gradient.
                warnings.filterwarnings("ignore", message="Full backward hook")
                loss.backward()
            optimizer.step()
            taken += 1
            if count:
                losses.append(float(loss.detach()) / count)
    privacy.ledger.record(engine.accountant.history)
    privacy.ledger.save()
    dp_model.remove_hooks()  # the plain model is used again (evaluation, export)
    return losses, taken, privacy.ledger.epsilon(privacy.delta), sigma


def _make_private(model, optimizer, loader, *, privacy: PrivacySettings, steps: int):
    """Wrap with Opacus (Poisson sampling, RDP accountant); refuse if over budget."""
    from opacus import PrivacyEngine

    sample_rate = 1.0 / len(loader)
    sigma = choose_noise_multiplier(
        privacy.ledger,
        configured=privacy.noise_multiplier,
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        sample_rate=sample_rate,
        planned_steps=steps * privacy.planned_rounds,
    )
    projected = privacy.ledger.epsilon(privacy.delta, [(sigma, sample_rate, steps)])
    if projected > privacy.target_epsilon * (1 + 1e-6):
        spent = privacy.ledger.epsilon(privacy.delta)
        raise BudgetExceeded(
            f"privacy budget spent: epsilon {spent:.3f} so far, {projected:.3f} after this round "
            f"> target {privacy.target_epsilon} (user-level, delta={privacy.delta}, rdp, "
            "cumulative)"
        )
    # Opacus warns that its secure_mode (torchcsprng) is off; the noise still comes from a
    # generator seeded from the OS's entropy, not from the run seed (docs/privacy.md).
    engine = PrivacyEngine(accountant=ACCOUNTANT)
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=privacy.max_grad_norm,
        poisson_sampling=True,
        noise_generator=secure_generator(),
    )
    return dp_model, dp_optimizer, dp_loader, engine, sigma


# --- evaluation -------------------------------------------------------------------------------


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
    ids = torch.arange(items.states.shape[0])
    return model.items.head(encoded_items(model, items, ids), ids)


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
