"""Membership inference against an exported recommender: given the model, can an attacker tell
whether a user's history was in its training data? What DP-SGD's epsilon bounds, measured.

Membership is per *user* (DP-SGD's unit): a member is a user whose training rows trained the
model; a non-member is a user of the same platform whose rows did not. The attacks score a user
from what the model does on that user's own training rows (the attacker is assumed to hold the
user's history, the strongest side knowledge the guarantee allows):

* threshold: the user's mean next-item loss (the training objective's softmax cross-entropy,
  every position of every training row) or mean log rank of the next items; members should
  score lower. AUC over all thresholds, so the attacker needs no calibration data.
* calibrated threshold: the same loss minus the mean loss of reference (shadow) models that did
  not train on the user, which removes how hard the user is for any model.
* shadow models: models trained by the attacker the same way on users it owns, with known
  membership; a logistic regression fitted on their members' and non-members' features
  (:data:`FEATURES`) is applied to the target model's features.

Pure functions on exports and Arrow rows (no Ray); the benchmark is ``bench/privacy_attacks.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from recsys.data.feed import collate
from recsys.evaluation.metrics import auc, rank_of_target
from recsys.model.export import Exported
from recsys.model.recommender import mask_padding

FEATURES: tuple[str, ...] = ("mean_loss", "mean_log_rank", "log_positions")
"""Per-user features of the shadow attack (``log_positions``: log of the history length)."""


@dataclass(frozen=True)
class UserFeatures:
    """What a model reveals about each user's training rows, one entry per user (sorted ids)."""

    users: np.ndarray  # (U,) user ids
    mean_loss: np.ndarray  # (U,) mean next-item cross-entropy over the user's positions
    mean_log_rank: np.ndarray  # (U,) mean log of the next item's full-ranking rank
    positions: np.ndarray  # (U,) labelled positions (events that were next-item labels)

    def matrix(self, names: Sequence[str] = FEATURES) -> np.ndarray:
        """(U, F) feature matrix of the shadow attack."""
        cols = {"mean_loss": self.mean_loss, "mean_log_rank": self.mean_log_rank,
                "log_positions": np.log(self.positions.astype(np.float64))}
        return np.stack([cols[n] for n in names], axis=1)

    def select(self, users: Sequence[str] | np.ndarray) -> UserFeatures:
        """The entries of ``users``, in that order (KeyError if a user has no features)."""
        index = {u: i for i, u in enumerate(self.users.tolist())}
        missing = [u for u in users if u not in index]
        if missing:
            raise KeyError(f"{len(missing)} user(s) without features, e.g. {missing[:3]}")
        idx = np.array([index[u] for u in users], dtype=np.int64)
        return UserFeatures(self.users[idx], self.mean_loss[idx], self.mean_log_rank[idx],
                            self.positions[idx])


def assign_roles(user_ids: Sequence[str], shares: Mapping[str, float], seed: int) -> np.ndarray:
    """Each user's role, drawn by a seeded hash of its id: order-independent and disjoint by
    construction (one role per user), the shares in the order given. Shares must sum to 1."""
    if abs(sum(shares.values()) - 1.0) > 1e-9 or min(shares.values()) < 0:
        raise ValueError(f"shares must be >= 0 and sum to 1, got {dict(shares)}")
    names = list(shares)
    edges = np.cumsum([shares[n] for n in names])
    edges[-1] = 1.0 + 1e-12
    out = np.empty(len(user_ids), dtype=object)
    for i, u in enumerate(user_ids):
        h = hashlib.blake2b(f"{seed}:{u}".encode(), digest_size=8).digest()
        x = int.from_bytes(h, "little") / 2**64
        out[i] = names[int(np.searchsorted(edges, x, side="right"))]
    return out


