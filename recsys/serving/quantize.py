"""The /search query encoder in int8: dynamic quantisation of the text encoder's Linear layers
(weights int8 per tensor, activations quantised per batch at run time; PyTorch's x86 engine).

Only the query side is quantised: the catalog's text vectors were computed in fp32 at training,
so a quantised query lands a little off where the fp32 one would. ``bench/scale_serving.py``
measures the cost (top-10 agreement with fp32 search) and the gain (latency); serving keeps fp32
unless asked (``Predictor(..., int8_search=True)``).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from recsys.model.encoder import TextEncoder


def quantize_encoder(encoder: TextEncoder) -> TextEncoder:
    """An int8 copy of ``encoder`` (the original is left as it is: it may be the model's own)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao's eager quantisation warns of its future removal
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return quantize_dynamic(copy.deepcopy(encoder).eval(), {nn.Linear}, dtype=torch.qint8)


def is_quantized(encoder: nn.Module) -> bool:
    """Whether ``encoder`` runs int8 Linear layers."""
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in encoder.modules())
