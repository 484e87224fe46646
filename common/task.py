"""Assemble a run's pieces from its Config: data, frozen item states, model, users' cases.

Shared by the ClientApp, the ServerApp and the benchmarks; nothing here imports Flower.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from common.backbone import ItemStates, cached_item_states, load_backbone, resolve_backbone
from common.config import Config
from common.data import Catalog, Dataset, UserSplit, partition_users, split_by_user
from common.metrics import rank_of_target, ranking_metrics
from common.model import Recommender
from common.readers import load_catalog, load_dataset, load_interactions
from common.records import Records, build_records
from common.train import EvalCase


# Per-process cache of the public, read-only inputs (catalog and, in simulation, the
# dataset): Ray reuses a worker for many virtual clients, which then parse the files once.
@functools.lru_cache(maxsize=2)
def _load(
    dataset: str, data_path: str, data_format: str, cache_dir: str
) -> tuple[Dataset, tuple[UserSplit, ...]]:
    data = load_dataset(
        dataset=dataset, data_path=data_path, data_format=data_format, cache_dir=Path(cache_dir)
    )
    return data, tuple(split_by_user(data.interactions))


def load_data(cfg: Config) -> tuple[Dataset, tuple[UserSplit, ...]]:
    """The run's dataset and every user's chronological split (cached per process)."""
    return _load(cfg.dataset, cfg.data_path, cfg.data_format, str(cfg.cache_path))


@functools.lru_cache(maxsize=2)
def _load_device(
    data_path: str, catalog_path: str, data_format: str
) -> tuple[Catalog, tuple[UserSplit, ...]]:
    catalog = load_catalog(catalog_path, data_format=data_format)
    interactions = load_interactions(data_path, catalog=catalog, data_format=data_format)
    return catalog, tuple(split_by_user(interactions))


def load_device_data(
    *, data_path: str | Path, catalog_path: str | Path, data_format: str = "auto"
) -> tuple[Catalog, tuple[UserSplit, ...]]:
    """A device's catalog and its own users' splits, from its own files (cached per process)."""
    return _load_device(str(data_path), str(catalog_path), data_format)


def load_run_catalog(cfg: Config) -> Catalog:
    """The run's catalog alone (a deployed server need not hold any user's interactions)."""
    if cfg.dataset == "path":
        return load_catalog(cfg.data_path, data_format=cfg.data_format)
    return load_data(cfg)[0].catalog


def partition_of(cfg: Config, splits: tuple[UserSplit, ...], partition_id: int) -> list[UserSplit]:
    """The users that simulated client `partition_id` holds."""
    parts = partition_users(
        len(splits), scheme=cfg.partition, num_partitions=cfg.num_partitions, seed=cfg.seed
    )
    if not 0 <= partition_id < len(parts):
        raise ValueError(
            f"partition-id {partition_id} is out of range: the run has {len(parts)} partitions "
            "(set num-supernodes to match)."
        )
    return [splits[u] for u in parts[partition_id]]


def num_partitions(cfg: Config, splits: tuple[UserSplit, ...]) -> int:
    """How many clients the data is split into."""
    return len(splits) if cfg.partition == "user" else cfg.num_partitions


def item_states(cfg: Config, catalog: Catalog) -> ItemStates:
    """Frozen backbone states of the catalog, from the disk cache."""
    return cached_item_states(
        cfg.backbone,
        list(catalog.texts),
        catalog.fingerprint(),
        k=cfg.adapter_k,
        max_tokens=cfg.max_tokens,
        cache_dir=cfg.cache_path,
    )


def build_model(cfg: Config, *, num_items: int) -> Recommender:
    """A freshly initialised recommender for this config (seeded, so every builder agrees)."""
    torch.manual_seed(cfg.seed)
    if cfg.adapter_k:
        backbone = load_backbone(cfg.backbone)
        blocks = list(backbone.model.encoder.layer[backbone.num_layers - cfg.adapter_k :])
        hidden = backbone.hidden_size
    else:  # no blocks needed: the config alone gives the width
        blocks = None
        hidden = _hidden_size(cfg.backbone)
    return Recommender(cfg, hidden_size=hidden, num_items=num_items, blocks=blocks)


# Per-process cache of one built model per config: building one costs a deep copy of the
# adapted blocks and a random initialisation that loading the global tensors then overwrites,
# and a simulation worker answers many clients. Documented like the backbone cache.
@functools.lru_cache(maxsize=2)
def _cached_model(cfg: Config, num_items: int) -> Recommender:
    return build_model(cfg, num_items=num_items)


def reusable_model(cfg: Config, *, num_items: int) -> Recommender:
    """The process's model for this config: the caller must load every trainable tensor
    (common.weights.load_trainable_state) before use; frozen tensors are never written."""
    model = _cached_model(cfg, num_items)
    model.zero_grad(set_to_none=True)
    return model


@functools.lru_cache(maxsize=4)
def _hidden_size(backbone: str) -> int:
    name = resolve_backbone(backbone)
    config = Path(name) / "config.json"
    if config.is_file():  # a local backbone: its config file, without importing transformers
        return int(json.loads(config.read_text(encoding="utf-8"))["hidden_size"])
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name).hidden_size


def train_records(cfg: Config, users: list[UserSplit]) -> Records:
    """Training records of these users: windows of their train interactions only.

    Under dp-mode = "sgd" a record must be a whole user (DP-SGD clips per record): each user
    gives one window, the most recent history-len + 1 interactions, every position a target.
    """
    seqs = [u.train for u in users]
    if cfg.dp_mode == "sgd":
        records = build_records(seqs, history_len=cfg.history_len, stride=cfg.history_len)
        if not len(records):
            return records
        newest = np.flatnonzero(np.r_[records.user[1:] != records.user[:-1], True])
        return records.select(newest)  # windows are oldest first within a user
    return build_records(seqs, history_len=cfg.history_len, stride=cfg.window_stride)


def eval_cases(users: list[UserSplit], split: str) -> list[EvalCase]:
    """Held-out cases: 'valid' ranks the valid item after train; 'test' after train + valid."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}.")
    cases = []
    for u in users:
        if split == "valid" and u.valid >= 0:
            cases.append(EvalCase(u.train, u.valid, u.train))
        elif split == "test" and u.test >= 0:
            seen = np.append(u.train, u.valid) if u.valid >= 0 else u.train
            cases.append(EvalCase(seen, u.test, seen))
    return cases


def popularity_ranks(users: list[UserSplit], num_items: int, split: str) -> np.ndarray:
    """The popularity baseline's rank of each `split` case (eval_cases' order): items ranked
    by how often they occur before that split's targets (train interactions, plus the
    validation item for the test split)."""
    counts = np.zeros(num_items)
    for u in users:
        np.add.at(counts, u.train, 1.0)
        if split == "test" and u.valid >= 0:
            counts[u.valid] += 1.0
    # a tiny id-based jitter breaks count ties deterministically (ties would count against)
    scores = counts + np.linspace(0, 1e-3, num_items)
    return np.array([rank_of_target(scores, c.target, c.exclude) for c in eval_cases(users, split)])


def popularity_metrics(users: list[UserSplit], num_items: int, split: str) -> dict[str, float]:
    """The popularity baseline's HR@10 / NDCG@10 / MRR@10 on `split` (popularity_ranks)."""
    return ranking_metrics(popularity_ranks(users, num_items, split))
