"""Early stopping: patience on validation NDCG@10, never before ``min_epochs``."""

from __future__ import annotations

from recsys.training.config import OptimConfig
from recsys.training.loop import should_stop


def test_patience_alone_stops_after_that_many_bad_epochs() -> None:
    optim = OptimConfig(early_stopping_patience=3)
    assert [should_stop(bad, epoch=5, optim=optim) for bad in range(5)] == [
        False, False, False, True, True]


def test_no_stop_before_min_epochs_even_when_patience_ran_out() -> None:
    # A 10%-users scratch run peaked at epoch 0 (text similarity), dipped, and was stopped at
    # epoch 5 while still climbing: min_epochs keeps such a run going.
    optim = OptimConfig(early_stopping_patience=5, min_epochs=10)
    assert not should_stop(bad_epochs=5, epoch=5, optim=optim)
    assert not should_stop(bad_epochs=9, epoch=8, optim=optim)
    assert should_stop(bad_epochs=5, epoch=9, optim=optim)   # the 10th epoch just finished
    assert not should_stop(bad_epochs=4, epoch=20, optim=optim)
