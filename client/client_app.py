"""The Flower ClientApp: local (private) adapter training, evaluation and model installs.

A node is either a simulated client, which takes its users from the shared dataset by
`partition-id`, or a device (fedrec-client join), which reads its own files:

    --node-config "data-path='/data/me.csv' catalog-path='/data/items.csv' state-dir='/var/fedrec'"

A device's state directory holds its privacy ledger, the frozen-backbone cache of the catalog
(`cache/`) and the installed global model (`models/`). In deployment every message starts a
fresh ClientApp process, so everything expensive comes from there, not from memory.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import compute_clip_model_update

from client.faults import make_fault_mod
from client.installed import install
from client.node_config import (
    BACKBONE,
    CACHE_DIR,
    CATALOG_PATH,
    DATA_FORMAT,
    DATA_PATH,
    LEDGER_FILE,
    STATE_DIR,
)
from common.config import Config
from common.data import Catalog, UserSplit
from common.metrics import peak_rss_mb
from common.privacy import BudgetExceeded, PrivacyLedger
from common.task import (
    build_model,
    eval_cases,
    item_states,
    load_data,
    load_device_data,
    partition_of,
    reusable_model,
    train_records,
)
from common.train import PrivacySettings, evaluate, train
from common.weights import load_trainable_state, trainable_state
from common.wire import decode_weights, encode_update

log = logging.getLogger(__name__)

PRIVATE_WEIGHT = 1  # under DP every client weighs the same; no example count is released
# what the server sends along
CATALOG_SHA256 = "catalog-sha256"


def create_app(base: Config | None = None) -> ClientApp:
    """A ClientApp whose config is `base` (default: Config()) overridden by the run config."""
    base = base or Config()
    app = ClientApp(mods=[make_fault_mod(base)])  # a no-op unless a simulation asks for faults

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train_handler(msg, context, base)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate_handler(msg, context, base)

    @app.query("install")
    def _install(msg: Message, context: Context) -> Message:
        return install_handler(msg, context, base)

    @app.query("census")
    def _census(msg: Message, context: Context) -> Message:
        return census_handler(msg, context)

    return app


@dataclass(frozen=True)
class Node:
    """What this node trains on and where it keeps its state."""

    cfg: Config  # the run config, with this device's cache and backbone paths
    catalog: Catalog
    users: list[UserSplit]
    state_dir: Path
    name: str  # for logs: "partition 3" or "node 8301..."
    seed: int  # distinct per node
    device: bool  # a real device (a fresh process per message), not a simulated client


def node_of(context: Context, base: Config, msg: Message | None = None) -> Node:
    """This node's config, catalog, users and state directory (see the module docstring)."""
    cfg = base.merged(context.run_config)
    node_config = context.node_config
    if DATA_PATH not in node_config:  # a simulated client: a partition of the shared data
        partition_id = int(node_config.get("partition-id", 0))
        dataset, splits = load_data(cfg)
        state_dir = node_config.get(STATE_DIR)
        default = cfg.output_path / "clients" / f"{partition_id:05d}"
        state = Path(str(state_dir)) if state_dir else default
        users = partition_of(cfg, splits, partition_id)
        name = f"partition {partition_id}"
        return Node(cfg, dataset.catalog, users, state, name, partition_id, device=False)

    if STATE_DIR not in node_config:
        raise ValueError(f"A device needs '{STATE_DIR}' in its node config (fedrec-client join).")
    state = Path(str(node_config[STATE_DIR]))
    cfg = cfg.replace(
        cache_dir=str(state / CACHE_DIR),
        backbone=str(node_config.get(BACKBONE, cfg.backbone)),
    )
    data_path = str(node_config[DATA_PATH])
    catalog, splits = load_device_data(
        data_path=data_path,
        catalog_path=str(node_config.get(CATALOG_PATH, data_path)),
        data_format=str(node_config.get(DATA_FORMAT, "auto")),
    )
    if msg is not None:
        expected = msg.content["config"].get(CATALOG_SHA256) if "config" in msg.content else None
        if expected and expected != catalog.fingerprint():
            raise ValueError(
                f"This device's catalog ({node_config.get(CATALOG_PATH, data_path)}, "
                f"{len(catalog)} items) differs from the server's: install the catalog file "
                "the server uses, so that item ids mean the same on both sides."
            )
    name = f"node {context.node_id}"
    return Node(cfg, catalog, list(splits), state, name, context.node_id, device=True)


def _global_model(node: Node, msg: Message):
    """The model with the global trainable tensors applied, and those tensors (float32).

    Clients reuse their process's model (every trainable tensor is loaded below); DP-SGD gets
    a fresh one, as Opacus leaves its own attributes on the parameters.
    """
    build = build_model if node.cfg.dp_mode == "sgd" else reusable_model
    model = build(node.cfg, num_items=len(node.catalog))
    received = decode_weights(msg.content["arrays"])
    load_trainable_state(model, received)
    return model, received


def clip_update(
    state: dict[str, np.ndarray], received: dict[str, np.ndarray], clip_norm: float
) -> None:
    """Clip the update state - received to L2 norm `clip_norm` over all tensors, in place
    (Flower's `compute_clip_model_update`, the clipping of its `fixedclipping_mod`)."""
    keys = list(received)
    trained = [np.asarray(state[k], dtype=np.float32) for k in keys]
    compute_clip_model_update(trained, [received[k] for k in keys], clip_norm)
    state.update(zip(keys, trained, strict=True))


