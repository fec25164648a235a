"""Full ranking chunk by chunk (issue 24): the same ranks, history-excluded ranks and top k as
scoring the whole catalog at once, whatever the chunk size (ties, repeat bias, cross-platform
histories included). Tiny tensors, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.evaluation.chunked import chunked_ranks
from recsys.evaluation.metrics import rank_of_target
from recsys.evaluation.ranking import rank_batches
from tests.unit.test_objective import SIZES, D, platforms, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def model_with_bias() -> torch.nn.Module:
    model = tiny_model().eval()
    model.enable_repeat_bias()
    with torch.no_grad():
        model.repeat.weight.copy_(torch.tensor([[0.2], [0.4]]))
    return model


def random_batches(seed: int, n: int = 4, size: int = 9) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        platform = torch.randint(0, 2, (size,), generator=gen)
        hp = torch.randint(0, 2, (size, 5), generator=gen)
        top = torch.tensor([SIZES[int(p)] for p in platform])
        hp_top = torch.tensor([[SIZES[int(q)] for q in row] for row in hp])
        history = (torch.rand(size, 5, generator=gen) * hp_top).long() + 1
        history[:, :2] *= torch.rand(size, 2, generator=gen) > 0.5  # left padding
        target = (torch.rand(size, generator=gen) * top).long() + 1
        repeat = torch.rand(size, generator=gen) > 0.6  # the target is a history item
        own_last = history[:, -1].clamp(max=top)
        target = torch.where(repeat, own_last, target)
        hp[:, -1] = torch.where(repeat, platform, hp[:, -1])
        history[:, -1] = torch.where(repeat, own_last, history[:, -1])
        out.append({"history": history, "target": target, "platform": platform,
                    "history_platform": hp})
    return out


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_ranks_equal_whole_catalog_ranks(chunk: int) -> None:
    model = model_with_bias()
    pts = platforms()
    batches = random_batches(0)
    exact = rank_batches(model, pts, batches, with_history_excluded=True, chunk=0)
    chunked = rank_batches(model, pts, batches, with_history_excluded=True, chunk=chunk)
    assert exact.keys() == chunked.keys()
    for pid in exact:
        for key in ("rank", "rank_excl", "target"):
            np.testing.assert_array_equal(chunked[pid][key], exact[pid][key], err_msg=key)
    assert any((e["rank"] != e["rank_excl"]).any() for e in exact.values())  # exclusion matters


def test_ties_count_half_and_the_top_k_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_with_bias()
    table = platforms()[0].item_table(model)                                   # (N+1, D)
    gen = torch.Generator().manual_seed(1)
    user = torch.randn(6, D, generator=gen)
    user[0] = 0.0  # every item scores 0 (+ bias): ties everywhere
    own = torch.tensor([[0, 3, 5], [0, 0, 2], [1, 2, 3], [0, 0, 0], [4, 4, 9], [0, 7, 8]])
    pid = torch.zeros(6, dtype=torch.long)
    targets = torch.tensor([3, 2, 30, 1, 9, 11])
    seen = torch.zeros(6, table.shape[0], dtype=torch.bool).scatter_(1, own, True)
    seen[:, 0] = False
    scores = model.score_items(user, table, seen, pid)
    scores[:, 0] = float("-inf")
    want = rank_of_target(scores, targets)
    want_x = rank_of_target(scores, targets, exclude=own)
    top_s, top_i = torch.topk(scores, 5, dim=1)
    for chunk in (1, 4, 31, 1000):
        got = chunked_ranks(model, user, table, own, pid, targets, exclude_own=True, k=5,
                            chunk=chunk)
        torch.testing.assert_close(got.rank, want)
        torch.testing.assert_close(got.rank_excl, want_x)
        torch.testing.assert_close(got.top_scores, top_s)
        assert got.top[1:].tolist() == top_i[1:].tolist()  # row 0 is all ties: any order
