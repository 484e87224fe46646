"""Aggregation strategies over the trainable tensors, hardened: bad or declined updates are
dropped and logged, never fatal."""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)
from flwr.supercore.differential_privacy import clip_inputs_inplace, compute_stdv, get_norm

from common.config import CLIENT_SAMPLINGS, LR_SCHEDULES, NORM_ACTIONS
from common.privacy import secure_numpy_rng
from common.wire import SENT_AS, decode_update_values, encode_weights, update_shape
from server.replies import (
    CLIENT_TIMES,
    DECLINED,
    MALFORMED,
    NON_FINITE,
    NUM_EXAMPLES,
    OVER_NORM,
    TRAIN_LOSS,
    Rejected,
    RoundStats,
    array_bytes,
    destinations,
    reply_node,
    update_norm,
)
from server.sampling import ShuffledPasses, ranked
from server.schedules import RestartClock, scheduled_fraction, scheduled_rate

log = logging.getLogger(__name__)

RATE_ATTRS = ("eta", "server_learning_rate")  # FedAdam / FedYogi / FedAdagrad's, FedAvgM's


@dataclass(frozen=True)
class CentralDP:
    """DP-FedAvg's server side (see common/privacy.py): Poisson sampling of clients at
    `sample_rate`, every update clipped to `clip_norm`, Gaussian noise of standard deviation
    noise_multiplier * clip_norm on the sum, divided by the expected cohort (a fixed
    denominator: one user changes the mean by at most clip_norm / expected_clients)."""

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    expected_clients: float  # sample_rate x number of clients


