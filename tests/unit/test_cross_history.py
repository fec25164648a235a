"""A cross-platform history in the model, the loss and the ranking: each item is embedded with its
own platform's table and marked with its platform, only the row's own items count as seen, only
positions whose next item is the row's platform's are trained, and a history of own items gives
exactly what it gave before. Tiny tensors, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.data.feed import collate
from recsys.evaluation.ranking import rank_batches
from recsys.model.history import history_vectors, own_items
from recsys.training.config import LossConfig
from recsys.training.objective import RecommenderObjective
from tests.unit.test_objective import MAX_LEN, SIZES, D, platforms, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Two rows of platform 0 whose histories hold items of platform 1 (ids 1..20), one of platform 1.
HISTORY = torch.tensor([[0, 3, 17, 5, 29],
                        [0, 0, 4, 2, 11],
                        [0, 0, 6, 25, 7]])
HIST_PF = torch.tensor([[0, 0, 1, 0, 0],
                        [0, 0, 1, 1, 0],
                        [1, 1, 0, 0, 1]])
TARGET = torch.tensor([12, 19, 3])
PLATFORM = torch.tensor([0, 0, 1])


def tables(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    return {pid: p.item_table(model) for pid, p in platforms().items()}


def test_each_item_is_embedded_with_its_own_platforms_table() -> None:
    model = tiny_model().eval()
    t = tables(model)
    seq = history_vectors(HISTORY, t[0], PLATFORM[:2].new_tensor([0, 0, 0]), HIST_PF, t)
    for b in range(3):
        for j in range(5):
            i, q = int(HISTORY[b, j]), int(HIST_PF[b, j])
            torch.testing.assert_close(seq[b, j], t[q][i] if i else torch.zeros(D))
    with pytest.raises(KeyError, match="platform id 1"):
        history_vectors(HISTORY, t[0], torch.zeros(3, dtype=torch.long), HIST_PF, {0: t[0]})
    assert own_items(HISTORY, PLATFORM, HIST_PF).tolist() == [[0, 3, 0, 5, 29], [0, 0, 0, 0, 11],
                                                              [0, 0, 0, 0, 7]]


def test_an_own_history_gives_the_same_states_with_or_without_platforms() -> None:
    model = tiny_model().eval()
    t = tables(model)
    own = torch.tensor([[0, 3, 9, 5, 29], [0, 0, 4, 2, 11]])
    pid = torch.tensor([0, 0])
    plain = model.user_states(own, t[0], pid)
    marked = model.user_states(own, t[0], pid, torch.zeros_like(own), t)
    torch.testing.assert_close(plain, marked)
    # items from elsewhere are marked: the same vectors read as platform 1's change the state
    seq = history_vectors(own, t[0], pid)
    elsewhere = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    marked = model.user_tower(seq, own != 0, pid, elsewhere)
    unmarked = model.user_tower(seq, own != 0, pid)
    assert not torch.allclose(marked[0, 2:], unmarked[0, 2:])
    torch.testing.assert_close(marked[0, :2], unmarked[0, :2])  # causal: earlier states equal
    torch.testing.assert_close(marked[1], unmarked[1])


def test_only_the_rows_own_items_count_as_seen() -> None:
    model = tiny_model().eval()
    model.enable_repeat_bias()
    with torch.no_grad():
        model.repeat.weight.fill_(5.0)
    t = tables(model)
    user = torch.randn(2, D)
    hist = torch.tensor([[0, 0, 0, 3, 4], [0, 0, 0, 3, 4]])
    hp = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 1, 1]])
    pid = torch.tensor([0, 0])
    with torch.no_grad():
        base = model.score(torch.zeros_like(hist), pid, t[0], user=user)
        diff = model.score(hist, pid, t[0], user=user, history_platforms=hp) - base
    assert diff[0, 3].item() == pytest.approx(5.0) and diff[0, 4] == 0  # 4 was seen elsewhere
    assert torch.count_nonzero(diff[1, 1:]) == 0


def cross_objective(**loss: float) -> RecommenderObjective:
    return RecommenderObjective(tiny_model(dropout=0.0), LossConfig(num_negatives=8, **loss),
                                platforms())


@pytest.mark.parametrize("kind", ["full_softmax", "sampled_softmax"])
def test_only_positions_whose_next_item_is_the_rows_platforms_are_trained(kind: str) -> None:
    obj = cross_objective(kind=kind)  # type: ignore[arg-type]
    loss, stats = obj(HISTORY, TARGET, PLATFORM, HIST_PF)
    assert torch.isfinite(loss) and loss > 0
    labels_pf = torch.cat([HIST_PF[:, 1:], PLATFORM[:, None]], dim=1)
    expected = int(((HISTORY > 0) & (labels_pf == PLATFORM[:, None])).sum())
    assert stats["positions"] == expected == 7
    loss.backward()
    # the platform embedding of platform 1 learns as a marker in platform 0's rows too
    assert obj.model.user_tower.platform.weight.grad[1].abs().sum() > 0


def test_an_own_history_gives_the_loss_it_gave_before() -> None:
    own = torch.tensor([[0, 3, 9, 5, 29], [0, 0, 4, 2, 11], [0, 0, 6, 19, 7]])
    torch.manual_seed(0)
    before, _ = cross_objective(ctr_weight=0.0)(own, TARGET, PLATFORM)
    torch.manual_seed(0)
    after, _ = cross_objective(ctr_weight=0.0)(own, TARGET, PLATFORM,
                                               PLATFORM[:, None].expand_as(own))
    torch.testing.assert_close(before, after)


def test_a_fixed_cross_platform_batch_can_be_overfit() -> None:
    obj = cross_objective(ctr_weight=0.0)
    opt = torch.optim.Adam(obj.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss, _ = obj(HISTORY, TARGET, PLATFORM, HIST_PF)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.3 * first


def test_collate_maps_each_history_items_platform_and_pads_with_the_rows_own() -> None:
    ids = {"a": 0, "b": 1}
    batch = {"history": np.array([np.array([5, 6, 7]), np.array([9])], dtype=object),
             "history_platform": np.array([np.array(["a", "b", "a"]), np.array(["b"])],
                                          dtype=object),
             "target": np.array([1, 2]), "platform": np.array(["a", "b"], dtype=object)}
    out = collate(batch, max_len=2, platform_ids=ids)
    assert out["history"].tolist() == [[6, 7], [0, 9]]
    assert out["history_platform"].tolist() == [[1, 0], [1, 1]]
    assert out["platform"].tolist() == [0, 1]
    assert "history_platform" not in collate({k: v for k, v in batch.items()
                                              if k != "history_platform"}, 2, ids)
    with pytest.raises(KeyError, match="'c' is not one of the model's platforms"):
        bad = dict(batch, history_platform=np.array([np.array(["a", "c", "a"]),
                                                     np.array(["b"])], dtype=object))
        collate(bad, 3, ids)


def test_ranking_embeds_items_from_elsewhere_with_their_own_table() -> None:
    model = tiny_model().eval()
    pts = platforms()
    t = tables(model)
    batch = {"history": HISTORY, "target": TARGET, "platform": PLATFORM,
             "history_platform": HIST_PF}
    ranks = rank_batches(model, pts, [batch], with_history_excluded=True)
    with torch.no_grad():
        for pid in (0, 1):
            rows = PLATFORM == pid
            user = model.user_vector(HISTORY[rows], t[pid], PLATFORM[rows], HIST_PF[rows], t)
            scores = model.score(HISTORY[rows], PLATFORM[rows], t[pid], user=user,
                                 history_platforms=HIST_PF[rows])
            target_score = scores[torch.arange(int(rows.sum())), TARGET[rows]]
            expected = 1 + (scores[:, 1:] > target_score[:, None]).sum(1)
            assert ranks[pid]["rank"].tolist() == expected.double().tolist()
    assert MAX_LEN >= HISTORY.shape[1] and SIZES[1] >= int(HISTORY[HIST_PF == 1].max())


def test_serving_user_vectors_equal_the_training_path() -> None:
    """Serving embeds each merged history item with its platform's catalog table and runs one
    padded user-tower batch: the same vectors as ``Recommender.user_vector``."""
    from recsys.data.crossplatform import merge_histories
    from recsys.model.history import padded_user_vectors

    model = tiny_model().eval()
    t = tables(model)
    items, names = merge_histories("a", {"a": ([3, 9], [10, 40]), "b": ([5, 2, 7], [5, 20, 50])},
                                   max_len=4)
    ids = {"a": 0, "b": 1}
    hp = [ids[n] for n in names]
    with torch.no_grad():
        seq = torch.stack([t[q][i] for i, q in zip(items, hp)])
        got = padded_user_vectors(model.user_tower, [seq, seq[-2:]], [0, 0], [hp, hp[-2:]])
        want = model.user_vector(torch.tensor([items, [0, 0, *items[-2:]]]), t[0],
                                 torch.tensor([0, 0]), torch.tensor([hp, [0, 0, *hp[-2:]]]), t)
    torch.testing.assert_close(got, want)
    assert hp == [0, 1, 0, 1]  # a 3@10, b 2@20, a 9@40, b 7@50 (b 5@5 cut by max_len)
