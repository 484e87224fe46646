"""The Flower ServerApp: FedAvg over the adapters, checkpoints and metrics every round."""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from common.backbone import backbone_identity
from common.config import Config
from common.metrics import peak_rss_mb
from common.privacy import calibrated_noise, fedavg_epsilon, guarantee
from common.rounds import RoundRow
from common.task import (
    build_model,
    eval_cases,
    item_states,
    load_data,
    load_run_catalog,
    num_partitions,
    popularity_metrics,
)
from common.train import evaluate
from common.weights import (
    from_arrays,
    load_trainable_state,
    model_digest,
    to_arrays,
    trainable_state,
)
from server.grid import PromptGrid
from server.replies import CLIENT_TIMES, REJECTIONS, ask_nodes
from server.runlog import RunLog
from server.sampling import node_ranks
from server.strategy import CentralDP, ValidatedReplies, make_strategy

log = logging.getLogger(__name__)


def create_app(base: Config | None = None) -> ServerApp:
    """A ServerApp whose config is `base` (default: Config()) overridden by the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = (base or Config()).merged(context.run_config)
        run_federation(
            PromptGrid(grid, max_in_flight=cfg.max_in_flight, max_pause_s=cfg.reply_poll_s),
            cfg,
            run_id=context.run_id,
        )

    return app


def run_federation(grid: Grid, cfg: Config, *, run_id: int = 0) -> None:
    """Run the federation described by the config."""
    # 1. Output directory
    runlog = RunLog(cfg.output_path)

    # 2. The catalog and its frozen item states (built here once, so simulated clients find
    #    the cache); users' interactions only where the server needs them (central evaluation,
    #    or one simulated client per partition)
    splits: tuple = ()
    if cfg.central_eval or cfg.min_nodes == 0:
        dataset, splits = load_data(cfg)
        catalog = dataset.catalog
    else:
        catalog = load_run_catalog(cfg)
    items = item_states(cfg, catalog)
    model = build_model(cfg, num_items=len(catalog))
    identity = {
        **backbone_identity(cfg.backbone),
        "catalog_sha256": catalog.fingerprint(),
        "catalog_items": len(catalog),
        "dataset": cfg.dataset if cfg.dataset != "path" else cfg.data_path,
        "run_id": run_id,
    }

    # 3. Initial model, or the last checkpoint when resuming
    done = 0
    if cfg.resume and (checkpoint := runlog.latest()) is not None:
        done, state, _ = checkpoint
        load_trainable_state(model, state)
        runlog.truncate_metrics_after(done)
        log.info("Resuming after round %d from %s", done, runlog.models)
    average = None  # server-ema: the moving average of the global model, from round 0
    if cfg.server_ema:
        average = (runlog.latest_average() if done else None) or trainable_state(model)
    remaining = cfg.num_server_rounds - done
    if remaining <= 0:
        log.info("All %d rounds are done already; nothing to run.", cfg.num_server_rounds)
        return

    # 4. Strategy: min-nodes (deployment), else every partition, connected before round 1
    nodes = cfg.min_nodes or num_partitions(cfg, splits)
    central_dp = central_dp_of(cfg, nodes) if cfg.dp_mode == "fedavg" else None
    ranks = None  # a deployment's devices: Flower's draw over their node ids
    if not cfg.min_nodes:
        check_simulated_nodes(grid, cfg, expected=nodes)
        if central_dp is None:
            ranks = node_ranks(grid, timeout_s=cfg.round_timeout_s)
    # Cohorts are drawn from the simulated nodes ranked by partition, from a source seeded by
    # the run (and the rounds already done): a run trains the same users every round. A
    # deployment keeps Flower's draw (Python's `random`, seeded alike); DP-FedAvg's Poisson
    # sampling uses neither (OS entropy, server/strategy.py).
    random.seed(cfg.seed * 1_000_003 + done)
    strategy = strategy_of(cfg, nodes=nodes, central_dp=central_dp, done=done, ranks=ranks)

    # 5. After each round: central evaluation (simulation), checkpoint, metrics row
    book = RoundBook(
        cfg=cfg,
        grid=grid,
        runlog=runlog,
        model=model,
        items=items,
        splits=list(splits),
        num_items=len(catalog),
        identity=identity,
        strategy=strategy,
        central_dp=central_dp,
        done=done,
        remaining=remaining,
        average=average,
    )
    sent = {"catalog-sha256": identity["catalog_sha256"]}  # a device checks its catalog
    strategy.start(
        grid=grid,
        initial_arrays=to_arrays(trainable_state(model)),
        num_rounds=remaining,
        timeout=cfg.round_timeout_s,
        train_config=ConfigRecord(sent),
        evaluate_config=ConfigRecord({"split": "valid", **sent}),
        evaluate_fn=book.after_round,
    )

    # 6. The final model (unchanged when no client could train, e.g. every budget spent)
    load_trainable_state(model, book.served(from_arrays(book.latest)))
    state = trainable_state(model)
    metadata = {
        **identity,
        "round": cfg.num_server_rounds,
        "version": model_version(cfg.num_server_rounds, state),
        "privacy": privacy_terms(cfg, central_dp, cfg.num_server_rounds),
    }
    final = runlog.save_final(state=state, cfg=cfg, metadata=metadata)
    log.info("Final model %s written to %s", metadata["version"], final)

    # 7. Model push: every connected device installs the final model
    if cfg.push_model:
        push = push_model(grid, to_arrays(state), metadata, cfg.round_timeout_s)
        runlog.append_push({"round": cfg.num_server_rounds, **push})


def strategy_of(
    cfg: Config,
    *,
    nodes: int,
    central_dp: CentralDP | None = None,
    done: int = 0,
    ranks: dict[int, int] | None = None,
) -> ValidatedReplies:
    """The run's strategy over `nodes` connected nodes, `done` rounds already run, cohorts
    drawn from the nodes ordered by `ranks` when given (server/sampling.py)."""
    fraction_train = 1.0 if central_dp else cfg.fraction_train  # DP: Poisson-sampled
    return make_strategy(
        cfg.strategy,
        server_learning_rate=cfg.server_learning_rate,
        fraction_train=fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=max(1, int(nodes * fraction_train)),
        min_evaluate_nodes=max(1, int(nodes * cfg.fraction_evaluate)),
        min_available_nodes=nodes,
        evaluate_every=cfg.evaluate_every,
        num_rounds=cfg.num_server_rounds - done,
        message_ttl_s=cfg.round_timeout_s,
        server_momentum=cfg.server_momentum,
        server_tau=cfg.server_tau,
        server_beta2=cfg.server_beta2,
        wire_dtype=cfg.wire_dtype,
        client_weighting=cfg.client_weighting,
        max_client_weight=cfg.max_client_weight,
        update_norm_limit=cfg.update_norm_limit,
        update_norm_action=cfg.update_norm_action,
        trimmed_beta=cfg.trimmed_beta,
        num_malicious_nodes=cfg.num_malicious_nodes,
        central_dp=central_dp,
        round_offset=done,
        lr_schedule=cfg.server_lr_schedule,
        fraction_train_final=cfg.fraction_train_final,
        client_sampling=cfg.client_sampling,
        restart_every=cfg.server_restart_every,
        node_ranks=ranks,
        cohort_seed=cfg.seed * 1_000_003 + done,
    )


def check_simulated_nodes(
    grid: Grid, cfg: Config, *, expected: int, settle_s: float = 3.0, wait_s: float = 30.0
) -> None:
    """A simulated federation must have one node per partition: fail at once, naming the
    setting to change, instead of waiting forever for nodes that will never come.

    Simulated nodes register when the run starts; the count is read once it stops changing.
    """
    count, since, start = -1, time.monotonic(), time.monotonic()
    while True:
        now_count = len(grid.get_node_ids())
        if now_count == expected:
            return
        if now_count != count:
            count, since = now_count, time.monotonic()
        elif count > 0 and time.monotonic() - since >= settle_s:
            break
        if time.monotonic() - start >= wait_s:
            if count == 0:
                return  # nothing registered yet: leave the waiting to the strategy
            break
        time.sleep(0.2)
    if cfg.partition == "user":
        fix = (
            f'partition = "user" gives every user a client of their own, {expected} nodes. '
            f'Run it with --federation-config "num-supernodes={expected}" (fedrec-simulate '
            f"does this for you), or set --run-config \"partition='iid' num-partitions={count}\""
        )
    else:
        fix = (
            f'num-partitions is {expected}. Set --run-config "num-partitions={count}", or '
            f'run with --federation-config "num-supernodes={expected}"'
        )
    raise ValueError(
        f"This simulated federation has {count} node(s), but {fix}. (A deployment sets "
        "min-nodes instead and waits for its devices.)"
    )


def model_version(round_: int, state: dict[str, np.ndarray]) -> str:
    """A model's version: its round and the start of its tensors' digest ("r0005-3fa2...")."""
    return f"r{round_:04d}-{model_digest(state)[:12]}"


def push_model(
    grid: Grid, arrays: ArrayRecord, metadata: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """Send a global model to every connected node to install; who installed it and who not."""
    nodes = sorted(grid.get_node_ids())
    config = ConfigRecord(
        {
            "metadata": json.dumps(metadata, default=str),
            "catalog-sha256": metadata["catalog_sha256"],  # the device checks its catalog
        }
    )
    content = RecordDict({"arrays": arrays, "config": config})
    installed, failed = [], {}
    for node, reply in ask_nodes(grid, nodes, content, "query.install", timeout_s).items():
        if reply.has_error():
            failed[node] = reply.error.reason
        else:
            installed.append(node)
    for node in set(nodes) - set(installed) - set(failed):
        failed[node] = f"no reply within {timeout_s:.0f} s"
    version = metadata["version"]
    log.info("Model %s installed on %d of %d nodes", version, len(installed), len(nodes))
    for node, reason in sorted(failed.items()):
        log.warning("Model %s was not installed on node %d: %s", version, node, reason)
    return {
        "version": version,
        "nodes": nodes,
        "installed": sorted(installed),
        "failed": {str(k): v for k, v in sorted(failed.items())},
    }


app = create_app()


class RoundBook:
    """The ServerApp's bookkeeping after each round, with its state explicit: the newest global
    model, the server's moving average of it (server-ema), the model selected on validation so
    far and the round clock. The served model (validated, selected, tested, checkpointed as a
    version, pushed) is the average when one is kept, else the global model.

    Flower calls `after_round` (the strategy's evaluate_fn) with round 0 (the initial model)
    and after every round: central evaluation on validation (simulation), model selection,
    the single test of the selected model after the last round, checkpoint, pushes and the
    metrics row.
    """

    def __init__(
        self,
        *,
        cfg: Config,
        grid: Grid,
        runlog: RunLog,
        model,
        items,
        splits: list,
        num_items: int,
        identity: dict[str, Any],
        strategy,
        central_dp: CentralDP | None,
        done: int,
        remaining: int,
        average: dict[str, np.ndarray] | None = None,
    ):
        self.cfg, self.grid, self.runlog, self.model, self.items = cfg, grid, runlog, model, items
        self.splits, self.num_items, self.identity = splits, num_items, identity
        self.strategy, self.central_dp = strategy, central_dp
        self.done, self.remaining = done, remaining  # rounds before this run, rounds in it
        self.valid_cases, self.test_cases = eval_cases(splits, "valid"), eval_cases(splits, "test")
        self.latest: ArrayRecord | None = None  # the global model after the newest round
        self.average = average  # its moving average (server-ema), or None
        self.best = runlog.best_validation()  # (round, val NDCG@10) of the model selected
        self.start = self.last_end = time.perf_counter()

    def served(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model the server serves after a round whose global model is `state`."""
        return self.average if self.average is not None else state

    def after_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self.latest = arrays
        state = from_arrays(arrays)
        if self.average is not None and server_round > 0:
            decay = self.cfg.server_ema
            self.average = {k: decay * self.average[k] + (1 - decay) * v for k, v in state.items()}
        if server_round == 0 and self.done:
            return None  # resuming: round 0 is the checkpoint, already evaluated and logged
        cfg, model = self.cfg, self.model
        global_round = self.done + server_round
        last = server_round == self.remaining
        served = self.served(state)
        load_trainable_state(model, served)
        row: RoundRow = {"round": global_round}
        if cfg.central_eval and global_round == 0:  # the baseline to beat, on the same users
            baseline = popularity_metrics(self.splits, self.num_items, "valid")
            row["popularity_val_ndcg@10"] = baseline["ndcg@10"]
        if cfg.central_eval and (global_round % cfg.evaluate_every == 0 or last):
            self._validate(global_round, row)
        if cfg.central_eval and last and self.best is not None:
            self._test_selected(row)
            load_trainable_state(model, served)
        stats = self.strategy.stats.get(server_round)
        if stats is not None:
            row.update(_stats_row(stats))
        privacy = privacy_terms(cfg, self.central_dp, global_round)
        row.update(privacy)
        row["server_peak_rss_mb"] = peak_rss_mb()
        now = time.perf_counter()
        row["elapsed_s"], row["round_s"] = now - self.start, now - self.last_end
        self.last_end = now
        if server_round > 0:
            self._checkpoint(
                global_round, state, served, row, privacy, pushing=server_round < self.remaining
            )
        self.runlog.append_metrics(row)
        return MetricRecord({k: v for k, v in row.items() if isinstance(v, int | float)})

    def _validate(self, global_round: int, row: RoundRow) -> None:
        metrics, _ = evaluate(
            model=self.model, cfg=self.cfg, items=self.items, cases=self.valid_cases
        )
        row.update({f"val_{k}": v for k, v in metrics.items()})
        if global_round > 0 and (self.best is None or metrics["ndcg@10"] > self.best[1]):
            self.best = (global_round, metrics["ndcg@10"])
            state = trainable_state(self.model)
            self.runlog.save_best(global_round, state=state, cfg=self.cfg, metadata=self.identity)

    def _test_selected(self, row: RoundRow) -> None:
        """Model selection on validation; the test split is read once, for the selected model."""
        selected, _ = self.runlog.load_best()
        load_trainable_state(self.model, selected)
        metrics, _ = evaluate(
            model=self.model, cfg=self.cfg, items=self.items, cases=self.test_cases
        )
        row.update({f"test_{k}": v for k, v in metrics.items()})
        row.update(best_round=self.best[0], best_val_ndcg10=self.best[1])

    def _checkpoint(
        self,
        global_round: int,
        state: dict[str, np.ndarray],
        served: dict[str, np.ndarray],
        row: RoundRow,
        privacy: dict[str, object],
        *,
        pushing: bool,
    ) -> None:
        """Save the global model `state` (and the average) for resuming; push `served`."""
        cfg = self.cfg
        metadata = {
            **self.identity,
            "version": model_version(global_round, served),
            "metrics": row,
            "privacy": privacy,
        }
        self.runlog.save_round(
            global_round, state=state, cfg=cfg, metadata=metadata, average=self.average
        )
        due = cfg.push_every and global_round % cfg.push_every == 0
        if cfg.push_model and due and pushing:
            push = push_model(self.grid, to_arrays(served), metadata, cfg.round_timeout_s)
            self.runlog.append_push({"round": global_round, **push})
            row["push_installed"] = len(push["installed"])


def _stats_row(stats) -> RoundRow:
    row: RoundRow = {
        "clients_sampled": stats.clients_sampled,
        "clients_train": stats.clients_train,
        "clients_declined": stats.clients_declined,
        "clients_rejected": stats.clients_rejected,
        **{f"rejected_{kind}": stats.rejected.get(kind, 0) for kind in REJECTIONS},
        "clients_clipped": stats.clients_clipped,
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
    for key in CLIENT_TIMES:  # where a client's update time went, averaged over clients
        if values := stats.client_seconds.get(key):
            row[f"client_{key.replace('-', '_')}"] = float(np.mean(values))
    if stats.failed_nodes:
        row["failed_nodes"] = list(stats.failed_nodes)
    row.update({f"fed_{k}": v for k, v in stats.evaluate.items() if k != "num-examples"})
    if stats.noise_std is not None:
        row["dp_noise_std"] = stats.noise_std
    if stats.server_lr is not None:
        row["server_lr"] = stats.server_lr
    return row


def central_dp_of(cfg: Config, nodes: int) -> CentralDP:
    """DP-FedAvg's settings for `nodes` one-user clients: the noise multiplier (configured, or
    calibrated so that num-server-rounds spend exactly the budget), checked against it."""
    q = cfg.fraction_train
    if not 0 < q < 1:
        raise ValueError(
            f"dp-mode='fedavg' samples each client with probability fraction-train, which must "
            f"lie in (0, 1) for the accountant's subsampling, got {q}."
        )
    if cfg.dp_delta > 1.0 / nodes:
        raise ValueError(
            f"dp-delta = {cfg.dp_delta} is more than 1 / {nodes} users: a delta that large "
            "allows releasing one user's data outright. Use dp-delta <= 1 / (number of users)."
        )
    rounds = cfg.num_server_rounds
    sigma = cfg.dp_noise_multiplier or calibrated_noise(
        cfg.dp_target_epsilon, cfg.dp_delta, q, rounds
    )
    planned = fedavg_epsilon(sigma, q, rounds, cfg.dp_delta)
    if planned > cfg.dp_target_epsilon * (1 + 1e-6):
        raise ValueError(
            f"dp-noise-multiplier = {sigma} over {rounds} rounds at sampling rate {q} spends "
            f"epsilon = {planned:.3f} (user-level, delta = {cfg.dp_delta}, RDP) > "
            f"dp-target-epsilon = {cfg.dp_target_epsilon}: raise the multiplier, or set it to 0 "
            "to calibrate it."
        )
    log.info(
        "DP-FedAvg: noise multiplier %.4f, clip %.3g, q = %.4f, %d rounds -> epsilon %.3f "
        "(user-level, delta = %g, RDP)",
        sigma,
        cfg.dp_clip_norm,
        q,
        rounds,
        planned,
        cfg.dp_delta,
    )
    return CentralDP(sigma, cfg.dp_clip_norm, q, q * nodes)


def privacy_terms(cfg: Config, central_dp: CentralDP | None, rounds: int) -> dict[str, object]:
    """The guarantee after `rounds` rounds, with every term needed to read it."""
    if not cfg.dp_enabled:
        return {"dp_mode": "off"}
    if central_dp is not None:  # exact, accounted by the server
        epsilon = fedavg_epsilon(
            central_dp.noise_multiplier, central_dp.sample_rate, rounds, cfg.dp_delta
        )
        return {
            **guarantee(epsilon, cfg.dp_delta, "fedavg"),
            "dp_noise_multiplier": central_dp.noise_multiplier,
            "dp_sample_rate": central_dp.sample_rate,
            "dp_clip_norm": central_dp.clip_norm,
            "dp_target_epsilon": cfg.dp_target_epsilon,
        }
    # DP-SGD: each client accounts its own rounds on the device and declines beyond the cap
    return {
        **guarantee(cfg.dp_target_epsilon, cfg.dp_delta, "sgd"),
        "dp_clip_norm": cfg.dp_clip_norm,
        "dp_target_epsilon": cfg.dp_target_epsilon,
    }
