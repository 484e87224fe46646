"""Trainable state <-> numpy arrays, and the self-describing model directory.

Only trainable tensors ever leave a device: the frozen backbone never travels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from torch import nn

from common.config import Config
from common.files import ADAPTER_WEIGHTS, METADATA, TRAINABLE_WEIGHTS
from common.model import lora_config

FORMAT_VERSION = 2  # 2: LoRA tensors named on the whole backbone, as peft loads them


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under Opacus's GradSampleModule (which stores it as `_module`)."""
    return getattr(model, "_module", model)


def trainable_state(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """The trainable tensors as float32 numpy arrays, in a stable order."""
    return OrderedDict(
        (name, p.detach().cpu().float().numpy().copy())
        for name, p in _unwrap(model).named_parameters()
        if p.requires_grad
    )


def load_trainable_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Copy trainable tensors into the model; names and shapes must match exactly."""
    params = {n: p for n, p in _unwrap(model).named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(
            f"Trainable tensors do not match the model: missing {missing[:5]}, "
            f"unexpected {extra[:5]} (model has {len(params)}, update has {len(state)})."
        )
    for name, p in params.items():
        value = np.asarray(state[name])
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(
                f"Tensor {name!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(p.shape)}."
            )
        if not np.all(np.isfinite(value)):
            raise ValueError(f"Tensor {name!r} holds NaN or infinite values.")
        with torch.no_grad():
            p.copy_(torch.from_numpy(value).to(p.dtype))


def to_arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    """The trainable state as Flower's ArrayRecord (order kept)."""
    return ArrayRecord(OrderedDict((k, torch.from_numpy(np.asarray(v))) for k, v in state.items()))


def from_arrays(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """Flower's ArrayRecord as the trainable state."""
    return OrderedDict((k, a.numpy()) for k, a in record.items())


def model_digest(state: dict[str, np.ndarray]) -> str:
    """sha256 (hex) of the trainable tensors: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256(b"fedrec-state-v1")
    for name in sorted(state):
        value = np.ascontiguousarray(state[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _is_lora(name: str) -> bool:
    return ".lora_" in name


# The adapted blocks are copies of the backbone's top k layers: model name
# items.blocks.<i>.<path>.lora_A.default.weight is peft's
# base_model.model.encoder.layer.<L-k+i>.<path>.lora_A.weight on the whole backbone.
_BLOCK = "items.blocks."
_PEFT_LAYER = "base_model.model.encoder.layer."


def _peft_name(name: str, layers: int, k: int) -> str:
    index, rest = name.removeprefix(_BLOCK).split(".", 1)
    return f"{_PEFT_LAYER}{layers - k + int(index)}.{rest.replace('.default.', '.')}"


def _model_name(peft_name: str, layers: int, k: int) -> str:
    if peft_name.startswith(_PEFT_LAYER):
        index, rest = peft_name.removeprefix(_PEFT_LAYER).split(".", 1)
        name = f"{_BLOCK}{int(index) - (layers - k)}.{rest}"
    else:  # format 1: the blocks' own module path under base_model.model.
        name = peft_name.removeprefix("base_model.model.")
    for part in (".lora_A.", ".lora_B."):
        name = name.replace(part, f"{part}default.")
    return name


def save_model_dir(
    path: Path, *, state: dict[str, np.ndarray], cfg: Config, metadata: dict[str, Any]
) -> Path:
    """Write the model directory atomically (temporary name, then rename).

    Layout: `adapter_config.json` + `adapter_model.safetensors` (peft's LoRA format, present
    when adapter-k > 0), `trainable.safetensors` (every other trainable tensor) and
    `fedrec.json` (config, backbone and catalog identity, round, metrics, privacy spent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        lora = {n: v for n, v in state.items() if _is_lora(n)}
        rest = {n: v for n, v in state.items() if not _is_lora(n)}
        if lora:
            layers = metadata.get("backbone_layers")
            if not isinstance(layers, int) or layers < cfg.adapter_k:
                raise ValueError(
                    "A model with LoRA blocks needs metadata['backbone_layers'] (the backbone's "
                    f"layer count, >= adapter-k={cfg.adapter_k}) to name its layers for peft; "
                    f"got {layers!r}."
                )
            peft_state = {_peft_name(n, layers, cfg.adapter_k): v for n, v in lora.items()}
            save_numpy(peft_state, str(tmp / ADAPTER_WEIGHTS))
            lora_config(
                cfg, base_model=metadata.get("backbone", ""), num_layers=layers
            ).save_pretrained(str(tmp))
        save_numpy(
            {n: np.ascontiguousarray(v) for n, v in rest.items()}, str(tmp / TRAINABLE_WEIGHTS)
        )
        meta = {"format": FORMAT_VERSION, "config": cfg.to_mapping(), **metadata}
        (tmp / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


class ModelDirError(ValueError):
    """A model directory's file is missing or damaged; the message names the file."""


def read_metadata(path: Path) -> dict[str, Any]:
    """A model directory's fedrec.json: a JSON object whose "config" this version can read."""
    meta_file = Path(path) / METADATA
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(
            f"{meta_file}: missing; {path} is not a (complete) fedrec model directory."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{meta_file}: damaged, not readable JSON ({exc}).") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ModelDirError(f'{meta_file}: damaged, it holds no "config" table.')
    try:
        Config.from_mapping(meta["config"])
    except (TypeError, ValueError) as exc:
        raise ModelDirError(f"{meta_file}: its config cannot be used ({exc})") from None
    items = meta.get("catalog_items", 1)
    if isinstance(items, bool) or not isinstance(items, int) or items < 1:
        raise ModelDirError(f"{meta_file}: damaged, catalog_items is {items!r}.")
    return meta


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_numpy(str(path))
    except FileNotFoundError:
        raise ModelDirError(f"{path}: missing from the model directory.") from None
    # truncated, not safetensors at all, or a dtype numpy has no type for
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise ModelDirError(f"{path}: damaged, not a readable safetensors file ({exc}).") from None


def load_model_dir(path: Path) -> tuple[OrderedDict[str, np.ndarray], dict[str, Any]]:
    """Read a model directory: (trainable state by model parameter name, metadata).

    A missing or damaged file raises ModelDirError naming it.
    """
    path = Path(path)
    meta = read_metadata(path)
    state: OrderedDict[str, np.ndarray] = OrderedDict(_read_tensors(path / TRAINABLE_WEIGHTS))
    adapter = path / ADAPTER_WEIGHTS
    if adapter.exists():
        k = int(meta["config"].get("adapter-k", 0))
        layers = meta.get("backbone_layers", k)
        for name, value in _read_tensors(adapter).items():
            state[_model_name(name, layers, k)] = value
    return state, meta
