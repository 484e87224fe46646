"""The Flower ClientApp: local (private) adapter training and full-ranking evaluation."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.config import Config
from common.data import UserSplit
from common.metrics import peak_rss_mb
from common.privacy import BudgetExceeded, PrivacyLedger
from common.task import (
    build_model,
    eval_cases,
    item_states,
    load_data,
    partition_of,
    train_examples,
)
from common.train import PrivacySettings, evaluate, train
from common.weights import from_arrays, load_trainable_state, to_arrays, trainable_state

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"


def create_app(base: Config | None = None) -> ClientApp:
    """A ClientApp whose config is `base` (default: Config()) overridden by the run config."""
    app = ClientApp()
    base = base or Config()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train_handler(msg, context, base)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate_handler(msg, context, base)

    return app


def _node(context: Context, base: Config) -> tuple[Config, list[UserSplit], Path, int]:
    """Config, this node's users, its state directory and its partition id."""
    cfg = base.merged(context.run_config)
    partition_id = int(context.node_config.get("partition-id", 0))
    _, splits = load_data(cfg)
    users = partition_of(cfg, splits, partition_id)
    state_dir = context.node_config.get("state-dir")
    state = Path(state_dir) if state_dir else cfg.output_path / "clients" / f"{partition_id:05d}"
    return cfg, users, state, partition_id


def _model(cfg: Config, msg: Message):
    """The model with the global trainable tensors applied, and the catalog's item states."""
    dataset, _ = load_data(cfg)
    model = build_model(cfg, num_items=len(dataset.catalog))
    load_trainable_state(model, from_arrays(msg.content["arrays"]))
    return model, item_states(cfg, dataset)


def train_handler(msg: Message, context: Context, base: Config) -> Message:
    """Train the adapters on this node's interactions and reply with them."""
    start = time.perf_counter()
    # 1. Config, this node's users and state directory
    cfg, users, state_dir, partition_id = _node(context, base)
    server_round = int(msg.content["config"].get("server-round", 1))
    # 2. Model with the global tensors
    model, items = _model(cfg, msg)
    # 3. Data: this node's training examples
    examples = train_examples(cfg, users)
    # 4. Train, privately when enabled
    privacy = None
    if cfg.dp_enabled:
        privacy = PrivacySettings(
            ledger=PrivacyLedger.load(state_dir / LEDGER_FILE),
            noise_multiplier=cfg.dp_noise_multiplier,
            max_grad_norm=cfg.dp_max_grad_norm,
            delta=cfg.dp_delta,
            target_epsilon=cfg.dp_target_epsilon,
            planned_rounds=math.ceil(cfg.num_server_rounds * cfg.fraction_train),
        )
    try:
        result = train(
            model=model,
            cfg=cfg,
            examples=examples,
            items=items,
            epochs=cfg.local_epochs,
            seed=cfg.seed + 100_003 * server_round + partition_id,
            privacy=privacy,
        )
    except BudgetExceeded as err:
        log.warning("Partition %d declines round %d: %s", partition_id, server_round, err)
        metrics = {"num-examples": 0, "declined": 1}
        if privacy is not None:
            metrics["epsilon"] = privacy.ledger.epsilon(cfg.dp_delta)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    # 5. Reply: only the trainable tensors travel
    metrics = {
        "num-examples": result.num_examples,
        "declined": 0,
        "train-loss": result.loss if math.isfinite(result.loss) else 0.0,
        "steps": result.steps,
        "train-s": result.seconds,
        "update-s": time.perf_counter() - start,
        "peak-rss-mb": peak_rss_mb(),
    }
    if result.epsilon is not None:
        metrics["epsilon"] = result.epsilon
    content = RecordDict(
        {"arrays": to_arrays(trainable_state(model)), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


def evaluate_handler(msg: Message, context: Context, base: Config) -> Message:
    """Rank the whole catalog for this node's held-out items (seen items excluded)."""
    cfg, users, _, _ = _node(context, base)
    model, items = _model(cfg, msg)
    split = str(msg.content["config"].get("split", "valid"))
    cases = eval_cases(users, split)
    metrics, _ = evaluate(model=model, cfg=cfg, items=items, cases=cases)
    reply = {"num-examples": len(cases), **{k: float(v) for k, v in metrics.items()}}
    return Message(RecordDict({"metrics": MetricRecord(reply)}), reply_to=msg)


app = create_app()
