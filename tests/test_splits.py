import pytest

from iqa_ray.data.splits import assign_group_splits, validate_fractions


def test_every_group_assigned_once_and_each_split_non_empty():
    groups = [f"photo{i}" for i in range(19)]
    split = assign_group_splits(groups * 3, (0.6, 0.2, 0.2), seed=0)
    assert set(split) == set(groups)
    counts = {s: sum(1 for v in split.values() if v == s) for s in ("train", "val", "test")}
    assert counts == {"train": 11, "val": 4, "test": 4}


def test_split_is_deterministic_and_independent_of_input_order():
    groups = [f"g{i}" for i in range(10)]
    a = assign_group_splits(groups, seed=3)
    b = assign_group_splits(list(reversed(groups)), seed=3)
    assert a == b
    assert a != assign_group_splits(groups, seed=4)


def test_three_groups_fill_three_splits_even_with_skewed_fractions():
    split = assign_group_splits(["a", "b", "c"], (0.9, 0.05, 0.05), seed=0)
    assert sorted(split.values()) == ["test", "train", "val"]


@pytest.mark.parametrize("bad", [(0.5, 0.5), (0.5, 0.3, 0.3), (1.2, -0.1, -0.1), (float("nan"), 0.5, 0.5)])
def test_bad_fractions_are_rejected(bad):
    with pytest.raises(ValueError, match="fractions"):
        validate_fractions(bad)


def test_empty_groups_rejected():
    with pytest.raises(ValueError, match="empty"):
        assign_group_splits([])


def test_strata_are_split_separately_so_every_split_gets_each_kind():
    grey = [f"grey{i}" for i in range(9)]
    colour = [f"colour{i}" for i in range(10)]
    strata = {g: "grey" for g in grey} | {c: "colour" for c in colour}
    split = assign_group_splits(strata, (0.6, 0.2, 0.2), seed=0, strata=strata)
    for kind in (grey, colour):
        got = sorted(split[g] for g in kind)
        assert got.count("val") == 2 and got.count("test") == 2
    assert split == assign_group_splits(list(strata), (0.6, 0.2, 0.2), seed=0, strata=strata)
