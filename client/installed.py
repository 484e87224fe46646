"""The global model installed on a device: atomic installs into its state directory.

    STATE_DIR/models/<version>/   a model directory (common/weights.py: save_model_dir)
    STATE_DIR/models/INSTALLED    the version in use (one line)

An install writes the new version's directory under a temporary name and renames it into
place, then replaces INSTALLED the same way. A reader therefore sees either the old model or
the new one, never a half-written one, even if the device loses power mid-install. The
previous version is kept (a fallback); older ones are removed. A version whose files were
damaged later (a bad disk sector, a truncated copy) is skipped with a warning naming the file,
and the previous version is used instead.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from common.config import Config
from common.files import METADATA
from common.model import Recommender
from common.weights import (
    ModelDirError,
    load_model_dir,
    load_trainable_state,
    read_metadata,
    save_model_dir,
)

log = logging.getLogger(__name__)

MODELS_DIR = "models"
POINTER = "INSTALLED"
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
KEEP = 2  # the installed version and the one before it

T = TypeVar("T")


class InstalledModelError(ValueError):
    """No installed model version can be loaded; the message names the damaged files."""


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
    """The directory INSTALLED names, or None when nothing was installed yet (not loaded:
    see `first_usable` for the newest version that loads)."""
    pointer = Path(state_dir) / MODELS_DIR / POINTER
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not in {pointer.parent}.")
    return path


def first_usable(state_dir: Path, load: Callable[[Path], T]) -> tuple[Path, T] | None:
    """(version directory, load(directory)) of the newest installed version that loads.

    Versions are tried newest first: the one INSTALLED names, then the other kept one. A
    version whose files are damaged (`load` raises ModelDirError) is skipped with a warning
    naming the file. None when nothing was installed; InstalledModelError, one line naming
    the damaged files, when no version loads.
    """
    versions, problems = _versions(Path(state_dir))
    for position, path in enumerate(versions):
        try:
            result = load(path)
        except ModelDirError as exc:
            problems.append(_one_line(exc))
            if position + 1 < len(versions):
                log.warning("%s Falling back to the previous installed version.", problems[-1])
            continue
        if problems:
            log.warning("Using the installed model %s (%s).", path.name, path)
        return path, result
    if problems:
        raise InstalledModelError(
            f"No usable model is installed in {state_dir}: {' '.join(problems)} Wait for the "
            "server's next push (fedrec-client join), or remove the damaged version."
        )
    return None


def installed_metadata(state_dir: Path) -> dict[str, Any] | None:
    """The fedrec.json of the newest installed version whose fedrec.json reads, or None."""
    found = first_usable(state_dir, read_metadata)
    return None if found is None else found[1]


def load_installed(state_dir: Path, *, backbone: str | None = None) -> tuple[Recommender, dict]:
    """The newest installed model that loads, ready to score, and its metadata.

    `backbone` overrides the backbone path recorded by the server (the device's own copy).
    """
    found = first_usable(state_dir, lambda path: _load_version(path, backbone=backbone))
    if found is None:
        raise FileNotFoundError(
            f"No model is installed in {state_dir}: join a federation with fedrec-client join "
            "and wait for the server to push its model."
        )
    return found[1]


def _load_version(path: Path, *, backbone: str | None) -> tuple[Recommender, dict]:
    model, _, metadata = load_model(path, backbone=backbone)
    return model, metadata


def load_model(
    path: Path, *, backbone: str | None = None, cache_dir: str | None = None
) -> tuple[Recommender, Config, dict]:
    """A model directory as a model ready to score, its config and its metadata; `backbone`
    and `cache_dir` override the recorded ones (the device's own). ModelDirError, naming the
    file, when the directory is damaged."""
    state, metadata = load_model_dir(path)
    cfg = Config.from_mapping(metadata["config"])
    if backbone is not None:
        cfg = cfg.replace(backbone=backbone)
    if cache_dir is not None:
        cfg = cfg.replace(cache_dir=cache_dir)
    if "catalog_items" not in metadata:
        raise ModelDirError(f"{path / METADATA}: damaged, it has no catalog_items.")
    # imported here: common.task loads the data layer, not needed to read metadata
    from common.task import build_model

    model = build_model(cfg, num_items=int(metadata["catalog_items"]))
    try:
        load_trainable_state(model, state)
    except ValueError as exc:  # the tensors disagree with their own fedrec.json
        raise ModelDirError(f"{path}: {exc}") from None
    return model.eval(), cfg, metadata


def _versions(state_dir: Path) -> tuple[list[Path], list[str]]:
    """Kept versions, newest first, and a problem with the INSTALLED pointer (if any)."""
    models = state_dir / MODELS_DIR
    pointer = models / POINTER
    if not pointer.exists():
        return [], []
    kept = [p for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")]
    kept.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        name, why = "", f"cannot be read ({exc})"
    else:
        why = f"names {name!r}, which is not a kept version"
    current = models / name if VERSION_PATTERN.fullmatch(name) else None
    if current is not None and current in kept:
        return [current, *(p for p in kept if p != current)], []
    problem = f"{pointer}: {why}."
    if kept:
        log.warning("%s Falling back to the newest kept version.", problem)
    return kept, [problem]


def _one_line(exc: Exception) -> str:
    return str(exc).replace("\n", " ")


def _prune(models: Path, *, keep: str) -> None:
    """Remove versions older than the newest KEEP (by install time), never `keep`."""
    versions = [p for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")]
    versions.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in versions if p.name != keep][KEEP - 1 :]:
        shutil.rmtree(old, ignore_errors=True)
