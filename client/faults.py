"""Faults and attacks for simulated clients: a Flower ClientApp mod, off unless asked for.

With `fault-share` > 0 in the run config, that share of the simulated clients (a fixed set of
partition ids, drawn from `seed`) misbehaves on every training message, as `fault-kind` says:

    raise      the ClientApp raises: Flower answers the server with an error reply
    hang       the ClientApp sleeps past `round-timeout-s`: its reply comes too late
    garbage    the reply's tensors are NaN (even partition ids) or have the wrong shape (odd)
    scale      the update is multiplied by `fault-scale` (model replacement, boosting)
    sign-flip  the update is multiplied by -`fault-scale` (pushes the model the wrong way)

This is how the reliability benchmark (simulations/reliability.py) and the tests check that
rounds complete with the other clients and that the server counts and bounds what it got. A
real device has no partition id, so the mod never acts there, whatever the server's run config
says.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType

from common.config import Config
from common.wire import decode_update, decode_weights, encode_update

log = logging.getLogger(__name__)

HANG_GRACE_S = 2.0  # a hung client wakes this long after the round's timeout


@functools.cache
def faulty_partitions(num_partitions: int, share: float, seed: int) -> frozenset[int]:
    """The partition ids that misbehave: round(share x num_partitions) of them."""
    count = int(round(share * num_partitions))
    rng = np.random.default_rng([seed, 0xFA017])
    return frozenset(int(p) for p in rng.choice(num_partitions, size=count, replace=False))


def make_fault_mod(base: Config):
    """The mod for a ClientApp whose config is `base` overridden by the run config."""

    def inject_faults(msg: Message, context: Context, call_next) -> Message:
        cfg = base.merged(context.run_config)
        node = context.node_config
        if (
            cfg.fault_share <= 0
            or msg.metadata.message_type != MessageType.TRAIN
            or "partition-id" not in node  # a real device
        ):
            return call_next(msg, context)
        partition = int(node["partition-id"])
        num_partitions = int(node.get("num-partitions", partition + 1))
        if partition not in faulty_partitions(num_partitions, cfg.fault_share, cfg.seed):
            return call_next(msg, context)
        kind = cfg.fault_kind
        if kind == "raise":
            raise RuntimeError(f"injected fault (fault-kind = raise) in partition {partition}")
        if kind == "hang":
            time.sleep(cfg.round_timeout_s + HANG_GRACE_S)
            return call_next(msg, context)
        reply = call_next(msg, context)
        if reply.has_error() or "arrays" not in reply.content:
            return reply  # a declined or failed round stays as it was
        update = reply.content["arrays"]
        if kind == "garbage":
            reply.content["arrays"] = _garbage(update, odd=partition % 2 == 1)
        else:
            factor = cfg.fault_scale if kind == "scale" else -cfg.fault_scale
            received = decode_weights(msg.content["arrays"])
            shapes = {k: v.shape for k, v in received.items()}
            delta = decode_update(update, shapes)
            boosted = {k: received[k] + factor * delta[k] for k in received}
            reply.content["arrays"] = encode_update(boosted, received, cfg.wire_dtype)
        return reply

    return inject_faults


def _garbage(update: ArrayRecord, *, odd: bool) -> ArrayRecord:
    """The update with NaN in every tensor, whatever the wire dtype, or (odd) its first tensor
    a row short."""
    out = OrderedDict()
    for n, (name, array) in enumerate(update.items()):
        value = array.numpy().copy()
        if odd:
            if n == 0:
                value = value[:-1] if value.shape[0] > 1 else np.concatenate([value, value])
        elif value.dtype == np.int8:  # the row scales' bfloat16 bytes: NaN (0x7FC0)
            value[..., -2], value[..., -1] = -64, 127
        elif value.dtype == np.int16:  # bfloat16 bits
            value[...] = 0x7FC0
        else:
            value[...] = np.nan
        out[name] = torch.from_numpy(np.ascontiguousarray(value))
    return ArrayRecord(out)
