"""The server keeps going when a client sends a bad update or declines: rejected and logged."""

import logging
import random
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict

from server.strategy import (
    CentralDP,
    FedRecAdam,
    FedRecAvg,
    make_strategy,
    scheduled_fraction,
    scheduled_rate,
)
from simulations.aggregation_bench import train_reply as reply


def arrays(**tensors) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, torch.as_tensor(v)) for k, v in tensors.items()))


def update(node: int, n: int, **tensors):
    return reply(
        node,
        RecordDict(
            {
                "arrays": arrays(**tensors),
                "metrics": MetricRecord({"num-examples": n, "declined": 0, "train-loss": 1.0}),
            }
        ),
    )


class FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3, 4, 5, 6]


def sent(node_ids, record=None):
    """Stand-ins for the messages a Flower run would send (the grid gives them ids)."""
    return [
        SimpleNamespace(
            metadata=SimpleNamespace(message_id=f"q{n}", dst_node_id=n),
            content={"arrays": record["arrays"] if record else ArrayRecord()},
        )
        for n in node_ids
    ]


def configure(s, model):
    """Run configure_train without a Flower run (messages replaced by stand-ins)."""
    s._construct_messages = lambda record, node_ids, message_type: sent(node_ids, record)
    return list(s.configure_train(1, model, ConfigRecord(), FakeGrid()))


@pytest.fixture
def strategy():
    s = FedRecAvg(min_available_nodes=1, min_train_nodes=1)
    global_model = arrays(w=np.zeros((2, 3), np.float32), b=np.zeros(3, np.float32))
    configure(s, global_model)
    return s


def test_bad_updates_are_rejected_and_the_good_ones_averaged(strategy, caplog):
    ones, twos = np.ones((2, 3), np.float32), np.full((2, 3), 2.0, np.float32)
    b = np.zeros(3, np.float32)
    replies = [
        update(1, 10, w=ones, b=b),
        update(2, 30, w=twos, b=b),
        update(3, 10, w=np.ones((3, 2), np.float32), b=b),  # wrong shape
        update(4, 10, w=np.full((2, 3), np.nan, np.float32), b=b),  # NaN
        update(5, 10, w=ones),  # missing tensor
        reply(6, RecordDict({"metrics": MetricRecord({"num-examples": 0, "declined": 1})})),
    ]
    with caplog.at_level(logging.INFO):
        agg, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(agg["w"].numpy(), np.full((2, 3), 1.75))  # (10*1 + 30*2) / 40
    stats = strategy.stats[1]
    assert (stats.clients_train, stats.clients_rejected, stats.clients_declined) == (2, 3, 1)
    text = caplog.text
    assert "rejected the update of node 3" in text and "expected float32[2, 3]" in text
    assert "node 4" in text and "NaN" in text
    assert "node 5" in text and "missing ['b']" in text
    assert "node 6 declined" in text


def test_lost_nodes_are_named_and_the_round_goes_on(strategy, caplog):
    """A node that dies mid-round: the SuperLink answers for it (its own node id as the
    source), or nobody answers before the timeout. Both are counted as that node, lost."""
    unavailable = Error(code=5, reason="Node Unavailable")
    replies = [
        update(1, 10, w=np.ones((2, 3), np.float32), b=np.zeros(3, np.float32)),
        update(2, 10, w=np.ones((2, 3), np.float32), b=np.zeros(3, np.float32)),
        reply(3, src=1, error=unavailable),  # written by the SuperLink (node 1 as source)
        *(update(n, 10, w=np.ones((2, 3), np.float32), b=np.zeros(3, np.float32)) for n in (5, 6)),
    ]  # node 4: no reply at all
    with caplog.at_level(logging.WARNING):
        agg, _ = strategy.aggregate_train(1, replies)
    stats = strategy.stats[1]
    assert agg is not None and stats.clients_train == 4
    assert stats.clients_failed == 2 and sorted(stats.failed_nodes) == [3, 4]
    assert "lost node 3 (error 5: Node Unavailable)" in caplog.text
    assert "lost node 4 (no reply" in caplog.text and "lost node 1" not in caplog.text


