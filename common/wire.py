"""The trainable state on the wire: global weights down, each client's update up.

The server keeps the global model in float32 and sends the weights; a client replies with its
update (its weights minus what it received). The server adds the decoded update to its own
float32 weights, so rounding never accumulates: only the update is rounded, once.

`wire-dtype` chooses the formats (down / up):

- "float32": float32 / float32;
- "half": float16 / bfloat16. Weights sit well inside float16's normal range, where its 11-bit
  mantissa is the more precise; updates can be far smaller (1e-6 and below), where float16
  turns subnormal (coarse, and slow to convert) while bfloat16 keeps float32's range;
- "int8": float16 / 8-bit integers per row with the row's scale, stochastically rounded (so
  the decoded update is unbiased): each tensor travels as int8 of shape (rows, columns + 2),
  the last two bytes of a row holding its bfloat16 scale. A row is a tensor's first axis (a
  vector is one row): one item's id embedding, one output unit of a linear layer.
- "int8-down": 8-bit integer weights / bfloat16 updates. A training message's weights are
  rounded to the nearest of 255 levels per row (deterministic: every client of a round trains
  from the same point); each tensor travels as int8 codes in its own shape beside
  `<name>#scale`, its rows' bfloat16 scales. The rounding error sits in the weights a client
  trains from, not in what the server adds up: the update (trained minus received) is a
  gradient step taken there, and the server adds it to its float32 weights. Evaluation
  messages carry float16 weights, so a client evaluates the model as it is.

Flower's arrays have no bfloat16, so its bits travel as integers and are reinterpreted on
arrival (scales byte by byte, low byte first, whatever the machine's byte order).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import ArrayRecord

FLOAT16_MAX = float(torch.finfo(torch.float16).max)
# numpy dtype of each tensor on the wire: (weights down, update up)
SENT_AS = {
    "half": ("float16", "int16"),
    "int8": ("float16", "int8"),
    "int8-down": ("int8", "int16"),
    "float32": ("float32",) * 2,
}
LEVELS = 127  # int8 codes run from -LEVELS to LEVELS
SCALE_SUFFIX = "#scale"  # int8 weights: "<name>#scale" holds the rows' bfloat16 scales


def _record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, v.contiguous()) for k, v in tensors.items()))


def encode_weights(state: dict[str, np.ndarray], dtype: str, *, train: bool = True) -> ArrayRecord:
    """Global weights as sent to clients; int8 only in a training message (`train`)."""
    down = SENT_AS[dtype][0]
    if down == "int8" and not train:
        down = "float16"
    out = OrderedDict()
    for name, value in state.items():
        tensor = torch.from_numpy(np.asarray(value, dtype=np.float32))
        if down == "int8":
            rows = _int8_rows(tensor, None, nearest=True)  # (R, C + 2)
            out[name] = rows[:, :-2].reshape(tensor.shape)
            out[name + SCALE_SUFFIX] = rows[:, -2:].reshape(-1).clone().view(torch.int16)
            continue
        if down == "float16":
            if tensor.abs().max() > FLOAT16_MAX:
                raise ValueError(
                    f"Tensor {name!r} holds values beyond float16's range ({FLOAT16_MAX:g}); "
                    "set wire-dtype = 'float32'."
                )
            tensor = tensor.half()
        out[name] = tensor
    return _record(out)


def decode_weights(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """Weights as a client received them, in float32."""
    out = OrderedDict()
    for name, array in record.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        value = array.numpy()
        if value.dtype == np.int8:
            scales = record[name + SCALE_SUFFIX].numpy().view(np.int8).reshape(-1, 2)
            rows = np.concatenate([value.reshape(len(scales), -1), scales], axis=1)
            value = _from_int8_rows(rows).reshape(value.shape)
        out[name] = value.astype(np.float32, copy=False)
    return out


def encode_update(
    trained: dict[str, np.ndarray],
    received: dict[str, np.ndarray],
    dtype: str,
    *,
    generator: torch.Generator | None = None,
) -> ArrayRecord:
    """A client's update: its trained weights minus the weights it received (`generator`
    drives int8's stochastic rounding)."""
    out = OrderedDict()
    for name, value in trained.items():
        delta = torch.from_numpy(np.asarray(value - received[name], dtype=np.float32))
        if SENT_AS[dtype][1] == "int16":
            delta = delta.bfloat16().view(torch.int16)
        elif SENT_AS[dtype][1] == "int8":
            delta = _int8_rows(delta, generator)
        out[name] = delta
    return _record(out)


def update_shape(shape: tuple[int, ...], dtype: str) -> tuple[int, ...]:
    """The shape a tensor of `shape` has in an update on the wire."""
    if SENT_AS[dtype][1] != "int8":
        return tuple(shape)
    rows = shape[0] if len(shape) > 1 else 1
    return (rows, int(np.prod(shape)) // max(rows, 1) + 2)


def decode_update(record: ArrayRecord, shapes: dict[str, tuple[int, ...]]) -> OrderedDict:
    """A client's update in float32, whichever wire dtype carried it; `shapes` are the
    tensors' own shapes (int8 rows are reshaped to them)."""
    return decode_update_values({name: a.numpy() for name, a in record.items()}, shapes)


def decode_update_values(
    values: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]
) -> OrderedDict:
    """decode_update of the wire arrays already taken out of their record."""
    out = OrderedDict()
    for name, value in values.items():
        if value.dtype == np.int16:  # bfloat16 bits
            value = torch.from_numpy(value).view(torch.bfloat16).float().numpy()
        elif value.dtype == np.int8:
            value = _from_int8_rows(value).reshape(shapes[name])
        out[name] = value.astype(np.float32, copy=False)
    return out


def _int8_rows(
    delta: torch.Tensor, generator: torch.Generator | None, *, nearest: bool = False
) -> torch.Tensor:
    """(rows, columns) int8 codes + 2 bytes of bfloat16 scale per row: (rows, columns + 2),
    rounded stochastically (unbiased) or to the `nearest` level."""
    rows = delta.reshape(delta.shape[0] if delta.dim() > 1 else 1, -1)  # (R, C)
    # the scale as bfloat16 will store it, rounded up so no code needs more than LEVELS
    scale = (rows.abs().amax(1, keepdim=True) * (1 + 2**-7)).bfloat16()
    scaled = rows / scale.float().clamp(min=torch.finfo(torch.float32).tiny) * LEVELS
    if nearest:
        codes = scaled.round()
    else:  # up with probability the fraction: unbiased
        low = scaled.floor()
        codes = low + (torch.rand(scaled.shape, generator=generator) < (scaled - low))
    codes = codes.clamp(-LEVELS, LEVELS).to(torch.int8)
    bits = scale.view(torch.int16).to(torch.int32) & 0xFFFF  # (R, 1) as an unsigned 16-bit
    scale_bytes = torch.cat([bits & 0xFF, bits >> 8], dim=1).to(torch.uint8).view(torch.int8)
    return torch.cat([codes, scale_bytes], dim=1)


def _from_int8_rows(value: np.ndarray) -> np.ndarray:
    codes, scale_bytes = value[:, :-2], value[:, -2:].view(np.uint8).astype(np.int32)
    bits = (scale_bytes[:, 0] | (scale_bytes[:, 1] << 8)).astype(np.uint16).view(np.int16)
    scale = torch.from_numpy(bits.copy()).view(torch.bfloat16).float().numpy()  # (R,)
    return codes.astype(np.float32) * (scale[:, None] / LEVELS)
