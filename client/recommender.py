"""Recommendations on a device, in real time, fresh without retraining.

    rec = LocalRecommender.load("state/models/r0005-...", catalog=catalog)   # or .installed(state)
    rec.recommend(["50", "172", "133"], k=10)      # [Recommendation(item_id, title, score), ...]
    rec.add_items({"new-1": "A space opera. Genres: Sci-Fi"})    # recommendable at once
    rec.add_items({"50": "A new text for item 50"}, replace=True)  # replacing needs asking
    rec.reload()                                   # a newer installed model, requests keep going

The index holds one vector per item, computed once from the frozen-backbone states of the
catalog (the disk cache training built). A request runs only the small user tower over the
last `history-len` items and one matrix-vector product over the index; a new item costs one
backbone pass over its text and one item-tower pass. Every request reads one immutable
snapshot (model, index, ids), and writers swap in a new snapshot under a lock, so a reload or
an add never blocks or breaks a request in flight.

With a state directory, added items are kept in `<state-dir>/added_items.jsonl` (one
`{"item_id": ..., "text": ...}` per line, rewritten atomically on every add) and added again
when a recommender starts over that directory, so they survive a restart.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.installed import first_usable, load_model
from common.backbone import ItemStates, cached_item_states, encode_items, load_backbone
from common.config import Config
from common.data import Catalog, DataError
from common.model import Recommender
from common.train import encoded_items, item_vectors

QUANTIZE = ("none", "int8")
RUNTIMES = ("auto", "torch", "onnx")
TITLE_CHARS = 80
ADDED_ITEMS_FILE = "added_items.jsonl"  # in the state directory


def ids_text(ids: Sequence[str], *, shown: int = 10) -> str:
    """ "'a', 'b' and 3 more": the first few ids of a list, for a message."""
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(repr(i) for i in ids[:shown]) + more


class UnknownItems(KeyError):
    """Item ids that are not in the index."""

    def __init__(self, ids: Sequence[str]):
        self.ids = list(ids)
        super().__init__(f"Unknown item id(s): {ids_text(self.ids)}.")

    def __str__(self) -> str:
        return self.args[0]


class ExistingItems(ValueError):
    """add_items without replace=True was given ids that are already in the index."""

    def __init__(self, ids: Sequence[str]):
        self.ids = list(ids)
        super().__init__(
            f"Item id(s) already in the index: {ids_text(self.ids)}. Nothing was added; ask "
            "to replace their text (replace=True) or use new ids."
        )


class TooManyAddedItems(ValueError):
    """add_items would take the number of added items past its cap."""

    def __init__(self, *, added: int, new: int, cap: int):
        self.added, self.new, self.cap = added, new, cap
        super().__init__(
            f"{new} new item(s) would take the added items from {added} to {added + new}, "
            f"over the cap of {cap}. Nothing was added."
        )


def read_added_items(path: Path) -> dict[str, str]:
    """The items kept in an added-items file (id -> text); {} when there is none."""
    if not path.exists():
        return {}
    fix = "Fix or delete that line: it is an item added through add_items or POST /items."
    items: dict[str, str] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not JSON ({exc.msg}). {fix}") from None
            fields = ("item_id", "text")
            if not isinstance(row, dict) or not all(
                isinstance(row.get(f), str) and row[f].strip() for f in fields
            ):
                raise DataError(
                    f'{path}, line {number}: expected {{"item_id": "...", "text": "..."}} with '
                    f"non-empty strings. {fix}"
                )
            items[row["item_id"]] = row["text"]
    return items


def write_added_items(path: Path, items: Mapping[str, str]) -> None:
    """Write the added items to their file at once: a crash leaves the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)  # a state directory nothing was installed in
    rows = (
        json.dumps({"item_id": i, "text": text}, ensure_ascii=False) for i, text in items.items()
    )
    write_private_file(path, "".join(row + "\n" for row in rows))


def write_private_file(path: Path, text: str) -> None:
    """Replace a file with `text` at once (a crash leaves the old file or the new), readable
    by its owner only (mode 0600, as tempfile creates it)."""
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as out:
        try:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        except BaseException:
            out.close()
            os.unlink(out.name)
            raise
    os.replace(out.name, path)


@dataclass(frozen=True)
class Recommendation:
    item_id: str
    title: str
    score: float