def test_the_aggregate_does_not_depend_on_the_order_in_which_replies_arrive():
    """Flower's runtime hands the replies over as they arrive; summed in that order, float32
    rounding would make two runs of one seed differ."""
    rng = np.random.default_rng(0)
    counts, weights = rng.integers(1, 50, size=6), rng.normal(size=(6, 2, 3)).astype(np.float32)
    aggregates = []
    for order in (range(6), reversed(range(6)), [2, 3, 4, 5, 0, 1]):
        random.seed(0)  # the same cohort, sent in the same order
        s = FedRecAvg(min_available_nodes=1, min_train_nodes=1)
        configure(s, arrays(w=np.zeros((2, 3), np.float32)))
        arrived = [update(i + 1, int(counts[i]), w=weights[i]) for i in order]
        aggregates.append(s.aggregate_train(1, arrived)[0]["w"].numpy())
    assert all(np.array_equal(aggregates[0], a) for a in aggregates[1:])


def test_a_round_with_no_usable_update_keeps_the_model(strategy):
    bad = update(1, 10, w=np.ones((3, 2), np.float32), b=np.zeros(3, np.float32))
    assert strategy.aggregate_train(1, [bad]) == (None, None)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_beta2_reaches_flowers_optimizer(name):
    s = make_strategy(name, server_learning_rate=0.1, server_beta2=0.999)
    assert s.beta_2 == 0.999


def test_fedadam_keeps_float32():
    s = make_strategy("fedadam", server_learning_rate=0.1, min_available_nodes=1, min_train_nodes=1)
    assert isinstance(s, FedRecAdam)
    model = arrays(w=np.zeros(3, np.float32))
    configure(s, model)
    agg, _ = s.aggregate_train(1, [update(1, 5, w=np.ones(3, np.float32))])
    assert agg["w"].numpy().dtype == np.float32 and np.all(agg["w"].numpy() > 0)
    with pytest.raises(ValueError, match="Unknown strategy"):
        make_strategy("fedsgd", server_learning_rate=1.0)


def test_a_cosine_server_rate_falls_from_the_base_to_zero_at_the_last_round():
    rates = [
        scheduled_rate(0.1, schedule="cosine", server_round=r, num_rounds=4) for r in (1, 2, 4)
    ]
    np.testing.assert_allclose(rates, [0.1 * (1 + np.sqrt(0.5)) / 2, 0.05, 0.0], atol=1e-12)
    assert scheduled_rate(0.1, schedule="constant", server_round=4, num_rounds=4) == 0.1
    with pytest.raises(ValueError, match="Unknown server learning-rate schedule 'step'"):
        scheduled_rate(0.1, schedule="step", server_round=1, num_rounds=4)


@pytest.mark.parametrize("name", ["fedadam", "fedavgm"])
def test_the_server_steps_at_the_scheduled_rate_counting_the_rounds_of_a_resumed_run(name):
    """Resumed after 2 of 4 rounds, Flower's rounds 1 and 2 are the run's 3 and 4: the first
    steps at the cosine's rate for round 3, the last at rate 0 and leaves the model as sent."""
    s = make_strategy(
        name,
        server_learning_rate=0.1,
        min_available_nodes=1,
        min_train_nodes=1,
        lr_schedule="cosine",
        round_offset=2,
        num_rounds=2,
    )
    model = arrays(w=np.zeros(3, np.float32))
    configure(s, model)
    moved, _ = s.aggregate_train(1, [update(1, 5, w=np.ones(3, np.float32))])
    assert s.stats[1].server_lr == pytest.approx(0.1 * (1 - np.sqrt(0.5)) / 2)
    assert np.all(moved["w"].numpy() > 0)
    s._construct_messages = lambda record, node_ids, message_type: sent(node_ids, record)
    list(s.configure_train(2, moved, ConfigRecord(), FakeGrid()))
    last, _ = s.aggregate_train(2, [update(1, 5, w=np.full(3, 2.0, np.float32))])
    assert s.stats[2].server_lr == 0.0
    np.testing.assert_array_equal(last["w"].numpy(), moved["w"].numpy())


