import pytest

from rematc import BudgetTooSmall, Rockmate, parse_budget
from tests.models import ZOO, build


@pytest.mark.parametrize(
    "given, expected",
    [(1024, 1024), ("512MiB", 512 * 2**20), ("3GB", 3 * 10**9), ("1.5GiB", int(1.5 * 2**30)), ("100 kB", 100_000), ("7", 7)],
)
def test_parse_bytes(given, expected):
    assert parse_budget(given).bytes == expected


def test_parse_fraction():
    assert parse_budget(0.25).fraction == 0.25
    assert parse_budget(1.0).resolve(1000) == 1000
    assert parse_budget(0.5).resolve(1001) == 500


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", 0.0, 1.5, -3, float("nan"), None, [1], True])
def test_unparsable_budget_names_accepted_forms(bad):
    with pytest.raises(ValueError, match=r"budget must be .*'512MiB'.*fraction"):
        parse_budget(bad)


def test_rockmate_rejects_bad_budget_before_capture():
    entry = ZOO["mlp"]
    with pytest.raises(ValueError, match="budget must be"):
        Rockmate(build(entry), entry.make_batch(0)[0], "half")


def test_budget_too_small_names_the_minimum():
    entry = ZOO["mlp"]
    args, loss_args = entry.make_batch(0)
    with pytest.raises(BudgetTooSmall) as info:
        Rockmate(build(entry), args, 1000, loss_fn=entry.loss_fn, loss_args=loss_args)
    err = info.value
    assert err.budget_bytes == 1000
    assert err.min_budget_bytes > 1000
    assert str(err.min_budget_bytes) in str(err)
    # The named minimum is feasible.
    rm = Rockmate(build(entry), args, err.min_budget_bytes, loss_fn=entry.loss_fn, loss_args=loss_args)
    assert rm.predicted_peak_bytes <= err.min_budget_bytes