@torch.inference_mode()
def position_scores(exported: Exported, rows: pa.Table, platform: str, temperature: float,
                    batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per labelled position of ``rows`` (one platform's training rows): the loss the model was
    trained on (full-catalog softmax of ``score / temperature``, the repeat bias on the items
    seen so far, as ``RecommenderObjective``'s ``full_softmax``), the label's rank, and the
    row's user id. Own-platform histories only (as DP-SGD's per-user step)."""
    if "history_platform" in rows.column_names:
        raise ValueError("cross-platform histories are not supported by the membership attack")
    model = exported.model.eval()
    pid = exported.items[platform].platform_id
    table = exported.item_table(platform)  # (N+1, D)
    max_len = exported.model.config["max_len"]
    losses, ranks, users = [], [], []
    user_col = rows["user_id"].to_numpy(zero_copy_only=False)
    for i in range(0, rows.num_rows, batch_size):
        b = collate({k: rows[k].to_numpy(zero_copy_only=False)[i:i + batch_size]
                     for k in ("history", "target", "platform")}, max_len, {platform: pid})
        hist, tgt = b["history"], b["target"]  # (B, T), (B,)
        labels = torch.cat([hist[:, 1:], tgt[:, None]], dim=1)  # (B, T)
        valid = hist > 0  # (B, T)
        states = model.user_states(hist, table, b["platform"])  # (B, T, D)
        seen = torch.zeros(*hist.shape, table.shape[0], dtype=torch.int32)
        seen = seen.scatter(2, hist[..., None], 1).cumsum(1) > 0  # (B, T, N+1)
        seen[..., 0] = False
        y = labels[valid]  # (P,)
        pids = torch.full((len(y),), pid, dtype=torch.long)
        logits = mask_padding(model.score_items(states[valid], table, seen[valid], pids)
                              ) / temperature  # (P, N+1)
        losses.append(F.cross_entropy(logits, y, reduction="none").double().numpy())
        ranks.append(rank_of_target(logits, y).numpy())
        row = torch.arange(len(hist))[:, None].expand_as(hist)[valid].numpy()
        users.append(user_col[i:i + batch_size][row])
    if not losses:
        empty = np.zeros(0)
        return empty, empty, np.zeros(0, dtype=object)
    return np.concatenate(losses), np.concatenate(ranks), np.concatenate(users)


def user_features(exported: Exported, rows: pa.Table, platform: str, temperature: float,
                  batch_size: int = 64) -> UserFeatures:
    """Per-user attack features of ``exported`` on ``rows`` (all of each user's training
    rows of ``platform``; other platforms' rows are ignored)."""
    rows = rows.filter(pc.equal(rows["platform"], platform))
    loss, rank, users = position_scores(exported, rows, platform, temperature, batch_size)
    ids, inverse, counts = np.unique(users.astype(str), return_inverse=True, return_counts=True)

    def mean(v: np.ndarray) -> np.ndarray:  # per user, over that user's positions
        return np.bincount(inverse, weights=v, minlength=len(ids)) / counts

    return UserFeatures(ids.astype(object), mean(loss), mean(np.log(rank)), counts)


# --------------------------------------------------------------------------- scoring attacks


def membership_labels(members: Collection[str], nonmembers: Collection[str]) -> tuple[
        np.ndarray, np.ndarray]:
    """(users, labels): members (1) then non-members (0); refuses a user in both."""
    both = set(members) & set(nonmembers)
    if both:
        raise ValueError(f"{len(both)} user(s) are both member and non-member, e.g. "
                         f"{sorted(both)[:3]}")
    users = np.array(list(members) + list(nonmembers), dtype=object)
    return users, np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]


def threshold_scores(f: UserFeatures, feature: str = "mean_loss") -> np.ndarray:
    """Membership score of the threshold attack: the lower the loss (or rank), the likelier."""
    return -np.asarray(getattr(f, feature), dtype=np.float64)


def calibrated_scores(target: UserFeatures, references: Sequence[UserFeatures]) -> np.ndarray:
    """Reference loss minus target loss, per user of ``target`` (references: models that did
    not train on these users, e.g. shadow models; their features must cover the same users)."""
    if not references:
        raise ValueError("calibration needs at least one reference model")
    ref = np.mean([r.select(target.users).mean_loss for r in references], axis=0)
    return ref - target.mean_loss


@dataclass(frozen=True)
class AttackResult:
    """An attack's AUC with a bootstrap interval over users, and its true-positive rate where
    it wrongly accuses few non-members (the low-false-positive regime that matters)."""

    auc: float
    ci: tuple[float, float]
    tpr_at_1pct_fpr: float
    members: int
    nonmembers: int

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {"auc": self.auc, "ci": list(self.ci), "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
                "members": self.members, "nonmembers": self.nonmembers}


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float = 0.01) -> float:
    """Share of members scored above the threshold that flags ``fpr`` of the non-members."""
    y = np.asarray(labels, bool)
    threshold = np.quantile(scores[~y], 1.0 - fpr)
    return float((scores[y] > threshold).mean())


def evaluate_attack(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000,
                    seed: int = 0, alpha: float = 0.05) -> AttackResult:
    """AUC of ``scores`` for ``labels`` (member = 1) with a percentile bootstrap interval that
    resamples members and non-members (users) with replacement, each group at its size."""
    y = np.asarray(labels, bool)
    s = np.asarray(scores, np.float64)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        raise ValueError(f"need members and non-members, got {len(pos)} and {len(neg)}")
    rng = np.random.default_rng(seed)
    lab = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    boots = [auc(lab, np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
             for _ in range(n_boot)]
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return AttackResult(auc(y, s), (float(low), float(high)), tpr_at_fpr(y, s),
                        int(len(pos)), int(len(neg)))


def auc_tolerance(members: int, nonmembers: int, z: float = 4.0) -> float:
    """``z`` standard errors of the AUC of a score independent of membership (Mann-Whitney's
    null variance, ties ignored): how far from 0.5 chance alone moves it at this sample size."""
    return z * float(np.sqrt((members + nonmembers + 1) / (12.0 * members * nonmembers)))


# --------------------------------------------------------------------------- shadow attack


@dataclass(frozen=True)
class AttackModel:
    """Logistic regression on standardised :data:`FEATURES` (fitted on shadow models)."""

    features: tuple[str, ...]
    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    weights: np.ndarray  # (F,)
    bias: float

    def scores(self, f: UserFeatures) -> np.ndarray:
        """Membership logit of each user of ``f``."""
        x = (f.matrix(self.features) - self.mean) / self.scale
        return x @ self.weights + self.bias

    def as_dict(self) -> dict[str, object]:
        return {"features": list(self.features), "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "weights": self.weights.tolist(),
                "bias": self.bias}


def shadow_training_set(shadows: Sequence[tuple[UserFeatures, Collection[str]]],
                        features: Sequence[str] = FEATURES) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) over all shadow models: each shadow's features of the users it was scored on
    (its pool), labelled by whether the user was in that shadow's training set. Every shadow
    needs both members and non-members in its pool."""
    xs, ys = [], []
    for k, (f, members) in enumerate(shadows):
        y = np.isin(f.users, np.asarray(list(members), dtype=object))
        if y.all() or not y.any():
            raise ValueError(f"shadow {k}: its pool needs members and non-members, got "
                             f"{int(y.sum())} of {len(y)} members")
        xs.append(f.matrix(features))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def fit_attack(x: np.ndarray, y: np.ndarray, features: Sequence[str] = FEATURES,
               l2: float = 1e-3, iterations: int = 50) -> AttackModel:
    """Logistic regression by Newton's method (a few features, thousands of users: exact and
    fast, no extra dependency), on features standardised by their shadow mean and spread."""
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = np.c_[(x - mean) / scale, np.ones(len(x))]  # (n, F+1)
    t = np.asarray(y, np.float64)
    w = np.zeros(z.shape[1])
    reg = l2 * np.eye(len(w))
    reg[-1, -1] = 0.0  # the bias is not shrunk
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (p - t) / len(t) + reg @ w
        hess = (z * (p * (1 - p))[:, None]).T @ z / len(t) + reg
        step = np.linalg.solve(hess + 1e-9 * np.eye(len(w)), grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return AttackModel(tuple(features), mean, scale, w[:-1], float(w[-1]))