def test_the_cohort_grows_linearly_to_the_final_fraction_over_a_resumed_run():
    """6 nodes, 1/6 in the run's round 1 to all 6 in round 5; resumed after 2 rounds, Flower's
    rounds 1-3 are the run's 3-5: int(6 x 7/12) = 3, int(6 x 19/24) = 4, then 6 nodes."""
    assert scheduled_fraction(0.25, 0.0, server_round=9, num_rounds=10) == 0.25
    s = FedRecAvg(
        fraction_train=1 / 6,
        min_train_nodes=1,
        min_available_nodes=1,
        fraction_train_final=1.0,
        round_offset=2,
        num_rounds=3,
    )
    s._construct_messages = lambda record, node_ids, message_type: sent(node_ids, record)
    model = arrays(w=np.zeros(3, np.float32))
    sizes = [len(list(s.configure_train(r, model, ConfigRecord(), FakeGrid()))) for r in (1, 2, 3)]
    assert sizes == [3, 4, 6]


def test_a_schedule_needs_a_server_learning_rate():
    with pytest.raises(ValueError, match="FedRecMedian has no server learning rate"):
        make_strategy("fedmedian", server_learning_rate=1.0, lr_schedule="cosine")


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_averaging_strategies_get_the_mean_flower_takes_of_the_separate_replies(name):
    rng = np.random.default_rng(0)
    start = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}
    model = arrays(**{k: v.astype(np.float32) for k, v in start.items()})
    rounds = [
        [(node, int(rng.integers(1, 300)), float(rng.uniform(1, 9))) for node in (1, 2, 3)]
        for _ in range(2)
    ]
    updates = [
        [{k: rng.normal(size=v.shape) * 0.01 for k, v in start.items()} for _ in r] for r in rounds
    ]
    results = {}
    for averages in (True, False):  # False: every reply handed to Flower's own mean
        s = make_strategy(name, server_learning_rate=0.1, min_available_nodes=1, min_train_nodes=1)
        assert s.averages
        s.averages = averages
        s.max_client_weight = 100.0  # one claim above the cap, most below
        current, history = model, []
        for server_round, (cohort, deltas) in enumerate(zip(rounds, updates, strict=True), 1):
            s._construct_messages = lambda record, node_ids, message_type: sent(node_ids, record)
            s.configure_train(server_round, current, ConfigRecord(), FakeGrid())
            replies = []
            for (node, n, loss), delta in zip(cohort, deltas, strict=True):
                msg = update(node, n, **{k: v.astype(np.float32) for k, v in delta.items()})
                next(iter(msg.content.metric_records.values()))["train-loss"] = loss
                replies.append(msg)
            current, metrics = s.aggregate_train(server_round, replies)
            history.append(({k: a.numpy() for k, a in current.items()}, metrics["train-loss"]))
        results[averages] = history
    for (mine, my_loss), (flowers, flowers_loss) in zip(*results.values(), strict=True):
        for key in mine:
            np.testing.assert_allclose(mine[key], flowers[key], rtol=1e-5, atol=1e-6)
        assert my_loss == pytest.approx(flowers_loss, rel=1e-9)


def test_claimed_example_counts_buy_at_most_the_cap():
    s = FedRecAvg(min_available_nodes=1, min_train_nodes=1, max_client_weight=20.0)
    configure(s, arrays(w=np.zeros(2, np.float32)))
    replies = [
        update(1, 10, w=np.ones(2, np.float32)),
        update(2, 10**12, w=np.full(2, 4.0, np.float32)),
    ]
    agg, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(agg["w"].numpy(), (10 * 1 + 20 * 4) / 30)  # 10**12 counts as 20


def test_uniform_weighting_ignores_claimed_counts():
    s = FedRecAvg(min_available_nodes=1, min_train_nodes=1, client_weighting="uniform")
    configure(s, arrays(w=np.zeros(2, np.float32)))
    replies = [
        update(1, 1, w=np.ones(2, np.float32)),
        update(2, 500, w=np.full(2, 4.0, np.float32)),
    ]
    agg, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(agg["w"].numpy(), 2.5)


