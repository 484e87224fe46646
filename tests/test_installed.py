"""A device: its own files and state directory, and atomic installs of the pushed model."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message import make_message

from client import installed
from client.client_app import node_of
from client.device import (
    REFUSED,
    TLS_FAILURE,
    UNREACHABLE,
    connection_failure,
    failure_message,
    main,
    status,
)
from common.config import Config
from common.files import METADATA, TRAINABLE_WEIGHTS
from common.weights import (
    ModelDirError,
    load_model_dir,
    trainable_state,
)
from tests.fixtures import make_synthetic_dataset
from tests.tiny import NUM_ITEMS, tiny_config


@pytest.fixture
def model_and_cfg(tiny_backbone: Path):
    from common.task import build_model

    cfg = tiny_config(backbone=str(tiny_backbone))
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


# --------------------------------------------------------------------------------------------
# Damaged files on a device: the previous version, or one line naming the file
# --------------------------------------------------------------------------------------------


def install_two(state_dir: Path, model, cfg) -> dict[str, Path]:
    """r0001-old then r0002-new (weights + 0 and + 1); their directories by version."""
    paths = {}
    for k, version in enumerate(["r0001-old", "r0002-new"]):
        state = {n: v + k for n, v in trainable_state(model).items()}
        paths[version] = installed.install(state_dir, state=state, cfg=cfg, metadata=meta(version))
        time.sleep(0.01)  # distinct install times
    return paths


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_a_damaged_install_falls_back_to_the_previous_version(tmp_path, model_and_cfg, caplog):
    model, cfg = model_and_cfg
    paths = install_two(tmp_path / "state", model, cfg)
    damaged = truncate(paths["r0002-new"] / TRAINABLE_WEIGHTS)
    with caplog.at_level(logging.WARNING, logger="client.installed"):
        loaded, metadata = installed.load_installed(tmp_path / "state")
    assert metadata["version"] == "r0001-old"
    expected = trainable_state(model)  # r0001-old holds the weights + 0
    got = trainable_state(loaded)
    assert all(np.array_equal(got[n], expected[n]) for n in expected)
    assert f"{damaged}: damaged, not a readable safetensors file" in caplog.text
    assert "Falling back to the previous installed version" in caplog.text


def test_a_corrupt_fedrec_json_is_named_and_skipped(tmp_path, model_and_cfg, caplog):
    model, cfg = model_and_cfg
    paths = install_two(tmp_path / "state", model, cfg)
    damaged = paths["r0002-new"] / METADATA
    damaged.write_text('{"format": 1, "config": {')
    with caplog.at_level(logging.WARNING, logger="client.installed"):
        assert installed.installed_metadata(tmp_path / "state")["version"] == "r0001-old"
    assert f"{damaged}: damaged, not readable JSON" in caplog.text
    with pytest.raises(ModelDirError, match=f"{damaged}: damaged"):
        load_model_dir(paths["r0002-new"])


def test_when_no_version_loads_the_error_names_every_damaged_file(tmp_path, model_and_cfg):
    model, cfg = model_and_cfg
    paths = install_two(tmp_path / "state", model, cfg)
    newest = truncate(paths["r0002-new"] / TRAINABLE_WEIGHTS)
    oldest = paths["r0001-old"] / METADATA
    oldest.write_bytes(b"\xff\xfe not json")
    with pytest.raises(installed.InstalledModelError) as info:
        installed.load_installed(tmp_path / "state")
    message = str(info.value)
    assert "\n" not in message and str(newest) in message and str(oldest) in message
    assert message.startswith(f"No usable model is installed in {tmp_path / 'state'}: ")


def test_a_pointer_to_a_missing_version_falls_back_to_the_kept_one(tmp_path, model_and_cfg):
    model, cfg = model_and_cfg
    paths = install_two(tmp_path / "state", model, cfg)
    shutil.rmtree(paths["r0002-new"])
    _, metadata = installed.load_installed(tmp_path / "state")
    assert metadata["version"] == "r0001-old"
    shutil.rmtree(paths["r0001-old"])
    with pytest.raises(installed.InstalledModelError, match="INSTALLED: names 'r0002-new'"):
        installed.load_installed(tmp_path / "state")


@pytest.fixture
def device_install(tmp_path: Path, model_and_cfg):
    """A state directory with two installed versions and a catalog of NUM_ITEMS items."""
    model, cfg = model_and_cfg
    data = make_synthetic_dataset(tmp_path / "data", num_users=3, num_items=NUM_ITEMS)
    paths = install_two(tmp_path / "state", model, cfg)
    command = ["recommend", "--state-dir", str(tmp_path / "state")]
    command += ["--catalog", str(data / "items.csv"), "--history", "i0,i1", "-k", "3"]
    return paths, [*command, "--device", "cpu", "--runtime", "torch"]


def test_recommend_serves_the_previous_version_when_the_newest_is_damaged(
    device_install, capsys, caplog
):
    paths, command = device_install
    damaged = truncate(paths["r0002-new"] / TRAINABLE_WEIGHTS)
    with caplog.at_level(logging.WARNING, logger="client.installed"):
        assert main(command) == 0
    assert capsys.readouterr().out.startswith("Model r0001-old (round 1)")
    assert str(damaged) in caplog.text


def test_recommend_exits_2_with_one_line_when_no_version_loads(device_install, capsys):
    paths, command = device_install
    for path in paths.values():
        truncate(path / TRAINABLE_WEIGHTS)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedrec-client: error: No usable model is installed in ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert all(str(path / TRAINABLE_WEIGHTS) in err for path in paths.values())


def test_recommend_names_a_corrupt_fedrec_json_of_a_model_directory(device_install, capsys):
    paths, command = device_install
    model_dir = paths["r0002-new"]
    (model_dir / METADATA).write_text("[1, 2")
    command = ["recommend", "--model", str(model_dir), *command[3:]]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedrec-client: error: {model_dir / METADATA}: damaged")
    assert err.count("\n") == 1


def test_a_damaged_catalog_cache_is_rebuilt_with_a_warning(tmp_path, caplog, tiny_backbone):
    from common.backbone import (
        backbone_digest,
        cache_key,
        cached_item_states,
        encode_items,
        load_backbone,
    )

    backbone = str(tiny_backbone)
    texts = ["space rocket", "red apple", "old film"]
    options = {"k": 0, "max_tokens": 5}
    fresh = cached_item_states(backbone, texts, "fp", **options, cache_dir=tmp_path / "cache")
    path = (
        tmp_path
        / "cache"
        / "item-states"
        / f"{cache_key(backbone_digest(backbone), 'fp', **options)}.safetensors"
    )
    truncate(path)
    with caplog.at_level(logging.WARNING, logger="common.backbone"):
        again = cached_item_states(backbone, texts, "fp", **options, cache_dir=tmp_path / "cache")
    assert f"{path}: damaged cache file" in caplog.text
    assert torch.equal(again.states, fresh.states) and torch.equal(again.mask, fresh.mask)
    reference = encode_items(load_backbone(backbone), texts, **options)
    assert torch.allclose(again.states, reference.states)
    # rewritten: the next process reads the file without a warning
    caplog.clear()
    from common import backbone as backbone_module

    backbone_module._load_states.cache_clear()
    with caplog.at_level(logging.WARNING, logger="common.backbone"):
        cached_item_states(backbone, texts, "fp", **options, cache_dir=tmp_path / "cache")
    assert not caplog.records


# --------------------------------------------------------------------------------------------
# join: refused, unreachable and TLS failures told apart (SuperNode logs of flwr 1.42)
# --------------------------------------------------------------------------------------------

EXIT_305 = (
    "INFO:     Uvicorn running on http://127.0.0.1:39411 (Press CTRL+C to quit)\n"
    "\x1b[91mERROR \x1b[0m:     Exit Code: 305\n"
    "Failed to initialize the connection to the SuperLink.\n"
    "{reason}\n"
    "The SuperNode could not establish a connection to the SuperLink.\n"
    "\n"
    "For more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/305.html>\n"
    "INFO:     Shutting down\n"
)


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("[code: 2004] Failed to activate SuperNode.", REFUSED),  # key not registered
        ("Client error '401 Unauthorized' for url 'https://x/v1/fleet/activate'", REFUSED),
        ("<_InactiveRpcError: StatusCode.UNAUTHENTICATED, Public key not recognized>", REFUSED),
        ("StatusCode.PERMISSION_DENIED", REFUSED),
        ("[Errno 111] Connection refused", UNREACHABLE),  # nobody listens: not a refusal
        ("[Errno -2] Name or service not known", UNREACHABLE),
        ("timed out", UNREACHABLE),
        ("StatusCode.UNAVAILABLE: failed to connect to all addresses", UNREACHABLE),
        (
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed "
            "certificate (_ssl.c:1006)",
            TLS_FAILURE,
        ),
        ("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)", TLS_FAILURE),
        ("Handshake failed", TLS_FAILURE),
    ],
)
def test_join_tells_refused_unreachable_and_tls_failures_apart(reason: str, kind: str) -> None:
    log_text = tail_like(EXIT_305.format(reason=reason))
    assert connection_failure(log_text) == (kind, reason)
    message = failure_message(kind, reason, superlink="fed.example.org:9092", max_wait_s=30.0)
    assert ("refused this device" in message) == (kind == REFUSED)
    assert ("could not be reached (gave up after --max-wait-s 30 s)" in message) == (
        kind == UNREACHABLE
    )
    assert message.startswith("TLS failure") == (kind == TLS_FAILURE)
    assert reason in message


def test_join_reads_no_connection_failure_from_a_normal_log() -> None:
    assert connection_failure("INFO :      SuperNode ID: 1\nINFO :      terminated\n") is None


def tail_like(text: str) -> str:
    """The log as join reads it (runtime.tail drops terminal colours)."""
    from common.flower.processes import ANSI_ESCAPE

    return ANSI_ESCAPE.sub("", text)
