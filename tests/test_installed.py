"""A device: its own files and state directory, and atomic installs of the pushed model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message import make_message

from client import installed
from client.client_app import node_of
from client.device import status
from common.config import Config
from common.weights import trainable_state
from tests.fixtures import make_synthetic_dataset, make_tiny_backbone
from tests.tiny import NUM_ITEMS, tiny_config


@pytest.fixture
def model_and_cfg(tmp_path: Path):
    from common.task import build_model

    cfg = tiny_config(backbone=str(make_tiny_backbone(tmp_path / "bert")))
    return build_model(cfg, num_items=NUM_ITEMS), cfg


def meta(version: str) -> dict:
    return {"version": version, "round": 1, "catalog_items": NUM_ITEMS}


def test_install_points_at_the_new_version_and_keeps_one_fallback(tmp_path, model_and_cfg):
    model, cfg = model_and_cfg
    state_dir = tmp_path / "state"
    assert installed.installed_dir(state_dir) is None
    for k, version in enumerate(["r0001-aaa", "r0002-bbb", "r0003-ccc"]):
        state = {n: v + k for n, v in trainable_state(model).items()}
        path = installed.install(state_dir, state=state, cfg=cfg, metadata=meta(version))
        assert installed.installed_dir(state_dir) == path
    models = state_dir / installed.MODELS_DIR
    kept = sorted(p.name for p in models.iterdir() if p.is_dir())
    assert kept == ["r0002-bbb", "r0003-ccc"]  # the installed one and its predecessor
    assert not [p for p in models.iterdir() if p.name.startswith(".")]  # no temporaries
    assert installed.installed_metadata(state_dir)["version"] == "r0003-ccc"

    loaded, metadata = installed.load_installed(state_dir)
    expected = {n: v + 2 for n, v in trainable_state(model).items()}
    got = trainable_state(loaded)
    assert all(np.array_equal(got[n], expected[n]) for n in expected)
    assert metadata["installed_at"] > 0
    info = status(state_dir)
    assert info["model"]["version"] == "r0003-ccc" and info["disk_bytes"] > 0


def test_a_bad_version_name_or_missing_model_is_a_clear_error(tmp_path, model_and_cfg):
    model, cfg = model_and_cfg
    with pytest.raises(ValueError, match="plain version name"):
        installed.install(tmp_path, state=trainable_state(model), cfg=cfg, metadata=meta("../x"))
    with pytest.raises(FileNotFoundError, match="No model is installed"):
        installed.load_installed(tmp_path / "empty")
    pointer = tmp_path / "s" / installed.MODELS_DIR / installed.POINTER
    pointer.parent.mkdir(parents=True)
    pointer.write_text("r0009-gone\n")
    with pytest.raises(FileNotFoundError, match="r0009-gone"):
        installed.installed_dir(tmp_path / "s")
    assert json.loads(json.dumps(meta("ok")))["version"] == "ok"


def device_context(tmp_path: Path, data: Path) -> Context:
    node_config = {
        "data-path": str(data / "interactions.csv"),
        "catalog-path": str(data / "items.csv"),
        "state-dir": str(tmp_path / "state"),
    }
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def message_with(config: dict) -> Message:
    meta = Metadata(
        run_id=1,
        message_id="m",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return make_message(metadata=meta, content=RecordDict({"config": ConfigRecord(config)}))


def test_a_device_reads_its_own_files_and_refuses_another_catalog(tmp_path: Path) -> None:
    data = make_synthetic_dataset(tmp_path / "data", num_users=5)
    context = device_context(tmp_path, data)
    node = node_of(context, Config(), None)
    assert node.device and len(node.users) == 5 and len(node.catalog) == 60
    assert node.cfg.cache_dir == str(tmp_path / "state" / "cache")  # caches live in state
    same = message_with({"catalog-sha256": node.catalog.fingerprint()})
    assert node_of(context, Config(), same).catalog.fingerprint() == node.catalog.fingerprint()
    with pytest.raises(ValueError, match="catalog .* differs from the server's"):
        node_of(context, Config(), message_with({"catalog-sha256": "0" * 64}))