def test_half_wire_sends_float16_weights_and_adds_bfloat16_updates_to_float32():
    from common.wire import decode_weights, encode_update, encode_weights

    global_w = np.array([1.0, -2.5, 3e-3, 0.0], np.float32)
    down = encode_weights({"w": global_w}, "half")
    assert down["w"].dtype == "float16"
    received = decode_weights(down)
    trained = {"w": received["w"] + np.array([2.0, -1e-3, 0.25, 1e-7], np.float32)}
    up = encode_update(trained, received, "half")
    assert up["w"].dtype == "int16" and up["w"].numpy().nbytes == 2 * global_w.size

    s = FedRecAvg(min_available_nodes=1, min_train_nodes=1, wire_dtype="half")
    configure(s, arrays(w=global_w))
    msg = reply(1, RecordDict({"arrays": up, "metrics": MetricRecord({"num-examples": 3})}))
    agg, _ = s.aggregate_train(1, [msg])
    # the update is applied to the server's float32 weights, at bfloat16's relative precision
    np.testing.assert_allclose(
        agg["w"].numpy(), global_w + np.array([2.0, -1e-3, 0.25, 1e-7]), rtol=0, atol=4e-3 * 2.0
    )
    np.testing.assert_allclose(agg["w"].numpy()[3], 1e-7, rtol=1e-2)  # far below float16


def test_a_half_update_carrying_nan_bits_is_rejected(caplog):
    import torch as t

    s = FedRecAvg(min_available_nodes=1, min_train_nodes=1, wire_dtype="half")
    configure(s, arrays(w=np.zeros(2, np.float32)))
    nan_bits = t.tensor([float("nan"), 1.0]).bfloat16().view(t.int16)
    bad = reply(
        1, RecordDict({"arrays": arrays(w=nan_bits), "metrics": MetricRecord({"num-examples": 3})})
    )
    with caplog.at_level(logging.WARNING):
        assert s.aggregate_train(1, [bad]) == (None, None)
    assert "NaN or infinite" in caplog.text


def test_int8_updates_are_unbiased_and_within_one_step_of_each_row_scale():
    from common.wire import decode_update, encode_update, update_shape

    rng = np.random.default_rng(0)
    delta = {
        "emb": (rng.normal(size=(5, 7)) * np.array([1e-6, 1e-3, 1.0, 0.0, 30.0])[:, None]),
        "bias": rng.normal(size=3) * 1e-4,
    }
    delta = {k: v.astype(np.float32) for k, v in delta.items()}
    zeros = {k: np.zeros_like(v) for k, v in delta.items()}
    shapes = {k: v.shape for k, v in delta.items()}
    gen = torch.Generator().manual_seed(0)
    decoded = []
    for _ in range(2000):
        wire = encode_update(delta, zeros, "int8", generator=gen)
        assert wire["emb"].dtype == "int8"
        assert tuple(wire["emb"].shape) == update_shape((5, 7), "int8")
        decoded.append(decode_update(wire, shapes))
    for key, value in delta.items():
        rows = value.reshape(value.shape[0] if value.ndim > 1 else 1, -1)
        step = np.abs(rows).max(1, keepdims=True) * (1 + 2**-7) / 127  # one code of each row
        for d in decoded[:20]:
            got = d[key].reshape(rows.shape)
            assert np.all(np.abs(got - rows) <= step * 1.01)  # each row at its own scale
        mean = np.mean([d[key] for d in decoded], axis=0).reshape(rows.shape)
        assert np.all(np.abs(mean - rows) <= step * 0.1)  # stochastic rounding: unbiased
    assert np.all(decoded[0]["emb"][3] == 0.0)  # an all-zero row stays exactly zero


def dp_strategy(name: str, sigma: float, *, clip: float = 1.0, expected: float = 2.0):
    s = make_strategy(
        name,
        server_learning_rate=0.1,
        server_tau=1e-3,
        min_available_nodes=1,
        min_train_nodes=1,
        central_dp=CentralDP(sigma, clip, 0.5, expected),
    )
    configure(s, arrays(w=np.zeros(4, np.float32)))
    return s


def test_dp_fedavg_clips_each_update_weighs_clients_equally_and_divides_by_the_expected_cohort():
    s = dp_strategy("fedavg", 0.0, expected=4.0)
    replies = [
        update(1, 10**12, w=np.array([3e6, 4e6, 0, 0], np.float32)),  # norm 5e6, claims a lot
        update(2, 1, w=np.array([0, 0, 0.3, 0.4], np.float32)),  # norm 0.5: kept as is
    ]
    agg, _ = s.aggregate_train(1, replies)
    expected = (np.array([0.6, 0.8, 0, 0]) + np.array([0, 0, 0.3, 0.4])) / 4.0
    np.testing.assert_allclose(agg["w"].numpy(), expected, rtol=1e-6)


