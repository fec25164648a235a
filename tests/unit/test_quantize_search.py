"""The int8 query encoder of /search (issue 24): its Linear layers run int8, the original encoder
is left in fp32, and its query vectors stay close to the fp32 ones (tiny random BERT, no
download; agreement on the demo catalog is measured by ``bench/scale_serving.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys.serving.quantize import is_quantized, quantize_encoder
from tests.unit.test_objective import tiny_bert_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_quantised_encoder_is_int8_and_close_to_fp32() -> None:
    encoder = tiny_bert_encoder().eval()
    int8 = quantize_encoder(encoder)
    assert is_quantized(int8) and not is_quantized(encoder)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (32, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[::2, 7:] = 0
    with torch.inference_mode():
        want, got = encoder(ids, mask), int8(ids, mask)
    assert got.shape == want.shape and got.dtype == torch.float32
    cosine = F.cosine_similarity(got, want, dim=-1)
    assert float(cosine.min()) > 0.98, cosine
    # nearest neighbours among the 32 texts mostly agree
    top_fp32 = (F.normalize(want, dim=-1) @ F.normalize(want, dim=-1).T).topk(5).indices
    top_int8 = (F.normalize(got, dim=-1) @ F.normalize(want, dim=-1).T).topk(5).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_fp32, top_int8))
    assert overlap / top_fp32.numel() >= 0.8
