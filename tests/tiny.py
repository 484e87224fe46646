"""A tiny recommender over a tiny random BERT, for fast model and privacy tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import BertConfig, BertModel

from common.backbone import ItemStates
from common.config import Config, key_of
from common.model import Recommender
from common.records import Records, build_records

NUM_ITEMS = 24
TOKENS = 5
HIDDEN = 32


# A tiny model: Config fields for tests that build one
TINY_CONFIG = dict(
    model_dim=16,
    bottleneck_dim=8,
    history_len=6,
    num_negatives=0,
    batch_size=8,
    user_layers=1,
    user_heads=2,
    max_tokens=TOKENS,
    lora_r=4,
    dropout=0.0,
)


def tiny_config(**changes) -> Config:
    return Config(**{**TINY_CONFIG, **changes})


def world_config(tmp_path, backbone, data, **changes) -> Config:
    """The tiny model over a tiny backbone and a synthetic data set on disk (tests/conftest.py
    `tiny_world`), with the test's own cache and output directories."""
    return tiny_config(
        backbone=str(backbone),
        dataset="path",
        data_path=str(data),
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
        **changes,
    )


NUM_CLIENTS = 4  # tiny_cfg's federation


def tiny_cfg(tmp_path, backbone, data, **changes) -> Config:
    """The tiny model federated over NUM_CLIENTS clients of a synthetic set."""
    run = dict(
        partition="iid",
        num_partitions=NUM_CLIENTS,
        num_server_rounds=2,
        local_steps=3,
        learning_rate=0.01,
        history_len=8,
        num_negatives=8,
        max_tokens=8,
        batch_size=16,
    )
    return world_config(tmp_path, backbone, data, **{**run, **changes})


def tiny_run(**changes) -> dict[str, Any]:
    """The tiny model as run-config keys (`model-dim` ...), for scenarios and deployments."""
    return {key_of(name): value for name, value in {**TINY_CONFIG, **changes}.items()}


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return BertModel(cfg, add_pooling_layer=False).eval().requires_grad_(False)


def tiny_setup(
    k: int, seed: int = 0, **changes
) -> tuple[Config, Recommender, ItemStates, BertModel]:
    """Config, model, random item states (with one padded token per item) and the BERT."""
    cfg = tiny_config(adapter_k=k, **changes)
    bert = tiny_bert(seed)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(NUM_ITEMS, TOKENS, dtype=torch.bool)
    mask[:, -1] = False
    if k:
        states = torch.randn(NUM_ITEMS, TOKENS, HIDDEN, generator=gen)
        blocks = list(bert.encoder.layer[-k:])
    else:
        states, blocks = torch.randn(NUM_ITEMS, HIDDEN, generator=gen), None
    torch.manual_seed(seed)
    model = Recommender(cfg, hidden_size=HIDDEN, num_items=NUM_ITEMS, blocks=blocks)
    return cfg, model, ItemStates(states, mask), bert


def tiny_sequences(num_users: int = 4, length: int = 12, seed: int = 0) -> list[np.ndarray]:
    """Users' item sequences without repeats."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(NUM_ITEMS)[:length] for _ in range(num_users)]


def tiny_records(num_users: int = 4, length: int = 12, seed: int = 0) -> Records:
    """Windows (history length 6) of random sequences."""
    return build_records(tiny_sequences(num_users, length, seed), history_len=6)