def test_dp_fedavg_noise_has_the_stated_scale_and_is_never_the_same_twice():
    n, sigma, clip, expected = 20_000, 1.5, 0.5, 3.0

    def release():
        s = make_strategy(
            "fedavg",
            server_learning_rate=1.0,
            min_available_nodes=1,
            min_train_nodes=1,
            central_dp=CentralDP(sigma, clip, 0.5, expected),
        )
        configure(s, arrays(w=np.zeros(n, np.float32)))
        agg, _ = s.aggregate_train(1, [update(1, 1, w=np.zeros(n, np.float32))])
        return agg["w"].numpy()

    first, second = release(), release()  # same inputs, same (absent) seeds
    assert not np.array_equal(first, second)
    np.testing.assert_allclose(first.std(), sigma * clip / expected, rtol=0.03)


def test_dp_fedavg_feeds_the_noised_mean_to_the_server_optimizer():
    """Under DP, FedAdam steps on the private release (here noise-free) exactly as it would on
    one client's update equal to that release."""
    private = dp_strategy("fedadam", 0.0, expected=2.0)
    replies = [update(1, 7, w=np.full(4, 0.2, np.float32)), update(2, 3, w=np.zeros(4, np.float32))]
    agg, _ = private.aggregate_train(1, replies)
    plain = make_strategy(
        "fedadam", server_learning_rate=0.1, server_tau=1e-3, min_available_nodes=1
    )
    configure(plain, arrays(w=np.zeros(4, np.float32)))
    reference, _ = plain.aggregate_train(1, [update(1, 1, w=np.full(4, 0.1, np.float32))])
    np.testing.assert_allclose(agg["w"].numpy(), reference["w"].numpy(), rtol=1e-6)


def test_poisson_sampling_keeps_each_node_with_the_sampling_rate():
    s = dp_strategy("fedavg", 1.0)
    kept = [len(s.poisson_sample(list(range(1000)))) for _ in range(20)]
    assert len(set(kept)) > 1  # a random cohort size, not a fixed one
    assert abs(np.mean(kept) - 500) < 25


# --- bounded influence: the probe's attacks, one test each ------------------------------


def honest_and(attack: np.ndarray, **options):
    """Four honest clients (update 0.01 each, 10 examples) and one attacker sending `attack`
    with a claimed count of 10**12: the aggregate and the round's stats."""
    s = FedRecAvg(min_available_nodes=1, min_train_nodes=1, max_client_weight=20.0, **options)
    configure(s, arrays(w=np.zeros(4, np.float32)))
    replies = [update(n, 10, w=np.full(4, 0.01, np.float32)) for n in (1, 2, 3, 4)]
    replies.append(update(5, 10**12, w=attack.astype(np.float32)))
    agg, _ = s.aggregate_train(1, replies)
    return (None if agg is None else agg["w"].numpy()), s.stats[1]


def test_an_update_a_million_times_the_others_is_clipped_to_the_limit():
    agg, stats = honest_and(np.full(4, 1e4), update_norm_limit=5.0)
    # the attacker's update is scaled to 5 x the median norm (0.02): 0.05 per coordinate,
    # and its weight capped at 20 of 60
    np.testing.assert_allclose(agg, (4 * 10 * 0.01 + 20 * 0.05) / 60, rtol=1e-5)
    assert (stats.clients_clipped, stats.clients_rejected, stats.clients_train) == (1, 0, 5)
    # without the bound the attacker owns the model (the probe's 3333 instead of 0.01)
    unbounded, _ = honest_and(np.full(4, 1e4), update_norm_limit=0.0)
    assert unbounded[0] > 3000


def test_an_update_over_the_limit_is_rejected_when_asked_and_counted_by_kind(caplog):
    with caplog.at_level(logging.WARNING):
        agg, stats = honest_and(np.full(4, 1e4), update_norm_limit=5.0, update_norm_action="reject")
    np.testing.assert_allclose(agg, 0.01, rtol=1e-5)
    assert stats.rejected == {"over_norm": 1} and stats.clients_train == 4
    assert "rejected the update of node 5: update norm 2e+04 over 0.1" in caplog.text


