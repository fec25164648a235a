"""Membership inference (``recsys.evaluation.membership``): a memorising model is caught (AUC near
1), a model that ignores membership is not (AUC within chance's spread at the sample size), the
shadow attack learns from the right users' labels, no user is both member and non-member, and
the per-user loss is the model's own scoring path."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from recsys.data.examples import ExampleSet, read_split
from recsys.data.feed import collate
from recsys.data.sequences import EXAMPLES_SCHEMA
from recsys.evaluation import membership as mi
from recsys.model.export import Exported
from tests.unit.test_eval_export import setup  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
N_ITEMS = 1000


def features(users: list[str], loss: np.ndarray, rng: np.random.Generator) -> mi.UserFeatures:
    """Synthetic features: rank tracks the loss, history lengths 1-20."""
    return mi.UserFeatures(np.array(users, dtype=object), loss,
                           loss - math.log(N_ITEMS) + 6 + rng.normal(0, .1, len(users)),
                           rng.integers(1, 21, len(users)))


def population(n_in: int, n_out: int, gap: float, seed: int) -> tuple[mi.UserFeatures, set[str]]:
    """Members' losses are ``gap`` lower on average (gap = 0: membership is invisible)."""
    rng = np.random.default_rng(seed)
    users = [f"s{seed}-u{i}" for i in range(n_in + n_out)]
    loss = rng.normal(math.log(N_ITEMS), 1.0, n_in + n_out)
    loss[:n_in] -= gap
    return features(users, loss, rng), set(users[:n_in])


def test_memorising_model_is_caught() -> None:
    f, members = population(500, 500, gap=6.0, seed=0)  # members' loss near 0: memorised
    users, labels = mi.membership_labels(sorted(members), sorted(set(f.users) - members))
    res = mi.evaluate_attack(labels, mi.threshold_scores(f.select(users)), n_boot=200)
    assert res.auc > 0.99 and res.ci[0] > 0.98
    assert res.tpr_at_1pct_fpr > 0.9
    assert res.members == res.nonmembers == 500


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_model_blind_to_membership_gives_chance(seed: int) -> None:
    f, members = population(2000, 1000, gap=0.0, seed=seed)
    users, labels = mi.membership_labels(sorted(members), sorted(set(f.users) - members))
    g = f.select(users)
    tol = mi.auc_tolerance(2000, 1000)  # 4 standard errors of a null AUC: ~0.045
    assert 0.03 < tol < 0.06
    for scores in (mi.threshold_scores(g), mi.threshold_scores(g, "mean_log_rank")):
        res = mi.evaluate_attack(labels, scores, n_boot=200, seed=seed)
        assert abs(res.auc - 0.5) < tol
        assert res.ci[0] < res.auc < res.ci[1]


def test_shadow_training_set_labels_each_shadows_own_members() -> None:
    f0, in0 = population(30, 20, gap=1.0, seed=4)
    f1, in1 = population(10, 40, gap=1.0, seed=5)
    x, y = mi.shadow_training_set([(f0, in0), (f1, in1)])
    assert x.shape == (100, len(mi.FEATURES)) and y.sum() == 40
    # Rows follow each shadow's pool in order; labels are that shadow's membership only.
    expected = [u in in0 for u in f0.users] + [u in in1 for u in f1.users]
    assert y.tolist() == expected
    np.testing.assert_allclose(x[:50, 0], f0.mean_loss)
    # A user that one shadow trained on is labelled by *that* shadow: shadow 1 does not
    # see shadow 0's members as its own.
    assert not np.isin(f1.users, list(in0)).any()
    with pytest.raises(ValueError, match="members and non-members"):
        mi.shadow_training_set([(f0, set(f0.users))])


