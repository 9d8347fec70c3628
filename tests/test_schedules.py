import pytest

from faster_diffusion import PAPER_SCHEDULES, key_step_indices, parse_key_steps


def test_paper_schedules_are_the_published_ones():
    assert key_step_indices("paper", 50) == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert key_step_indices("paper", 20) == [0, 1, 2, 3, 5, 10, 15]


@pytest.mark.parametrize(
    "steps, expected",
    [
        (10, [0, 1, 2, 3, 5, 7]),  # 20-step fractions 5/20, 10/20, 15/20, rounded down
        (25, [0, 1, 2, 3, 6, 12, 18]),
        (30, [0, 1, 2, 3, 7, 15, 22]),
        (100, [0, 1, 2, 3, 10, 20, 30, 50, 70]),  # 50-step fractions
        (3, [0, 1, 2]),
        (1, [0]),
    ],
)
def test_paper_rule_for_other_step_counts(steps, expected):
    keys = key_step_indices("paper", steps)
    assert keys == expected
    assert keys[: min(4, steps)] == list(range(min(4, steps)))  # dense early


def test_uniform_all_and_explicit():
    assert key_step_indices("uniform:5", 12) == [0, 5, 10]
    assert key_step_indices("uniform:1", 4) == [0, 1, 2, 3]
    assert key_step_indices("all", 3) == [0, 1, 2]
    assert key_step_indices("0, 2,7", 8) == [0, 2, 7]
    assert key_step_indices([0, 4], 5) == [0, 4]
    assert key_step_indices(" Paper ", 50) == list(PAPER_SCHEDULES[50])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "is not a key-step schedule"),
        ([], "is empty"),
        ("uniform:0", "K must be an integer >= 1"),
        ("uniform:x", "K must be an integer >= 1"),
        ("uniform:-2", "K must be an integer >= 1"),
        ("every other", "is not a key-step schedule"),
        ("0,1,,2", "is not a key-step schedule"),
        ("1,2,3", "must start at 0"),
        ([0, -1], "negative index"),
        ("0,5,2", "strictly increasing"),
        ([0, 0, 1], "strictly increasing"),
        (3, "is not a key-step schedule"),
        ([0, 1.5], "is not a key-step schedule"),
    ],
)
def test_bad_schedules_raise_naming_value_and_form(spec, message):
    with pytest.raises(ValueError, match="key_steps=") as err:
        parse_key_steps(spec)
    assert message in str(err.value)


def test_index_beyond_the_run_raises():
    with pytest.raises(ValueError, match=r"index 50 is out of range for 50 steps \(indices must lie in \[0, 49\]\)"):
        key_step_indices("0,10,50", 50)


def test_bad_step_count_raises():
    with pytest.raises(ValueError, match="num_steps=0"):
        key_step_indices("paper", 0)