def test_values_near_float32_max_cannot_overflow_the_aggregate():
    huge = np.full(4, 3e38)
    agg, stats = honest_and(huge, update_norm_limit=5.0)  # finite in float32, norm in float64
    assert np.all(np.isfinite(agg)) and np.all(agg < 0.1) and stats.clients_clipped == 1
    # with the bound off, global weights + a finite update can still overflow float32: the
    # aggregate is discarded and the model stays
    s = FedRecAvg(min_available_nodes=1, min_train_nodes=1, update_norm_limit=0.0)
    configure(s, arrays(w=np.full(4, 1e38, np.float32)))
    replies = [update(n, 1, w=huge.astype(np.float32)) for n in (1, 2)]
    with np.errstate(over="ignore", invalid="ignore"):
        assert s.aggregate_train(1, replies) == (None, None)


def test_a_rejection_is_counted_by_kind():
    s = FedRecAvg(min_available_nodes=1, min_train_nodes=1)
    configure(s, arrays(w=np.zeros(2, np.float32)))
    replies = [
        update(1, 1, w=np.ones(2, np.float32)),
        update(2, 1, w=np.ones(3, np.float32)),
        update(3, 1, w=np.array([np.inf, 0], np.float32)),
    ]
    s.aggregate_train(1, replies)
    assert s.stats[1].rejected == {"malformed": 1, "non_finite": 1}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fedmedian", {}),
        ("fedtrimmedavg", {"trimmed_beta": 0.2}),
        ("krum", {"num_malicious_nodes": 1}),
        ("bulyan", {"num_malicious_nodes": 1}),
    ],
)
def test_robust_strategies_from_flower_ignore_a_sign_flipped_outlier(name, options):
    """Seven clients, one sending a huge sign-flipped update that the norm bound alone would
    only clip: Flower's robust rules leave it out (Bulyan needs n >= 4f + 3 = 7)."""
    s = make_strategy(
        name,
        server_learning_rate=1.0,
        min_available_nodes=1,
        min_train_nodes=1,
        update_norm_limit=0.0,
        **options,
    )
    s._construct_messages = lambda record, node_ids, message_type: sent(node_ids, record)

    class Seven:
        def get_node_ids(self):
            return list(range(1, 8))

    s.configure_train(1, arrays(w=np.zeros(3, np.float32)), ConfigRecord(), Seven())
    rng = np.random.default_rng(0)
    honest = (0.01 + 1e-3 * rng.standard_normal((6, 3))).astype(np.float32)
    replies = [update(n, 10, w=honest[n - 1]) for n in range(1, 7)]
    replies.append(update(7, 10, w=np.full(3, -100.0, np.float32)))
    agg, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(agg["w"].numpy(), 0.01, atol=3e-3)


def test_log_lines_after_a_resume_give_the_runs_round(caplog):
    """Flower counts a resumed run's rounds from 1; fedrec's lines count the whole run's, as
    metrics.jsonl does."""
    s = FedRecAvg(min_available_nodes=1, min_train_nodes=1, round_offset=50)
    configure(s, arrays(w=np.zeros(2, np.float32)))
    with caplog.at_level(logging.WARNING):
        s.aggregate_train(1, [update(1, 1, w=np.ones(3, np.float32))])
    assert "Round 51: rejected the update of node 1" in caplog.text


