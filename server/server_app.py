"""The Flower ServerApp: FedAvg over the adapters, checkpoints and metrics every round."""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.backbone import load_backbone
from common.config import Config
from common.metrics import peak_rss_mb
from common.privacy import ACCOUNTANT, COMPOSITION, UNIT, guarantee
from common.task import build_model, eval_cases, item_states, load_data, num_partitions
from common.train import evaluate
from common.weights import from_arrays, load_trainable_state, to_arrays, trainable_state
from server.runlog import RunLog
from server.strategy import make_strategy

log = logging.getLogger(__name__)


def create_app(base: Config | None = None) -> ServerApp:
    """A ServerApp whose config is `base` (default: Config()) overridden by the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, (base or Config()).merged(context.run_config))

    return app


def run_federation(grid: Grid, cfg: Config) -> None:
    """Run the federation described by the config."""
    # 1. Output directory
    runlog = RunLog(cfg.output_path)

    # 2. Public data and the frozen item states (built here once, so clients find the cache)
    dataset, splits = load_data(cfg)
    items = item_states(cfg, dataset)
    backbone = load_backbone(cfg.backbone)
    model = build_model(cfg, num_items=len(dataset.catalog))
    identity = {
        "backbone": backbone.name,
        "backbone_sha256": backbone.digest,
        "catalog_sha256": dataset.catalog.fingerprint(),
        "catalog_items": len(dataset.catalog),
        "dataset": dataset.name,
    }

    # 3. Initial model, or the last checkpoint when resuming
    done = 0
    if cfg.resume and (checkpoint := runlog.latest()) is not None:
        done, state, _ = checkpoint
        load_trainable_state(model, state)
        runlog.truncate_metrics_after(done)
        log.info("Resuming after round %d from %s", done, runlog.models)
    remaining = cfg.num_server_rounds - done
    if remaining <= 0:
        log.info("All %d rounds are done already; nothing to run.", cfg.num_server_rounds)
        return

    # 4. Strategy: every partition must be connected before round 1 (no under-sampling)
    nodes = num_partitions(cfg, splits)
    strategy = make_strategy(
        cfg.strategy,
        server_learning_rate=cfg.server_learning_rate,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=max(1, int(nodes * cfg.fraction_train)),
        min_evaluate_nodes=max(1, int(nodes * cfg.fraction_evaluate)),
        min_available_nodes=nodes,
        evaluate_every=cfg.evaluate_every,
        num_rounds=remaining,
    )

    # 5. After each round: central evaluation (simulation), checkpoint, metrics row
    valid_cases, test_cases = eval_cases(list(splits), "valid"), eval_cases(list(splits), "test")
    start = time.perf_counter()
    last_end = [start]
    spent: dict[str, float] = {}
    latest: list[ArrayRecord] = []  # the global model after the newest round

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        global_round = done + server_round
        latest[:] = [arrays]
        load_trainable_state(model, from_arrays(arrays))
        row: dict[str, object] = {"round": global_round}
        if cfg.central_eval:
            metrics, _ = evaluate(model=model, cfg=cfg, items=items, cases=valid_cases)
            row.update({f"val_{k}": v for k, v in metrics.items()})
            if server_round == remaining:  # test split read once, for the final model only
                metrics, _ = evaluate(model=model, cfg=cfg, items=items, cases=test_cases)
                row.update({f"test_{k}": v for k, v in metrics.items()})
        stats = strategy.stats.get(server_round)
        if stats is not None:
            row.update(_stats_row(stats, cfg))
            if stats.epsilons:  # the largest over every round so far; the newest mean
                spent["epsilon_max"] = max(spent.get("epsilon_max", 0.0), row["epsilon_max"])
                spent["epsilon_mean"] = row["epsilon_mean"]
        row["server_peak_rss_mb"] = peak_rss_mb()
        now = time.perf_counter()
        row["elapsed_s"] = now - start
        row["round_s"] = now - last_end[0]
        last_end[0] = now
        if server_round > 0:
            runlog.save_round(
                global_round,
                state=trainable_state(model),
                cfg=cfg,
                metadata={**identity, "metrics": row, "privacy": _privacy(cfg, spent)},
            )
        runlog.append_metrics(row)
        return MetricRecord({k: v for k, v in row.items() if isinstance(v, int | float)})

    strategy.start(
        grid=grid,
        initial_arrays=to_arrays(trainable_state(model)),
        num_rounds=remaining,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord({"split": "valid"}),
        evaluate_fn=after_round if not done else _skip_round_zero(after_round),
    )

    # 6. The final model (unchanged when no client could train, e.g. every budget spent)
    load_trainable_state(model, from_arrays(latest[0]))
    final = runlog.save_final(
        state=trainable_state(model),
        cfg=cfg,
        metadata={**identity, "round": cfg.num_server_rounds, "privacy": _privacy(cfg, spent)},
    )
    log.info("Final model written to %s", final)


app = create_app()


def _skip_round_zero(fn):
    """When resuming, round 0 is the checkpoint: already evaluated and logged."""
    return lambda server_round, arrays: None if server_round == 0 else fn(server_round, arrays)


def _stats_row(stats, cfg: Config) -> dict[str, object]:
    row: dict[str, object] = {
        "clients_sampled": stats.clients_sampled,
        "clients_train": stats.clients_train,
        "clients_declined": stats.clients_declined,
        "clients_rejected": stats.clients_rejected,
        "clients_failed": stats.clients_failed,
        "train_loss": stats.train_loss,
        "bytes_down": stats.bytes_down,
        "bytes_up": stats.bytes_up,
    }
    if stats.clients_sampled:
        row["bytes_per_client"] = (stats.bytes_down + stats.bytes_up) / stats.clients_sampled
    if stats.client_peak_rss_mb:
        row["client_peak_rss_mb"] = stats.client_peak_rss_mb
    if stats.update_seconds:
        row["client_update_s_mean"] = float(np.mean(stats.update_seconds))
    row.update({f"fed_{k}": v for k, v in stats.evaluate.items() if k != "num-examples"})
    if stats.epsilons:
        row.update(
            {
                "epsilon_max": float(np.max(stats.epsilons)),
                "epsilon_mean": float(np.mean(stats.epsilons)),
                "dp_delta": cfg.dp_delta,
                "epsilon_unit": UNIT,
                "accountant": ACCOUNTANT,
                "composition": COMPOSITION,
            }
        )
    return row


def _privacy(cfg: Config, spent: dict[str, float]) -> dict[str, object]:
    if not cfg.dp_enabled:
        return {"dp": False}
    return {
        "dp": True,
        **guarantee(spent.get("epsilon_max"), cfg.dp_delta),  # the largest over clients
        "epsilon_mean": spent.get("epsilon_mean"),
        "target_epsilon": cfg.dp_target_epsilon,
    }
