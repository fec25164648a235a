"""Temperature sampling of platforms for pooled training (``optim.platform_temperature``): the
shares, the per-row rates, and the proportions an epoch actually gets. No Ray: the Ray Data
batch function is called on Arrow tables."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pydantic import ValidationError

from recsys.data.feed import platform_rates, platform_shares, sample_platforms
from recsys.data.sequences import EXAMPLES_SCHEMA
from recsys.training.config import OptimConfig

ROWS = {"big": 9000, "mid": 900, "small": 100}


def test_temperature_one_is_proportional_and_uniform_is_flat() -> None:
    prop = platform_shares(ROWS, 1)
    assert prop == pytest.approx({p: n / 10_000 for p, n in ROWS.items()})
    assert platform_shares(ROWS, "uniform") == pytest.approx({p: 1 / 3 for p in ROWS})
    two = platform_shares(ROWS, 2)  # sqrt(n): 94.9, 30, 10
    root = {p: n ** 0.5 for p, n in ROWS.items()}
    assert two == pytest.approx({p: r / sum(root.values()) for p, r in root.items()})
    # higher temperature, flatter: the small platform's share only grows
    shares = [platform_shares(ROWS, t)["small"] for t in (1, 1.5, 2, 5, 50)]
    assert shares == sorted(shares) and shares[-1] < 1 / 3
    assert platform_shares({"a": 5, "empty": 0}, "uniform") == {"a": 1.0, "empty": 0.0}


def test_rates_keep_the_epoch_size() -> None:
    for t in (1, 2, "uniform"):
        rates = platform_rates(ROWS, t)
        assert sum(rates[p] * n for p, n in ROWS.items()) == pytest.approx(sum(ROWS.values()))
    assert platform_rates(ROWS, 1) == pytest.approx({p: 1.0 for p in ROWS})
    assert platform_rates(ROWS, "uniform")["small"] == pytest.approx(10_000 / 3 / 100)


def table(rows: dict[str, int]) -> pa.Table:
    out = []
    for p, n in rows.items():
        out += [{"platform": p, "user_id": f"{p}-u{i}", "split": "train", "history": [1] * (i % 7),
                 "target": 1 + i % 50} for i in range(n)]
    return pa.Table.from_pylist(out, schema=EXAMPLES_SCHEMA)


@pytest.mark.parametrize("temperature", [2, "uniform"])
def test_an_epoch_gets_the_platform_shares(temperature: float | str) -> None:
    data = table(ROWS)
    rates = platform_rates(ROWS, temperature)
    out = sample_platforms(data, rates, seed=0)
    counts = {p: pc.sum(pc.equal(out["platform"], p)).as_py() for p in ROWS}
    shares = platform_shares(ROWS, temperature)
    for p, n in ROWS.items():
        # floor(rate) copies of every row, one more with probability frac(rate): binomial
        frac = rates[p] - int(rates[p])
        sd = np.sqrt(n * frac * (1 - frac))
        assert abs(counts[p] - shares[p] * 10_000) <= 4 * sd + 1, (p, counts, shares)
    total = sum(counts.values())
    assert abs(total - 10_000) < 200  # the epoch keeps its size (in expectation)
    for p, c in counts.items():
        assert c / total == pytest.approx(shares[p], abs=0.01)
    # a repeated small platform keeps every row at least floor(rate) times
    small = out.filter(pc.equal(out["platform"], "small"))["user_id"].to_pylist()
    assert min(small.count(u) for u in set(small)) >= int(rates["small"])
    assert len(set(small)) == ROWS["small"]


def test_the_draw_is_seeded_and_independent_of_batching() -> None:
    data = table(ROWS)
    rates = platform_rates(ROWS, 2)
    whole = sample_platforms(data, rates, seed=3)
    parts = pa.concat_tables([sample_platforms(data.slice(i, 777), rates, seed=3)
                              for i in range(0, data.num_rows, 777)])
    assert parts.to_pylist() == whole.to_pylist()
    other = sample_platforms(data, rates, seed=4)
    assert other["user_id"].to_pylist() != whole["user_id"].to_pylist()


def test_config_accepts_temperatures_from_one_and_uniform() -> None:
    assert OptimConfig().platform_temperature == 1
    assert OptimConfig(platform_temperature="uniform").model_dump(mode="json")[
        "platform_temperature"] == "uniform"
    assert OptimConfig(platform_temperature=2).platform_temperature == 2
    with pytest.raises(ValidationError):
        OptimConfig(platform_temperature=0.5)
    with pytest.raises(ValueError, match="temperature"):
        platform_shares(ROWS, 0.5)