def test_int8_down_trains_from_int8_rows_evaluates_float16_and_adds_bfloat16_updates(
    monkeypatch,
):
    from flwr.app import MessageType
    from flwr.serverapp.strategy import FedAvg

    from common.wire import SCALE_SUFFIX, decode_weights, encode_update, encode_weights

    # Flower's messages need a run; its record is what the nodes receive
    monkeypatch.setattr(FedAvg, "_construct_messages", lambda self, record, *_: [record])

    rng = np.random.default_rng(0)
    scales = np.array([1e-6, 1e-3, 1.0, 0.0, 30.0])[:, None]
    state = {
        "emb": (rng.normal(size=(5, 7)) * scales).astype(np.float32),
        "bias": rng.normal(size=3).astype(np.float32),
    }
    s = FedRecAvg(min_available_nodes=1, min_train_nodes=1, wire_dtype="int8-down")
    model = RecordDict({"arrays": arrays(**state), "config": ConfigRecord()})
    train = s._construct_messages(model, [7], MessageType.TRAIN)[0]["arrays"]
    evaluate = s._construct_messages(model, [7], MessageType.EVALUATE)[0]["arrays"]
    assert train["emb"].dtype == "int8" and tuple(train["emb"].shape) == (5, 7)
    assert train["emb" + SCALE_SUFFIX].dtype == "int16"  # one bfloat16 scale per row
    assert tuple(train["bias" + SCALE_SUFFIX].shape) == (1,)  # a vector is one row
    assert {a.dtype for a in evaluate.values()} == {"float16"} and len(evaluate) == 2

    received = decode_weights(train)
    assert list(received) == ["emb", "bias"]
    for key, value in state.items():
        rows = value.reshape(value.shape[0] if value.ndim > 1 else 1, -1)
        step = np.abs(rows).max(1, keepdims=True) * (1 + 2**-7) / 127  # one code of each row
        error = np.abs(received[key].reshape(rows.shape) - rows)
        assert np.all(error <= step * 0.51)  # to the nearest code: half a step at most
    assert np.all(received["emb"][3] == 0.0)  # an all-zero row stays exactly zero
    again = decode_weights(encode_weights(state, "int8-down"))
    assert all(np.array_equal(again[k], received[k]) for k in state)  # every client, same point

    # the update (trained minus received) travels as bfloat16 and lands on the float32 weights
    delta = {"emb": np.full((5, 7), 1e-3, np.float32), "bias": np.full(3, -0.5, np.float32)}
    up = encode_update({k: received[k] + delta[k] for k in state}, received, "int8-down")
    assert {a.dtype for a in up.values()} == {"int16"}
    configure(s, arrays(**state))
    msg = reply(7, RecordDict({"arrays": up, "metrics": MetricRecord({"num-examples": 3})}))
    agg, _ = s.aggregate_train(1, [msg])
    for key, value in state.items():
        np.testing.assert_allclose(agg[key].numpy(), value + delta[key], rtol=0, atol=4e-3 * 0.5)


@pytest.mark.parametrize("restart_every", [0, 2])
def test_a_restart_zeroes_the_moments_and_begins_bias_correction_again(restart_every):
    """Each round a client's update is +1 on w. Restarted every 2 rounds, round 3 steps
    exactly as round 1 did (fresh moments, bias correction at step 1); without restarts the
    accumulated moments make round 3's step another."""
    s = make_strategy(
        "fedadam",
        server_learning_rate=0.1,
        min_available_nodes=1,
        min_train_nodes=1,
        restart_every=restart_every,
    )
    s._construct_messages = lambda record, node_ids, message_type: sent(node_ids, record)
    model, steps = arrays(w=np.zeros(3, np.float32)), []
    for r in (1, 2, 3):
        list(s.configure_train(r, model, ConfigRecord(), FakeGrid()))
        w = model["w"].numpy()
        moved, _ = s.aggregate_train(r, [update(1, 5, w=np.ones(3, np.float32))])
        steps.append(moved["w"].numpy() - w)
        model = moved
    assert (np.allclose(steps[2], steps[0], rtol=1e-6), restart_every) in ((True, 2), (False, 0))
    with pytest.raises(ValueError, match="no optimizer state to restart"):
        make_strategy("fedavgm", server_learning_rate=0.1, restart_every=2)


def test_a_period_whose_first_round_had_no_usable_update_still_restarts():
    """Restarted every 2 rounds: round 3 (a period's first) gets no update, so round 4 is
    the period's first step and steps exactly as round 1 did."""
    s = make_strategy(
        "fedadam",
        server_learning_rate=0.1,
        min_available_nodes=1,
        min_train_nodes=1,
        restart_every=2,
    )
    s._construct_messages = lambda record, node_ids, message_type: sent(node_ids, record)
    model, steps = arrays(w=np.zeros(3, np.float32)), {}
    for r in (1, 2, 3, 4):
        list(s.configure_train(r, model, ConfigRecord(), FakeGrid()))
        replies = [] if r == 3 else [update(1, 5, w=np.ones(3, np.float32))]
        moved, _ = s.aggregate_train(r, replies)
        if moved is not None:
            steps[r] = moved["w"].numpy() - model["w"].numpy()
            model = moved
    assert set(steps) == {1, 2, 4}
    np.testing.assert_allclose(steps[4], steps[1], rtol=1e-6)