def title_of(text: str) -> str:
    """A display title from an item text ("Title (Year). Genres: ..." -> "Title (Year)")."""
    title = text.split(". Genres:", 1)[0].strip()
    return title if len(title) <= TITLE_CHARS else title[: TITLE_CHARS - 1] + "…"


def pick_device(device: str) -> torch.device:
    """ "auto": the GPU where one is available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class OnnxUserTower:
    """The user tower exported to ONNX and run by ONNX Runtime on the CPU.

    One intra-op thread: a 50 x 64 history is too small to split, and a single thread keeps
    the tail latency flat when other work shares the cores (simulations/results/latency.json).
    """

    def __init__(self, tower: nn.Module, *, threads: int = 1):
        import io
        import warnings

        import onnxruntime as ort

        d = tower.positions.embedding_dim
        length = tower.positions.num_embeddings
        items = torch.zeros(2, length, d)
        valid = torch.ones(2, length, dtype=torch.bool)
        graph = io.BytesIO()
        with warnings.catch_warnings():  # the tracer's notes on Python scalars
            warnings.simplefilter("ignore")
            torch.onnx.export(
                tower.eval(),
                (items, valid),
                graph,
                dynamo=False,
                input_names=["items", "valid"],
                output_names=["user"],
                dynamic_axes={"items": {0: "batch"}, "valid": {0: "batch"}, "user": {0: "batch"}},
                opset_version=17,
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            graph.getvalue(), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        feed = {"items": items.numpy(), "valid": valid.numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])  # (B, D)


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class _Snapshot:
    """Everything a request reads; replaced whole, never changed."""

    model: Recommender
    user: Any  # the user tower: the model's own, or its ONNX Runtime session
    cfg: Config
    metadata: dict[str, Any]
    item_ids: tuple[str, ...]
    titles: tuple[str, ...]
    positions: dict[str, int]  # item id -> row of vectors
    vectors: torch.Tensor  # (N, D) on the device


class LocalRecommender:
    """Recommendations from one model directory over a catalog (see the module docstring)."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        device: str = "auto",
        quantize: str = "none",
        runtime: str = "auto",
        cache_dir: str | Path | None = None,
        backbone: str | None = None,
        state_dir: Path | None = None,
    ):
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}.")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}.")
        self.catalog = catalog
        self.device = pick_device(device)
        self.quantize = quantize
        if runtime == "auto":  # ONNX Runtime on CPU: it measured fastest there
            cpu = self.device.type == "cpu"
            runtime = "onnx" if cpu and quantize == "none" and onnx_available() else "torch"
        if runtime == "onnx" and (self.device.type != "cpu" or quantize != "none"):
            raise ValueError("runtime='onnx' runs the fp32 model on the CPU only.")
        self.runtime = runtime
        self.cache_dir = cache_dir
        self.backbone_override = backbone
        self.state_dir = None if state_dir is None else Path(state_dir).expanduser()
        self.model_dir: Path | None = None
        # items added since the catalog: kept across reloads, and across restarts on disk
        self._added: dict[str, str] = {}
        if self.state_dir is not None:
            self._added = read_added_items(self.state_dir / ADDED_ITEMS_FILE)
        self._lock = threading.Lock()  # writers only; readers take the current snapshot
        self._snapshot: _Snapshot | None = None

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, model_dir: str | Path, *, catalog: Catalog, **options) -> LocalRecommender:
        """A recommender over a model directory (models/final, or an installed version)."""
        rec = cls(catalog=catalog, **options)
        rec.reload(model_dir)
        return rec

    @classmethod
    def installed(cls, state_dir: str | Path, *, catalog: Catalog, **options) -> LocalRecommender:
        """The model installed in a device's state directory; `reload()` follows new installs.

        A damaged newest version is skipped with a warning (the previous one is used);
        InstalledModelError when no version loads.
        """
        state_dir = Path(state_dir).expanduser()
        options.setdefault("cache_dir", state_dir / "cache")
        rec = cls(catalog=catalog, state_dir=state_dir, **options)
        if not rec.reload():
            raise FileNotFoundError(f"No model is installed in {state_dir}.")
        return rec

    def reload(self, model_dir: str | Path | None = None) -> bool:
        """Load a model directory (default: the device's newest install that loads, a damaged
        one skipped with a warning) and swap it in.

        Returns False when that model is already loaded. Requests in flight finish on the
        old snapshot; the next one uses the new model.
        """
        if model_dir is None:
            if self.state_dir is None:
                raise ValueError("reload() without a path needs a state directory.")
            return self._reload_installed()
        model_dir = Path(model_dir).expanduser()
        with self._lock:
            if self._snapshot is not None and self.model_dir == model_dir.resolve():
                return False
            snapshot = self._build(model_dir)
            self._snapshot, self.model_dir = snapshot, model_dir.resolve()
            return True

    def _reload_installed(self) -> bool:
        """reload() of the newest installed version that loads (damaged ones are skipped)."""

        def build(path: Path) -> _Snapshot | None:
            if self._snapshot is not None and self.model_dir == path.resolve():
                return None  # the newest usable version is the one loaded
            return self._build(path)

        with self._lock:
            found = first_usable(self.state_dir, build)
            if found is None or found[1] is None:
                return False
            self._snapshot, self.model_dir = found[1], found[0].resolve()
            return True

    def _build(self, model_dir: Path) -> _Snapshot:
        cache_dir = None if self.cache_dir is None else str(self.cache_dir)
        model, cfg, metadata = load_model(
            model_dir, backbone=self.backbone_override, cache_dir=cache_dir
        )
        expected = metadata.get("catalog_sha256")
        if expected and expected != self.catalog.fingerprint():
            raise ValueError(
                f"The model in {model_dir} was trained on another catalog (sha256 "
                f"{expected[:12]}…, {metadata.get('catalog_items')} items) than the one given "
                f"({self.catalog.fingerprint()[:12]}…, {len(self.catalog)} items)."
            )
        states = cached_item_states(
            cfg.backbone,
            list(self.catalog.texts),
            self.catalog.fingerprint(),
            k=cfg.adapter_k,
            max_tokens=cfg.max_tokens,
            cache_dir=cfg.cache_path,
        )
        with torch.inference_mode():
            vectors = item_vectors(model, states)  # (N, D), fp32 reference before quantizing
        if self.quantize == "int8":
            model = _quantized(model)
        model = model.to(self.device)
        user = OnnxUserTower(model.user) if self.runtime == "onnx" else model.user
        ids, titles = self.catalog.item_ids, tuple(title_of(t) for t in self.catalog.texts)
        snapshot = _Snapshot(
            model=model,
            user=user,
            cfg=cfg,
            metadata=metadata,
            item_ids=ids,
            titles=titles,
            positions={item: i for i, item in enumerate(ids)},
            vectors=vectors.to(self.device),
        )
        if self._added:  # items added to the previous model stay recommendable
            snapshot = self._with_items(snapshot, self._added)
        return snapshot

    # --- freshness ----------------------------------------------------------------------

    def add_items(
        self, items: Mapping[str, str], *, replace: bool = False, max_added: int | None = None
    ) -> dict[str, int]:
        """Add items (id -> text), recommendable at once; with a state directory, kept on disk.

        An id already in the index raises ExistingItems unless replace=True (then its text is
        replaced); more than max_added added items in all raises TooManyAddedItems. Either
        refusal adds nothing. Returns {"added": n, "updated": m}.
        """
        clean = {}
        for item_id, text in items.items():
            if not str(item_id).strip() or not str(text).strip():
                raise ValueError("Every added item needs a non-empty id and text.")
            clean[str(item_id)] = str(text)
        with self._lock:
            snapshot = self._current()
            existing = [i for i in clean if i in snapshot.positions]
            if existing and not replace:
                raise ExistingItems(existing)
            new = sum(1 for i in clean if i not in self._added)
            if max_added is not None and len(self._added) + new > max_added:
                raise TooManyAddedItems(added=len(self._added), new=new, cap=max_added)
            updated_snapshot = self._with_items(snapshot, clean)
            added = {**self._added, **clean}
            if self.state_dir is not None:  # on disk first: a failed write changes nothing
                write_added_items(self.state_dir / ADDED_ITEMS_FILE, added)
            self._snapshot, self._added = updated_snapshot, added
        return {"added": len(clean) - len(existing), "updated": len(existing)}

    def _with_items(self, snapshot: _Snapshot, items: Mapping[str, str]) -> _Snapshot:
        """A new snapshot with these items' vectors computed from their text."""
        cfg = snapshot.cfg
        texts = list(items.values())
        states = encode_items(
            load_backbone(cfg.backbone), texts, k=cfg.adapter_k, max_tokens=cfg.max_tokens
        )
        positions = dict(snapshot.positions)
        item_ids, titles = list(snapshot.item_ids), list(snapshot.titles)
        rows = []
        for item_id, text in items.items():
            if item_id not in positions:
                positions[item_id] = len(item_ids)
                item_ids.append(item_id)
                titles.append("")
            titles[positions[item_id]] = title_of(text)
            rows.append(positions[item_id])
        model = snapshot.model
        with torch.inference_mode():
            on_device = ItemStates(states.states.to(self.device), states.mask.to(self.device))
            pooled = encoded_items(model, on_device, torch.arange(len(rows)))  # (M, H)
            # an item the model knows keeps its id embedding; a new one is its text alone
            ids = torch.tensor(rows)
            new = self._vectors(model, pooled.to(self.device), ids.to(self.device))
            vectors = snapshot.vectors
            if len(item_ids) > vectors.shape[0]:
                grow = len(item_ids) - vectors.shape[0]
                vectors = torch.cat([vectors, vectors.new_zeros(grow, vectors.shape[1])])
            else:
                vectors = vectors.clone()
            vectors[ids.to(self.device)] = new
        return _Snapshot(
            model=model,
            user=snapshot.user,
            cfg=cfg,
            metadata=snapshot.metadata,
            item_ids=tuple(item_ids),
            titles=tuple(titles),
            positions=positions,
            vectors=vectors,
        )

    @staticmethod
    def _vectors(model: Recommender, pooled: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return model.items.head(pooled[None], ids[None])[0]  # (M, D)

    # --- recommending -------------------------------------------------------------------

    def recommend(
        self, history: Sequence[str], k: int = 10, *, exclude_seen: bool = True
    ) -> list[Recommendation]:
        """The top-k items for one history (oldest first); seen items excluded by default."""
        return self.recommend_batch([history], k, exclude_seen=exclude_seen)[0]

    def recommend_batch(
        self, histories: Sequence[Sequence[str]], k: int = 10, *, exclude_seen: bool = True
    ) -> list[list[Recommendation]]:
        """The top-k items for each history, in one pass of the user tower."""
        snap = self._current()
        if not histories:
            return []
        unknown = sorted({i for h in histories for i in h if i not in snap.positions})
        if unknown:
            raise UnknownItems(unknown)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        length = snap.cfg.history_len
        padded = np.full((len(histories), length), -1, dtype=np.int64)  # left-padded
        for row, history in enumerate(histories):
            recent = [snap.positions[i] for i in history][-length:]
            if recent:
                padded[row, length - len(recent) :] = recent
        with torch.inference_mode():
            hist = torch.from_numpy(padded).to(self.device)
            valid = hist >= 0
            h = snap.vectors[hist.clamp(min=0)] * valid.unsqueeze(-1)  # (B, L, D)
            users = snap.user(h, valid)  # (B, D)
            scores = users @ snap.vectors.T  # (B, N)
            if exclude_seen:
                for row, history in enumerate(histories):
                    seen = [snap.positions[i] for i in history]
                    if seen:
                        scores[row, seen] = -torch.inf
            top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        values, indices = top.values.cpu().numpy(), top.indices.cpu().numpy()
        return [
            [
                Recommendation(snap.item_ids[i], snap.titles[i], float(v))
                for v, i in zip(values[row], indices[row], strict=True)
                if np.isfinite(v)
            ]
            for row in range(len(histories))
        ]

    # --- what is loaded -----------------------------------------------------------------

    def _current(self) -> _Snapshot:
        if self._snapshot is None:
            raise RuntimeError("No model is loaded: call reload(model_dir) first.")
        return self._snapshot

    @property
    def metadata(self) -> dict[str, Any]:
        return self._current().metadata

    @property
    def num_items(self) -> int:
        return len(self._current().item_ids)

    @property
    def num_added(self) -> int:
        """Items added (or replaced) since the catalog, counting those kept on disk."""
        return len(self._added)

    def has_item(self, item_id: str) -> bool:
        return item_id in self._current().positions


def _quantized(model: Recommender) -> Recommender:
    """Dynamic int8 quantization of the Linear layers of the user tower and item head."""
    quantize = torch.ao.quantization.quantize_dynamic
    model.user = quantize(model.user, {nn.Linear}, dtype=torch.qint8)
    if model.items.text:
        items = model.items
        items.adapter = quantize(items.adapter, {nn.Linear}, dtype=torch.qint8)
        items.proj = quantize(nn.Sequential(items.proj), {nn.Linear}, dtype=torch.qint8)[0]
    return model
