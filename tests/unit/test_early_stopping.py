"""Early stopping (patience on validation NDCG@10, never before ``min_epochs``) and the
learning-rate decay on a plateau of the same score."""

from __future__ import annotations

from recsys.training.config import OptimConfig
from recsys.training.loop import lr_scale_after, should_stop


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


def run_scales(bad_epochs: list[int], optim: OptimConfig) -> list[float]:
    scale, out = 1.0, []
    for bad in bad_epochs:
        scale = lr_scale_after(scale, bad, optim)
        out.append(scale)
    return out


def test_lr_decays_after_each_patience_run_of_bad_epochs_and_keeps_its_level() -> None:
    optim = OptimConfig(lr_decay=0.5, lr_decay_patience=2)
    # Bad-epoch counts epoch after epoch: 1, 2 (decay), 3, 4 (decay), improved (0), 1, 2 (decay).
    assert run_scales([1, 2, 3, 4, 0, 1, 2], optim) == [1, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125]


def test_constant_lr_by_default() -> None:
    assert run_scales([1, 2, 3, 4, 5, 6], OptimConfig()) == [1.0] * 6


def test_an_epoch_that_trained_nothing_fails_loudly() -> None:
    """DeepSpeed skips steps with non-finite gradients without a word: an epoch whose every
    step was skipped (or whose loss went non-finite) must stop the run, not report a score."""
    import pytest

    from recsys.training.loop import check_epoch

    check_epoch(0, [8.4, 8.3], skipped_steps=1, optimizer_steps=2)  # DeepSpeed doing its job
    check_epoch(0, [], skipped_steps=0, optimizer_steps=0)  # an empty shard is no error
    with pytest.raises(FloatingPointError, match="all 2 optimizer steps were skipped"):
        check_epoch(3, [8.4, 8.4], skipped_steps=2, optimizer_steps=2)
    # With gradient accumulation, 4 micro-batches make 2 updates: both skipped is all of them.
    with pytest.raises(FloatingPointError, match="all 2 optimizer steps were skipped"):
        check_epoch(3, [8.4] * 4, skipped_steps=2, optimizer_steps=2)
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        check_epoch(3, [8.4, float("nan")], skipped_steps=0, optimizer_steps=2)
