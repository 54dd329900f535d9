"""The held-out split of a record set (SFT examples, preference pairs): seeded, at least one record each side."""

import pytest

from lmforge.data.split import holdout_split
from lmforge.errors import LmforgeError


@pytest.mark.parametrize("n, fraction, held", [(48, 0.05, 2), (20, 0.05, 1), (19, 0.05, 1), (10, 0.3, 3),
                                               (2, 0.05, 1), (1, 0.5, 0), (30, 0.0, 0), (5, 0.99, 4)])
def test_sizes(n, fraction, held):
    train, val = holdout_split(list(range(n)), fraction, seed=7)
    assert len(val) == held and len(train) == n - held
    assert sorted(train + val) == list(range(n)) and train == sorted(train) and val == sorted(val)


def test_seeded_and_checked():
    records = [f"r{i}" for i in range(40)]
    assert holdout_split(records, 0.1, 1) == holdout_split(records, 0.1, 1)
    assert holdout_split(records, 0.1, 1)[1] != holdout_split(records, 0.1, 2)[1]
    for bad in (-0.1, 1.0):
        with pytest.raises(LmforgeError, match="--val-fraction"):
            holdout_split(records, bad, 1)
