"""Flower's ServerApp and ClientApp in one process, without Flower's transport.

`InProcessGrid` is a Flower `Grid` that hands every message straight to a `ClientApp` in this
process, with one `Context` per node (node config `partition-id` / `num-partitions`, state kept
across rounds, as in Flower's simulation). The ServerApp's `run_federation`, the strategies and
the ClientApp's handlers run unchanged; what is left out is Flower's runtime (SuperLink, Ray
workers, serialization). Used for quick ablations, for measuring what that runtime costs per
client (simulations/speed_bench.py), in tests, and for benchmark scenarios whose [scenario]
says `runtime = "in-process"`:

    python -m simulations.inprocess --config simulations/configs/bench-fed-dp.toml --output DIR
"""

from __future__ import annotations

import argparse
import shutil
import time
import tomllib
import uuid
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from common.config import Config

RUN_ID = 1
SUPERLINK = 0  # Flower's node id of the SuperLink (the server side of every message)


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (sequential)."""

    def __init__(self, client_app: ClientApp, *, num_nodes: int, run_config: dict | None = None):
        self.client_app = client_app
        # the identity a ServerApp process gets from Flower's runtime (messages carry it)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK
        self.contexts = {
            node_id: Context(
                run_id=RUN_ID,
                node_id=node_id,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, node_id in enumerate(range(1, num_nodes + 1))
        }
        self.replies: dict[str, Message] = {}
        self.client_seconds = 0.0  # time spent inside the ClientApp, all messages together
        self._run = None
        self._timeout: float | None = None  # of the send_and_receive under way

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            start = time.perf_counter()
            try:
                reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # as Flower does: the node's failure becomes an error reply
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            elapsed = time.perf_counter() - start
            self.client_seconds += elapsed
            ids.append(msg.metadata.message_id)
            # nodes run one after the other here; each gets the round's timeout to itself, and
            # a reply later than that never reaches the server (as with Flower's runtime)
            if self._timeout is None or elapsed <= self._timeout:
                self.replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        self._timeout = timeout
        try:
            return list(self.pull_messages(self.push_messages(messages)))
        finally:
            self._timeout = None


def run_inprocess(cfg: Config, *, num_nodes: int | None = None) -> InProcessGrid:
    """Run the federation the config describes, every node in this process."""
    from client.client_app import create_app
    from common.task import load_data, num_partitions
    from server.server_app import run_federation

    nodes = num_nodes or num_partitions(cfg, load_data(cfg)[1])
    grid = InProcessGrid(create_app(cfg), num_nodes=nodes)
    run_federation(grid, cfg)
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.inprocess",
        description="Run a scenario's federation in this process, Flower's runtime left out (the "
        "ServerApp, strategies and ClientApp unchanged); writes what fedrec-simulate writes.",
    )
    parser.add_argument("--config", type=Path, required=True, help="scenario TOML file")
    parser.add_argument("--output", type=Path, required=True, help="output directory (replaced)")
    parser.add_argument("--seed", type=int, help="overrides the scenario's seed")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's); 1 when several runs share the cores",
    )
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from simulations import report

    spec = tomllib.loads(args.config.read_text())
    run = dict(spec.get("run", {}))
    if args.seed is not None:
        run["seed"] = args.seed
    cfg = Config().merged({**run, "output-dir": str(args.output)})
    shutil.rmtree(args.output, ignore_errors=True)
    start = time.perf_counter()
    run_inprocess(cfg, num_nodes=spec.get("federation", {}).get("num-supernodes"))
    scenario = {**spec.get("scenario", {}), "path": str(args.config)}
    results = report.write_report(
        args.output,
        scenario=scenario,
        config=cfg.to_mapping(),
        overrides=sorted(run),
        federation=spec.get("federation"),
        status="finished:completed",
        run_id="in-process",
        wall_s=time.perf_counter() - start,
    )
    print(report.summary_text(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
