"""What crosses the wire between a client and the server, and the check of it.

A client's update is a state-dict delta serialized with safetensors: a JSON header of tensor
names, dtypes and shapes, then raw little-endian numbers. Nothing else can ride along (no
pickle, no metadata: :func:`serialize` writes none and :func:`inspect_payload` refuses any).

Which parameters are sent (:func:`shared_names`): every tower and head parameter of the
frozen-encoder model. Tensors with one row per platform (:data:`PLATFORM_ROWS`: the adapter's
platform gate, the user tower's platform embedding, the repeat bias) are sent as the client's
own row only, shape ``(1, ...)``: the server knows which platform a client is and writes that
row alone. Per-item id vectors and the text encoder are never part of a federated model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

PLATFORM_ROWS = ("item_tower.adapter.platform_gate.weight", "user_tower.platform.weight",
                 "repeat.weight")
"""Parameters indexed by platform id: a client sends (and changes) its own row only."""
NEVER_SENT = ("text_encoder.", "item_tower.item_id.")
"""Prefixes of parameters that are not federated (the config refuses models that have them)."""
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


def shared_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the parameters a federated round updates, in state-dict order."""
    return [k for k in state if not k.startswith(NEVER_SENT)]


def sent_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Shape of each tensor a client may send (platform-row tensors: one row)."""
    return {k: ((1, *state[k].shape[1:]) if k in PLATFORM_ROWS else tuple(state[k].shape))
            for k in shared_names(state)}


def own_rows(delta: Mapping[str, torch.Tensor], platform_id: int) -> dict[str, torch.Tensor]:
    """A full-shape delta cut to what a client sends: its own row of platform-row tensors."""
    return {k: (v[platform_id:platform_id + 1] if k in PLATFORM_ROWS else v).contiguous()
            for k, v in delta.items()}


def densify(update: Mapping[str, torch.Tensor], platform_id: int,
            like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The server's view of a client update at full shape (zero rows for other platforms)."""
    out = {}
    for k, v in update.items():
        if k in PLATFORM_ROWS:
            full = torch.zeros_like(like[k])
            full[platform_id] = v[0]
            out[k] = full
        else:
            out[k] = v
    return out


def serialize(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of float32 CPU tensors, with no metadata."""
    return st_save({k: v.detach().to("cpu", torch.float32).contiguous()
                    for k, v in tensors.items()})


def deserialize(payload: bytes) -> dict[str, torch.Tensor]:
    return dict(st_load(payload))


def payload_header(payload: bytes) -> dict[str, object]:
    """The safetensors JSON header: tensor name -> {dtype, shape, data_offsets}."""
    (n,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8:8 + n])


def inspect_payload(payload: bytes, allowed: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Problems with what a client sent (empty: only allowed float tensors, nothing else).

    Walks the serialized bytes, not the Python object the client meant to send: every header
    entry must be an allowed parameter name with a float dtype and the allowed shape; no
    metadata block; the data section must be exactly those tensors' bytes (no trailing data).
    """
    problems = []
    try:
        header = payload_header(payload)
    except (struct.error, ValueError) as e:
        return [f"not a safetensors payload: {e}"]
    (n,) = struct.unpack("<Q", payload[:8])
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            problems.append(f"metadata block {entry!r} (only tensors may be sent)")
            continue
        if not isinstance(entry, dict):
            problems.append(f"{name!r}: not a tensor entry")
            continue
        if name not in allowed:
            problems.append(f"{name!r} is not a shared parameter")
        elif tuple(entry.get("shape", ())) != tuple(allowed[name]):
            problems.append(f"{name!r}: shape {entry.get('shape')} != {list(allowed[name])}")
        if entry.get("dtype") not in FLOAT_DTYPES:
            problems.append(f"{name!r}: dtype {entry.get('dtype')} (ids would be integers)")
        end = max(end, int(entry.get("data_offsets", [0, 0])[1]))
    if len(payload) != 8 + n + end:
        problems.append(f"{len(payload) - 8 - n - end} bytes beyond the declared tensors")
    return problems