def test_shadow_attack_transfers_to_the_target() -> None:
    shadows = [population(400, 400, gap=1.5, seed=s) for s in (6, 7)]
    attack = mi.fit_attack(*mi.shadow_training_set(shadows))
    assert attack.weights[0] < 0  # a lower loss means a member
    target, members = population(300, 300, gap=1.5, seed=8)
    users, labels = mi.membership_labels(sorted(members), sorted(set(target.users) - members))
    res = mi.evaluate_attack(labels, attack.scores(target.select(users)), n_boot=200)
    assert res.auc > 0.8
    blind, members = population(300, 300, gap=0.0, seed=9)
    users, labels = mi.membership_labels(sorted(members), sorted(set(blind.users) - members))
    res = mi.evaluate_attack(labels, attack.scores(blind.select(users)), n_boot=200)
    assert abs(res.auc - 0.5) < mi.auc_tolerance(300, 300)


def test_calibration_removes_user_difficulty() -> None:
    rng = np.random.default_rng(10)
    users = [f"u{i}" for i in range(600)]
    hard = rng.normal(math.log(N_ITEMS), 2.0, 600)  # per-user difficulty, larger than the gap
    member = np.arange(600) < 300
    target = features(users, hard - 0.5 * member + rng.normal(0, .1, 600), rng)
    refs = [features(users, hard + rng.normal(0, .1, 600), rng) for _ in range(2)]
    plain = mi.evaluate_attack(member, mi.threshold_scores(target), n_boot=50).auc
    calibrated = mi.evaluate_attack(member, mi.calibrated_scores(target, refs), n_boot=50).auc
    assert calibrated > 0.95 > plain


def test_roles_are_seeded_disjoint_and_order_free() -> None:
    users = [f"user-{i}" for i in range(4000)]
    shares = {"target_in": 0.4, "target_out": 0.2, "shadow": 0.4}
    roles = mi.assign_roles(users, shares, seed=22)
    again = dict(zip(users[::-1], mi.assign_roles(users[::-1], shares, seed=22), strict=True))
    assert [again[u] for u in users] == roles.tolist()
    for name, share in shares.items():
        assert abs((roles == name).mean() - share) < 0.03
    assert (mi.assign_roles(users, shares, seed=23) != roles).any()
    members = [u for u, r in zip(users, roles, strict=True) if r == "target_in"]
    out = [u for u, r in zip(users, roles, strict=True) if r == "target_out"]
    ids, labels = mi.membership_labels(members, out)
    assert len(set(ids)) == len(ids) and labels.sum() == len(members)
    with pytest.raises(ValueError, match="both member and non-member"):
        mi.membership_labels(members, out + members[:1])
    with pytest.raises(ValueError, match="sum to 1"):
        mi.assign_roles(users, {"a": 0.5, "b": 0.4}, seed=0)


def test_user_features_use_the_models_scoring_path(
        setup: tuple[Exported, ExampleSet]) -> None:  # noqa: F811
    exported, es = setup
    temperature = 0.07
    # One position per row: the loss is the softmax of ``model.score`` at the target.
    rows = pa.Table.from_pylist(
        [{"platform": "shop_a", "user_id": u, "split": "train", "history": h, "target": t}
         for u, h, t in [("a", [3], 4), ("a", [7], 9), ("b", [1], 2), ("c", [5], 5)]]
        + [{"platform": "shop_b", "user_id": "a", "split": "train", "history": [1],
            "target": 2}], schema=EXAMPLES_SCHEMA)
    f = mi.user_features(exported, rows, "shop_a", temperature, batch_size=2)
    assert f.users.tolist() == ["a", "b", "c"] and f.positions.tolist() == [2, 1, 1]
    b = collate({k: rows[k].to_numpy(zero_copy_only=False)[:4]
                 for k in ("history", "target", "platform")}, 8, {"shop_a": 0})
    with torch.inference_mode():
        scores = exported.model.eval().score(b["history"], b["platform"],
                                             exported.item_table("shop_a"))
    ce = F.cross_entropy(scores / temperature, b["target"], reduction="none").double().numpy()
    np.testing.assert_allclose(f.mean_loss, [(ce[0] + ce[1]) / 2, ce[2], ce[3]], rtol=1e-5)
    # On the bundled example set: every user's every labelled position, nothing else.
    train = read_split(es, "train")
    g = mi.user_features(exported, train, "shop_a", temperature)
    assert sorted(g.positions.tolist()) == [4, 6]
    assert np.all(g.mean_log_rank >= 0) and np.all(g.mean_log_rank <= math.log(30))