class ValidatedReplies:
    """Mixin for a Flower strategy: the wire format, validated replies and bounded weights.

    Clients receive the global weights in the wire dtype and reply with their update in the
    wire dtype (common/wire.py); each accepted update is turned back into float32 weights
    before the Flower strategy underneath averages them. A reply is rejected (and logged) when
    its tensors' names, shapes or dtypes differ from what was sent, or hold NaN/inf; a client
    that declines (privacy budget spent) is counted and skipped. The round goes on with the
    remaining replies. A client's weight is its example count capped at `max_client_weight`,
    or 1 for every client (`client_weighting="uniform"`): the server bounds what any client's
    claim can buy. An update whose L2 norm is over `update_norm_limit` times the median norm of
    the round's accepted updates is scaled down to that bound (`update_norm_action="clip"`) or
    rejected ("reject"), so no client moves the model much further than its peers; with fewer
    than three updates there is no meaningful median and the bound is not applied. An
    aggregate that is not finite is discarded (the global model stays). Also records each
    round's traffic, rejections by kind and privacy figures in `stats`, and evaluates every
    `evaluate_every` rounds. A server optimizer's learning rate follows `lr_schedule` over the
    run's `round_offset + num_rounds` rounds (scheduled_rate), and with `fraction_train_final`
    the cohort grows from `fraction_train` to it over the same rounds (scheduled_fraction).
    With `restart_every`, FedAdam's / FedYogi's / FedAdagrad's moments are zeroed every
    `restart_every` rounds of the run and bias correction begins again (_optimizer_round).
    With `client_sampling="shuffled"` a cohort of Flower's size is the next nodes of a pass
    over the connected nodes in a reshuffled order (server/sampling.py), not a fresh draw.

    With `central_dp`, the strategy is DP-FedAvg underneath the server optimizer: nodes are
    Poisson-sampled (build it with fraction_train = 1, it keeps each node with probability
    `sample_rate`), every update is clipped and weighted equally, and the noised mean update is
    what FedAvg / FedAvgM / FedAdam ... receive, as if from one client: the server optimizer
    only post-processes the private release. Sampling and noise draw from the operating
    system's entropy, not from the run seed.

    Strategies that average (`averages`: FedAvg and the server optimizers over its mean) get
    the round's weighted mean as one reply of the total weight, computed here from the decoded
    updates: Flower's mean of the separate replies is the same, but it re-reads every reply's
    weights from their serialized arrays. The robust strategies get every reply.
    """

    averages = False  # the strategy underneath reads only the weighted mean of the replies

    def __init__(
        self,
        *,
        evaluate_every: int = 1,
        num_rounds: int = 1,
        message_ttl_s: float | None = None,
        wire_dtype: str = "float32",
        client_weighting: str = "examples",
        max_client_weight: float = float("inf"),
        update_norm_limit: float = 0.0,
        update_norm_action: str = "clip",
        central_dp: CentralDP | None = None,
        round_offset: int = 0,
        lr_schedule: str = "constant",
        fraction_train_final: float = 0.0,
        client_sampling: str = "random",
        restart_every: int = 0,
        node_ranks: Mapping[int, int] | None = None,
        cohort_seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if client_sampling not in CLIENT_SAMPLINGS:
            raise ValueError(
                f"client_sampling must be one of {CLIENT_SAMPLINGS}, got {client_sampling!r}."
            )
        if client_sampling != "random" and central_dp is not None:
            raise ValueError("DP-FedAvg Poisson-samples its cohorts: client_sampling='random'.")
        # the cohorts' own source: other code in the server process also draws from `random`,
        # not always as often from one run to the next
        self._cohort_rng = random.Random(cohort_seed)
        # shuffled: passes over the nodes
        self._passes = (
            ShuffledPasses(lambda nodes: self._cohort_rng.sample(nodes, len(nodes)))
            if client_sampling == "shuffled"
            else None
        )
        self._grid: Grid | None = None  # this round's (configure_train)
        # node id -> partition id (server/sampling.py): cohorts drawn from the nodes in that
        # order, so that the seed fixes them; None: Flower's own draw
        self.node_ranks = node_ranks
        if restart_every and not hasattr(self, "v_t"):
            raise ValueError(f"{type(self).__name__} has no optimizer state to restart.")
        self._restarts = RestartClock(restart_every) if restart_every else None
        if fraction_train_final and central_dp is not None:
            raise ValueError("DP-FedAvg samples at a fixed rate: no cohort growth with it.")
        self._first_fraction = self.fraction_train
        self.fraction_train_final = fraction_train_final
        if fraction_train_final:  # FedAvg draws max(int(N x fraction), min_train_nodes) nodes:
            self.min_train_nodes = 1  # the scheduled fraction alone sets the cohort
        # the server optimizer's learning rate: FedOpt's eta, FedAvgM's server_learning_rate
        self._rate_attr = next((a for a in RATE_ATTRS if hasattr(self, a)), None)
        if lr_schedule != "constant" and self._rate_attr is None:
            raise ValueError(f"{type(self).__name__} has no server learning rate to schedule.")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}.")
        self.lr_schedule = lr_schedule
        self._base_rate = getattr(self, self._rate_attr) if self._rate_attr else None
        if update_norm_action not in NORM_ACTIONS:
            raise ValueError(f"update_norm_action must be one of {NORM_ACTIONS}.")
        self.round_offset = round_offset  # rounds done before (resume): logs give the run's
        self.update_norm_limit = update_norm_limit
        self.update_norm_action = update_norm_action
        self.central_dp = central_dp
        self._rng = secure_numpy_rng()
        self.evaluate_every = evaluate_every
        self.num_rounds = num_rounds
        self.message_ttl_s = message_ttl_s
        self.wire_dtype = wire_dtype
        self.client_weighting = client_weighting
        self.max_client_weight = max_client_weight
        self.stats: dict[int, RoundStats] = {}
        self._global: dict[str, np.ndarray] = {}  # float32 weights of the round being trained
        self._expected: dict[str, tuple[tuple[int, ...], str]] = {}  # wire shapes and dtypes
        self._sent: list[Message] = []  # this round's training messages

    def _construct_messages(self, record, node_ids, message_type) -> list[Message]:
        """Flower's messages with the weights in the wire dtype, expiring with the round: a
        node that was down does not wake up to last round's work (Flower's default time-to-
        live is 12 hours)."""
        if self.central_dp is not None and message_type == MessageType.TRAIN:
            node_ids = self.poisson_sample(list(node_ids))
        elif message_type == MessageType.TRAIN and self._passes is not None:
            node_ids = self._passes.draw(self._ranked_nodes(), len(list(node_ids)))
        elif message_type == MessageType.TRAIN and self.node_ranks is not None:
            node_ids = self._cohort_rng.sample(self._ranked_nodes(), len(list(node_ids)))
        wire = RecordDict(dict(record.items()))
        wire["arrays"] = encode_weights(
            {k: a.numpy() for k, a in record["arrays"].items()},
            self.wire_dtype,
            train=message_type == MessageType.TRAIN,
        )
        messages = list(super()._construct_messages(wire, node_ids, message_type))
        if self.message_ttl_s is not None:
            for msg in messages:
                msg.metadata.ttl = self.message_ttl_s
        return messages

    def _ranked_nodes(self) -> list[int]:
        """The nodes connected now, in rank order (server/sampling.py)."""
        return ranked(self._grid.get_node_ids(), self.node_ranks or {})

    def poisson_sample(self, node_ids: list[int]) -> list[int]:
        """DP-FedAvg's cohort: each node independently with probability q (OS entropy)."""
        kept = self._rng.random(len(node_ids)) < self.central_dp.sample_rate
        log.info("DP-FedAvg: Poisson sampling kept %d of %d nodes", int(kept.sum()), len(kept))
        return [node for node, keep in zip(node_ids, kept, strict=True) if keep]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        stats = self.stats.setdefault(server_round, RoundStats())
        if self.fraction_train_final:
            self.fraction_train = scheduled_fraction(
                self._first_fraction,
                self.fraction_train_final,
                server_round=self._round(server_round),
                num_rounds=self.round_offset + self.num_rounds,
            )
        self._global = {k: a.numpy().astype(np.float32) for k, a in arrays.items()}
        wire = SENT_AS[self.wire_dtype][1]
        self._expected = {
            k: (update_shape(tuple(a.shape), self.wire_dtype), wire) for k, a in arrays.items()
        }
        self._grid = grid  # the cohort is drawn again from its nodes (_construct_messages)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = messages
        stats.clients_sampled = len(messages)
        stats.bytes_down += sum(array_bytes(m.content["arrays"]) for m in messages)
        return messages

    def _update(self, msg: Message) -> dict[str, np.ndarray]:
        """The reply's update in float32 (each tensor decoded once); Rejected, with its kind
        and why, when it cannot be averaged."""
        content = msg.content
        if len(content.metric_records) != 1:
            raise Rejected(MALFORMED, "expected exactly one MetricRecord")
        metrics = next(iter(content.metric_records.values()))
        weight = metrics.get(NUM_EXAMPLES)
        if not isinstance(weight, int | float) or weight <= 0 or not np.isfinite(weight):
            raise Rejected(MALFORMED, f"'{NUM_EXAMPLES}' must be a positive number, got {weight!r}")
        if len(content.array_records) != 1:
            raise Rejected(MALFORMED, "expected exactly one ArrayRecord")
        arrays = next(iter(content.array_records.values()))
        if set(arrays.keys()) != set(self._expected):
            missing = sorted(set(self._expected) - set(arrays.keys()))[:3]
            extra = sorted(set(arrays.keys()) - set(self._expected))[:3]
            why = f"tensor names differ from the global model (missing {missing}, extra {extra})"
            raise Rejected(MALFORMED, why)
        values = {}
        for key, array in arrays.items():
            shape, dtype = self._expected[key]
            try:  # the bytes themselves, not the header the sender wrote beside them
                value = array.numpy()
            except Exception as exc:  # whatever numpy makes of forged bytes
                why = f"tensor {key!r} does not decode: {type(exc).__name__}"
                raise Rejected(MALFORMED, why) from None
            if tuple(value.shape) != shape or value.dtype != dtype:
                why = f"tensor {key!r} is {value.dtype}{list(value.shape)}, expected "
                raise Rejected(MALFORMED, why + f"{dtype}{list(shape)}")
            values[key] = value
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is what we look for
            update = decode_update_values(values, self._shapes())
            for key, value in update.items():
                if not np.all(np.isfinite(value)):
                    raise Rejected(NON_FINITE, f"tensor {key!r} holds NaN or infinite values")
        return update

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats.setdefault(server_round, RoundStats())
        accepted: list[tuple[Message, dict[str, np.ndarray]]] = []  # (reply, its update)
        sent = destinations(self._sent)
        # taken in the order they were sent, not as they arrived: float32 sums then repeat
        order = {message_id: i for i, message_id in enumerate(sent)}
        replies = sorted(
            replies, key=lambda msg: order.get(msg.metadata.reply_to_message_id, len(order))
        )
        answered = {reply_node(msg, sent) for msg in replies}
        for node in sorted(set(sent.values()) - answered):  # no reply within the timeout
            self._lost(stats, server_round, node, "no reply: the round timed out, or the node left")
        for msg in replies:
            node = reply_node(msg, sent)
            if msg.has_error():
                self._lost(stats, server_round, node, f"error {msg.error.code}: {msg.error.reason}")
                continue
            metrics = next(iter(msg.content.metric_records.values()), {})
            if metrics.get(DECLINED):
                stats.clients_declined += 1
                log.info(
                    "Round %d: node %d declined to train (%s)",
                    self._round(server_round),
                    node,
                    "privacy budget spent",
                )
                continue
            try:
                update = self._update(msg)
            except Rejected as rejected:
                self._reject(stats, server_round, node, rejected.kind, rejected.why)
                continue
            stats.bytes_up += array_bytes(next(iter(msg.content.array_records.values())))
            accepted.append((msg, update))
            stats.update_seconds.extend(_floats(metrics, "update-s"))
            for key in CLIENT_TIMES:
                stats.client_seconds.setdefault(key, []).extend(_floats(metrics, key))
            stats.client_peak_rss_mb = max(
                [stats.client_peak_rss_mb, *_floats(metrics, "peak-rss-mb")]
            )
        if self.central_dp is not None:  # every update clipped and weighted the same
            stats.clients_train = len(accepted)
            weights = [self._noised_mean(accepted, stats)] if accepted else []
        else:
            weights = self._bounded(accepted, stats, server_round, sent)
        if not weights:
            log.warning(
                "Round %d: no usable update; the global model is unchanged.",
                self._round(server_round),
            )
            return None, None
        if self._rate_attr is not None:
            stats.server_lr = scheduled_rate(
                self._base_rate,
                schedule=self.lr_schedule,
                server_round=self._round(server_round),
                num_rounds=self.round_offset + self.num_rounds,
            )
            setattr(self, self._rate_attr, stats.server_lr)
        arrays, metrics = super().aggregate_train(self._optimizer_round(server_round), weights)
        if arrays is not None:
            arrays = self._as_expected(arrays)
            if not all(np.all(np.isfinite(a.numpy())) for a in arrays.values()):
                log.warning(
                    "Round %d: the aggregate is not finite; the global model is unchanged.",
                    self._round(server_round),
                )
                return None, None
        if metrics is not None and TRAIN_LOSS in metrics and np.isfinite(metrics[TRAIN_LOSS]):
            stats.train_loss = float(metrics[TRAIN_LOSS])
        return arrays, metrics

    def _bounded(
        self,
        accepted: list[tuple[Message, dict[str, np.ndarray]]],
        stats: RoundStats,
        server_round: int,
        sent: dict[str, int],
    ) -> list[Message]:
        """The replies as weights for the strategy underneath (their weighted mean alone when
        it `averages`), each update's norm bounded relative to the round's median and each
        client's weight capped."""
        updates = [update for _, update in accepted]
        norms = [update_norm(u) for u in updates]
        bound = float("inf")
        if self.update_norm_limit > 0 and len(norms) >= 3:
            bound = self.update_norm_limit * float(np.median(norms))
        kept: list[tuple[Message, dict[str, np.ndarray]]] = []
        for (msg, update), norm in zip(accepted, norms, strict=True):
            if norm > bound:
                node = reply_node(msg, sent)
                if self.update_norm_action == "reject":
                    why = f"update norm {norm:.3g} over {bound:.3g} ({self.update_norm_limit:g} x"
                    self._reject(stats, server_round, node, OVER_NORM, why + " the median)")
                    continue
                stats.clients_clipped += 1
                log.info(
                    "Round %d: scaled the update of node %d from norm %.3g to %.3g",
                    self._round(server_round),
                    node,
                    norm,
                    bound,
                )
                update = {k: v * np.float32(bound / norm) for k, v in update.items()}
            kept.append((msg, update))
        stats.clients_train = len(kept)
        if self.averages and kept:  # Flower's weighted mean of one reply is that reply
            return [self._weighted_mean(kept)]
        return [self._as_weights(msg, update) for msg, update in kept]

    def _reject(self, stats: RoundStats, server_round: int, node: int, kind: str, why: str):
        stats.clients_rejected += 1
        stats.rejected[kind] = stats.rejected.get(kind, 0) + 1
        log.warning(
            "Round %d: rejected the update of node %d: %s", self._round(server_round), node, why
        )

    def _weight_and_loss(self, msg: Message) -> tuple[float, float]:
        """A reply's bounded aggregation weight and its training loss (NaN if unusable)."""
        metrics = next(iter(msg.content.metric_records.values()))
        claimed = float(metrics[NUM_EXAMPLES])
        bounded = (
            1.0 if self.client_weighting == "uniform" else min(claimed, self.max_client_weight)
        )
        loss = metrics.get(TRAIN_LOSS)
        usable = isinstance(loss, int | float) and np.isfinite(loss)
        return bounded, float(loss) if usable else float("nan")

    def _with_weights(
        self, msg: Message, update: dict[str, np.ndarray], weight: float, loss: float
    ) -> Message:
        """`msg` as the strategy underneath reads a reply: global weights + `update` in float32
        under "arrays", and "metrics" holding `weight` and `loss` (the same keys for every
        reply, whatever names and extra values the client sent)."""
        weights = OrderedDict((k, torch.from_numpy(self._global[k] + v)) for k, v in update.items())
        metrics = MetricRecord({NUM_EXAMPLES: weight, TRAIN_LOSS: loss})
        msg.content = RecordDict({"arrays": ArrayRecord(weights), "metrics": metrics})
        return msg

    def _as_weights(self, msg: Message, update: dict[str, np.ndarray]) -> Message:
        """One reply for the strategy underneath, with its bounded weight and its loss."""
        return self._with_weights(msg, update, *self._weight_and_loss(msg))

    def _weighted_mean(self, kept: list[tuple[Message, dict[str, np.ndarray]]]) -> Message:
        """The replies' weighted mean as one reply, for strategies that average (`averages`):
        what Flower's weighted mean of the separate replies computes, the training loss
        included, without encoding every reply's weights and decoding them again."""
        weights, losses = zip(*(self._weight_and_loss(msg) for msg, _ in kept), strict=True)
        shares = np.asarray(weights) / sum(weights)
        mean = {
            k: sum(np.float32(s) * update[k] for s, (_, update) in zip(shares, kept, strict=True))
            for k in self._global
        }
        loss = float(np.dot(shares, losses))
        return self._with_weights(kept[0][0], mean, float(sum(weights)), loss)

    def _noised_mean(
        self, accepted: list[tuple[Message, dict[str, np.ndarray]]], stats: RoundStats
    ) -> Message:
        """DP-FedAvg's release: clip each update, sum, add noise, divide by the expected
        cohort; returned as one reply of weight 1 holding global weights + the noised mean."""
        dp = self.central_dp
        keys = list(self._global)
        total = [np.zeros_like(self._global[k], dtype=np.float64) for k in keys]
        for _, decoded in accepted:
            update = [decoded[k].astype(np.float64) for k in keys]
            if get_norm(update) > 0:  # Flower's clipping, whatever the client did
                clip_inputs_inplace(update, dp.clip_norm)
            for acc, u in zip(total, update, strict=True):
                acc += u
        std = compute_stdv(dp.noise_multiplier, dp.clip_norm, dp.expected_clients)
        stats.noise_std = std
        mean = {
            k: (acc / dp.expected_clients + self._rng.normal(0.0, std, acc.shape)).astype(
                np.float32
            )
            for k, acc in zip(keys, total, strict=True)
        }
        release = accepted[0][0]
        key = next(iter(release.content.array_records))
        release.content[key] = ArrayRecord(
            OrderedDict((k, torch.from_numpy(self._global[k] + mean[k])) for k in keys)
        )
        release.content[next(iter(release.content.metric_records))] = MetricRecord(
            {NUM_EXAMPLES: 1.0}
        )
        return release

    def _optimizer_round(self, server_round: int) -> int:
        """The round Flower's FedOpt bias-corrects at: with restart_every, the steps since
        its moments were zeroed (RestartClock), zeroing them when a period begins."""
        if self._restarts is None:
            return server_round
        restart, steps = self._restarts.step(self._round(server_round))
        if restart:
            self.m_t, self.v_t = None, None  # FedAdagrad keeps m_t too
        return steps

    def _round(self, server_round: int) -> int:
        """The run's round number of Flower's `server_round` (the same as metrics.jsonl's)."""
        return self.round_offset + server_round

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self._global.items()}

    def _lost(self, stats: RoundStats, server_round: int, node: int, why: str) -> None:
        stats.clients_failed += 1
        stats.failed_nodes.append(node)
        log.warning(
            "Round %d: lost node %d (%s); the round goes on without it.",
            self._round(server_round),
            node,
            why,
        )

    def _as_expected(self, arrays: ArrayRecord) -> ArrayRecord:
        """Cast back to float32 (FedAdam's numpy arithmetic yields float64)."""
        return ArrayRecord(
            OrderedDict(
                (k, torch.from_numpy(a.numpy().astype(np.float32, copy=False)))
                for k, a in arrays.items()
            )
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        due = server_round % self.evaluate_every == 0 or server_round == self.num_rounds
        if not due:
            return []
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.stats.setdefault(server_round, RoundStats()).bytes_down += sum(
            array_bytes(m.content["arrays"]) for m in messages
        )
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        usable = []
        for msg in replies:
            if msg.has_error():
                log.warning(
                    "Round %d: evaluation failed on node %d: %s",
                    self._round(server_round),
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
                continue
            metrics = next(iter(msg.content.metric_records.values()), {})
            if metrics.get(NUM_EXAMPLES, 0) > 0:
                usable.append(msg)
        if not usable:
            return None
        metrics = super().aggregate_evaluate(server_round, usable)
        if metrics is not None:
            self.stats.setdefault(server_round, RoundStats()).evaluate = {
                k: float(v) for k, v in metrics.items() if isinstance(v, int | float)
            }
        return metrics


class FedRecAvg(ValidatedReplies, FedAvg):
    """FedAvg (McMahan et al. 2017) with the wire format, validated replies, bounded weights."""

    averages = True


class FedRecAvgM(ValidatedReplies, FedAvgM):
    """FedAvg with server momentum (Hsu et al. 2019)."""

    averages = True


class FedRecAdam(ValidatedReplies, FedAdam):
    """FedAdam (server-side Adam on the averaged update, Reddi et al. 2021)."""

    averages = True


class FedRecYogi(ValidatedReplies, FedYogi):
    """FedYogi (Reddi et al. 2021)."""

    averages = True


class FedRecAdagrad(ValidatedReplies, FedAdagrad):
    """FedAdagrad (Reddi et al. 2021)."""

    averages = True


class FedRecMedian(ValidatedReplies, FedMedian):
    """Coordinate-wise median of the clients' weights (Yin et al. 2018): robust."""


class FedRecTrimmedAvg(ValidatedReplies, FedTrimmedAvg):
    """Coordinate-wise mean without the `beta` largest and smallest shares: robust."""


class FedRecKrum(ValidatedReplies, Krum):
    """Krum (Blanchard et al. 2017): the update closest to its peers: robust."""


class FedRecBulyan(ValidatedReplies, Bulyan):
    """Bulyan (El Mhamdi et al. 2018): Krum selection, then a trimmed mean: robust."""


STRATEGIES = {
    "fedavg": FedRecAvg,
    "fedavgm": FedRecAvgM,
    "fedadam": FedRecAdam,
    "fedyogi": FedRecYogi,
    "fedadagrad": FedRecAdagrad,
    "fedmedian": FedRecMedian,
    "fedtrimmedavg": FedRecTrimmedAvg,
    "krum": FedRecKrum,
    "bulyan": FedRecBulyan,
}


def make_strategy(
    name: str,
    *,
    server_learning_rate: float,
    server_momentum: float = 0.9,
    server_tau: float = 1e-3,
    server_beta2: float = 0.99,
    trimmed_beta: float = 0.2,
    num_malicious_nodes: int = 0,
    **kwargs,
) -> FedAvg:
    """A strategy from the registry with its server optimizer's (or robust rule's) settings."""
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.")
    if name == "fedavgm":
        kwargs.update(server_learning_rate=server_learning_rate, server_momentum=server_momentum)
    elif name == "fedtrimmedavg":
        kwargs.update(beta=trimmed_beta)
    elif name in ("krum", "bulyan"):
        kwargs.update(num_malicious_nodes=num_malicious_nodes)
    elif name not in ("fedavg", "fedmedian"):
        kwargs.update(eta=server_learning_rate, tau=server_tau)
        if name in ("fedadam", "fedyogi"):
            kwargs.update(beta_2=server_beta2)
    return STRATEGIES[name](**kwargs)


def _floats(metrics, key: str) -> list[float]:
    value = metrics.get(key)
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [float(v) for v in values if np.isfinite(v)]