def train_handler(msg: Message, context: Context, base: Config) -> Message:
    """Train the adapters on this node's interactions and reply with them."""
    start = time.perf_counter()
    process_age_s = time.time() - psutil.Process().create_time()
    # 1. Config, this node's data and its frozen item states (from the disk cache)
    node = node_of(context, base, msg)
    cfg = node.cfg
    server_round = int(msg.content["config"].get("server-round", 1))
    # Batches, negatives and rounding are reproducible; DP noise is not (common/privacy.py).
    seed = cfg.seed + 100_003 * server_round + node.seed
    records = train_records(cfg, node.users)
    items = item_states(cfg, node.catalog)
    loaded = time.perf_counter()
    # 2. Model with the global tensors
    model, received = _global_model(node, msg)
    built = time.perf_counter()
    # 3. Train, privately when enabled
    privacy = None
    if cfg.dp_mode == "sgd":
        privacy = PrivacySettings(
            ledger=PrivacyLedger.load(node.state_dir / LEDGER_FILE),
            noise_multiplier=cfg.dp_noise_multiplier,
            max_grad_norm=cfg.dp_clip_norm,
            delta=cfg.dp_delta,
            target_epsilon=cfg.dp_target_epsilon,
            planned_rounds=math.ceil(cfg.num_server_rounds * cfg.fraction_train),
        )
    try:
        result = train(
            model=model,
            cfg=cfg,
            records=records,
            items=items,
            steps=cfg.local_steps,
            seed=seed,
            privacy=privacy,
        )
    except BudgetExceeded as err:
        log.warning("%s declines round %d: %s", node.name, server_round, err)
        return _declined(msg)
    # 4. Reply: the update of the trainable tensors, in the wire dtype
    trained = time.perf_counter()
    state = trainable_state(model)
    if cfg.dp_mode == "fedavg":  # DP-FedAvg: the whole update leaves the device clipped
        clip_update(state, received, cfg.dp_clip_norm)
    rounding = torch.Generator().manual_seed(seed)  # int8 updates: stochastic rounding
    arrays = encode_update(state, received, cfg.wire_dtype, generator=rounding)
    if cfg.dp_enabled:  # only what is noised or public leaves a private client
        metrics = {"num-examples": PRIVATE_WEIGHT, "declined": 0}
    else:
        metrics = {
            "num-examples": result.num_targets,
            "declined": 0,
            "train-loss": result.loss if math.isfinite(result.loss) else 0.0,
            "steps": result.steps,
            "cache-load-s": loaded - start,
            "model-load-s": built - loaded,
            "train-s": trained - built,
            "reply-s": time.perf_counter() - trained,
            "update-s": time.perf_counter() - start,
            "peak-rss-mb": peak_rss_mb(),
        }
        if node.device:  # a fresh process per message: its start-up (imports) is per round too
            metrics["startup-s"] = process_age_s
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


def evaluate_handler(msg: Message, context: Context, base: Config) -> Message:
    """Rank the whole catalog for this node's held-out items (seen items excluded).

    A private client declines: un-noised metrics of its private data would leave the device.
    """
    node = node_of(context, base, msg)
    if node.cfg.dp_enabled:
        log.info("%s declines to evaluate: differential privacy is on", node.name)
        return _declined(msg)
    model, _ = _global_model(node, msg)
    split = str(msg.content["config"].get("split", "valid"))
    cases = eval_cases(node.users, split)
    items = item_states(node.cfg, node.catalog)
    metrics, _ = evaluate(model=model, cfg=node.cfg, items=items, cases=cases)
    reply = {"num-examples": len(cases), **{k: float(v) for k, v in metrics.items()}}
    return Message(RecordDict({"metrics": MetricRecord(reply)}), reply_to=msg)


def _declined(msg: Message) -> Message:
    """The reply of a node that does not do what `msg` asks (budget spent, or private)."""
    return Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 0, "declined": 1})}), reply_to=msg
    )


def census_handler(msg: Message, context: Context) -> Message:
    """A simulated node's partition id, by which the server orders the nodes it draws cohorts
    from (server/sampling.py); a device has none and declines."""
    if "partition-id" not in context.node_config:
        return _declined(msg)
    partition = int(context.node_config["partition-id"])
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition})}), reply_to=msg)


def install_handler(msg: Message, context: Context, base: Config) -> Message:
    """Install the pushed global model in this node's state directory (atomically)."""
    node = node_of(context, base, msg)
    config = msg.content["config"]
    metadata = json.loads(str(config["metadata"]))
    model, _ = _global_model(node, msg)  # checks every tensor's name and shape
    path = install(node.state_dir, state=trainable_state(model), cfg=node.cfg, metadata=metadata)
    log.info("%s installed model %s in %s", node.name, metadata.get("version"), path)
    reply = ConfigRecord({"version": str(metadata.get("version")), "path": str(path)})
    return Message(
        RecordDict({"config": reply, "metrics": MetricRecord({"installed": 1})}), reply_to=msg
    )


app = create_app()
