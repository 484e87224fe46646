"""What the server's aggregation costs a round: the weighted mean taken from the decoded updates
(`averages`, server/strategy.py) against every reply handed to Flower's own mean.

Both variants aggregate alike replies (the scenario's model, its cohort, random updates in its
wire dtype) with the scenario's strategy and settings, alternating round by round in one
process, so the machine's load falls on both alike. Writes aggregation.json and .md:

    python -m simulations.aggregation_bench [--scenario TOML] [--rounds N]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from simulations.report import CONFIGS, RESULTS, markdown_table, write_results

SCENARIO = CONFIGS / "bench-fed-text-restart.toml"
RESULT_FILE = "aggregation.json"


def train_reply(node: int, content=None, *, src: int | None = None, error=None):
    """node's reply to the training message sent to it (from `src`: the SuperLink's errors)."""
    from flwr.app import Metadata
    from flwr.app.message import make_message

    meta = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node if src is None else src,
        dst_node_id=0,
        reply_to_message_id=f"q{node}",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    if error is not None:
        return make_message(metadata=meta, error=error)
    return make_message(metadata=meta, content=content)


def replies_for(
    state: dict[str, np.ndarray], nodes: list[int], rng: np.random.Generator, wire_dtype: str
):
    """One training reply per node, as a client sends it: a random update in the wire dtype,
    20 examples."""
    from flwr.app import MetricRecord, RecordDict

    from common.wire import encode_update

    out = []
    for node in nodes:
        trained = {
            k: v + rng.normal(size=v.shape).astype(np.float32) * 1e-3 for k, v in state.items()
        }
        update = encode_update(trained, state, wire_dtype)
        metrics = MetricRecord({"num-examples": 20, "declined": 0, "train-loss": 7.0})
        out.append(train_reply(node, RecordDict({"arrays": update, "metrics": metrics})))
    return out


def round_seconds(scenario: Path, *, rounds: int, seed: int = 0) -> dict:
    """Median seconds of `aggregate_train` a round, for each variant, over `rounds` rounds."""
    from types import SimpleNamespace

    import torch
    from flwr.app import ArrayRecord, ConfigRecord

    from common.config import Config
    from common.task import build_model, load_data
    from common.weights import trainable_state
    from server.server_app import strategy_of
    from simulations.run import load_scenario

    spec = load_scenario(scenario)
    cfg = Config().merged(spec.run)
    dataset, _ = load_data(cfg)  # the scenario's catalog sizes the model's id rows, if any
    state = {
        k: v.astype(np.float32)
        for k, v in trainable_state(build_model(cfg, num_items=len(dataset.catalog))).items()
    }
    # Flower's cohort over the scenario's federation, as strategy_of sizes it
    cohort = max(1, int(spec.federation["num-supernodes"] * cfg.fraction_train))
    nodes = list(range(1, cohort + 1))
    model = ArrayRecord(OrderedDict((k, torch.from_numpy(v)) for k, v in state.items()))
    grid = SimpleNamespace(get_node_ids=lambda: nodes)
    rng = np.random.default_rng(seed)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    strategies = {}
    for averages in seconds:
        # as the ServerApp builds it, over a federation of the cohort alone (all sampled)
        strategies[averages] = strategy_of(cfg.replace(fraction_train=1.0), nodes=cohort)
        strategies[averages].averages = averages
        strategies[averages]._construct_messages = lambda record, node_ids, kind: [
            SimpleNamespace(
                metadata=SimpleNamespace(message_id=f"q{n}", dst_node_id=n),
                content={"arrays": record["arrays"]},
            )
            for n in node_ids
        ]
    for server_round in range(1, rounds + 1):
        for averages, strategy in strategies.items():
            strategy.configure_train(server_round, model, ConfigRecord(), grid)
            replies = replies_for(state, nodes, rng, cfg.wire_dtype)
            start = time.perf_counter()
            strategy.aggregate_train(server_round, replies)
            seconds[averages].append(time.perf_counter() - start)
    warm = rounds // 10  # the first rounds import and allocate
    return {
        "scenario": scenario.name,
        "strategy": cfg.strategy,
        "clients_per_round": cohort,
        "tensors": len(state),
        "parameters": int(sum(v.size for v in state.values())),
        "rounds": rounds,
        "mean_of_replies_s": float(np.median(seconds[True][warm:])),
        "flowers_mean_s": float(np.median(seconds[False][warm:])),
    }


def markdown(result: dict) -> str:
    header = ["aggregation a round", "median s", "per client update, s"]
    per = result["clients_per_round"]
    body = [
        [name, f"{result[key]:.4f}", f"{result[key] / per:.4f}"]
        for name, key in (
            ("weighted mean of the decoded updates, one reply to Flower", "mean_of_replies_s"),
            ("every reply to Flower's mean", "flowers_mean_s"),
        )
    ]
    ratio = result["mean_of_replies_s"] / result["flowers_mean_s"]
    return (
        f"{result['scenario']} ({result['strategy']}, {per} clients a round, "
        f"{result['tensors']} tensors, {result['parameters']:,} parameters), "
        f"{result['rounds']} rounds, the two alternating; `python -m "
        "simulations.aggregation_bench`.\n\n"
        + markdown_table(header, body)
        + f"\n\nRatio (one reply / every reply): {ratio:.2f}.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.aggregation_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--scenario", type=Path, default=SCENARIO, help="federated scenario")
    parser.add_argument("--rounds", type=int, default=200, help="rounds of each variant (200)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where results go")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # Flower's INFO lines for every round
    result = round_seconds(args.scenario, rounds=args.rounds)
    write_results(args.results / RESULT_FILE, result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
