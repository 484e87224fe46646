"""The global model installed on a device: atomic installs into its state directory.

    STATE_DIR/models/<version>/   a model directory (common/weights.py: save_model_dir)
    STATE_DIR/models/INSTALLED    the version in use (one line)

An install writes the new version's directory under a temporary name and renames it into
place, then replaces INSTALLED the same way. A reader therefore sees either the old model or
the new one, never a half-written one, even if the device loses power mid-install. The
previous version is kept (a fallback); older ones are removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from common.config import Config
from common.model import Recommender
from common.weights import load_model_dir, load_trainable_state, save_model_dir

MODELS_DIR = "models"
POINTER = "INSTALLED"
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
KEEP = 2  # the installed version and the one before it


def install(state_dir: Path, *, state, cfg: Config, metadata: dict[str, Any]) -> Path:
    """Install a global model as metadata["version"]; its directory."""
    version = str(metadata.get("version", ""))
    if not VERSION_PATTERN.fullmatch(version):
        raise ValueError(f"A pushed model needs a plain version name, got {version!r}.")
    models = Path(state_dir) / MODELS_DIR
    path = save_model_dir(
        models / version,
        state=state,
        cfg=cfg,
        metadata={**metadata, "installed_at": time.time()},
    )  # written under a temporary name, then renamed
    tmp = models / f".{POINTER}.tmp"
    tmp.write_text(version + "\n", encoding="utf-8")
    os.replace(tmp, models / POINTER)
    _prune(models, keep=version)
    return path


def installed_dir(state_dir: Path) -> Path | None:
    """The installed model's directory, or None when nothing was installed yet."""
    pointer = Path(state_dir) / MODELS_DIR / POINTER
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not in {pointer.parent}.")
    return path


def installed_metadata(state_dir: Path) -> dict[str, Any] | None:
    """The installed model's fedrec.json, or None."""
    path = installed_dir(state_dir)
    return None if path is None else json.loads((path / "fedrec.json").read_text())


def load_installed(state_dir: Path, *, backbone: str | None = None) -> tuple[Recommender, dict]:
    """The installed model, ready to score, and its metadata.

    `backbone` overrides the backbone path recorded by the server (the device's own copy).
    """
    path = installed_dir(state_dir)
    if path is None:
        raise FileNotFoundError(
            f"No model is installed in {state_dir}: join a federation with fedrec-client join "
            "and wait for the server to push its model."
        )
    state, metadata = load_model_dir(path)
    cfg = Config.from_mapping(metadata["config"])
    if backbone is not None:
        cfg = cfg.replace(backbone=backbone)
    # imported here: common.task loads the data layer, not needed to read metadata
    from common.task import build_model

    model = build_model(cfg, num_items=int(metadata["catalog_items"]))
    load_trainable_state(model, state)
    return model.eval(), metadata


def _prune(models: Path, *, keep: str) -> None:
    """Remove versions older than the newest KEEP (by install time), never `keep`."""
    versions = [p for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")]
    versions.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in versions if p.name != keep][KEEP - 1 :]:
        shutil.rmtree(old, ignore_errors=True)
