"""A device pays its imports on every message (Flower starts a fresh ClientApp process for
each): what a k = 0 round needs must not pull in transformers, peft or opacus."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from common.backbone import backbone_digest, load_backbone
from simulations.inprocess import run_inprocess
from tests.tiny import NUM_CLIENTS, tiny_cfg

HEAVY = ("transformers", "peft", "opacus")

# One training message handled by the ClientApp, as a device's fresh process does it
ROUND = """
import json, sys
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from client.client_app import create_app
from common.config import Config
from common.task import build_model
from common.weights import trainable_state
from common.wire import encode_weights

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
cfg = Config(**json.loads(sys.argv[1]))
weights = trainable_state(build_model(cfg, num_items=60))
content = RecordDict(
    {"arrays": encode_weights(weights, "float32"), "config": ConfigRecord({"server-round": 1})}
)
context = Context(
    run_id=1,
    node_id=7,
    node_config={"partition-id": 0, "num-partitions": 4},
    state=RecordDict(),
    run_config={},
)
reply = create_app(cfg)(Message(content, dst_node_id=7, message_type=MessageType.TRAIN), context)
assert not reply.has_error(), reply.error
print(json.dumps({
    "trained": int(reply.content["metrics"]["num-examples"]),
    "heavy": [m for m in %r if m in sys.modules],
}))
"""


@pytest.mark.slow  # a fresh Python process, as a device starts one per message
def test_a_k0_round_with_cached_item_states_imports_no_transformers_peft_or_opacus(
    tmp_path, tiny_world
):
    cfg = tiny_cfg(tmp_path, *tiny_world, adapter_k=0, num_server_rounds=1)
    run_inprocess(cfg, num_nodes=NUM_CLIENTS)  # the catalog's item states are cached now
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    done = subprocess.run(
        [sys.executable, "-c", ROUND % (HEAVY,), json.dumps(fields)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["trained"] > 0
    assert result["heavy"] == []


def test_the_backbone_digest_is_of_its_files_and_the_loaded_backbone_carries_it(
    tmp_path, tiny_backbone
):
    digest = backbone_digest(str(tiny_backbone))
    assert load_backbone(str(tiny_backbone)).digest == digest
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in tiny_backbone.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    (copy / "README.md").write_text("notes change nothing")
    assert backbone_digest(str(copy)) == digest
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-5}))
    backbone_digest.cache_clear()
    assert backbone_digest(str(copy)) != digest
