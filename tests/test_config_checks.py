"""TOML values against type hints, errors naming the field (experiments.config_checks)."""

import pytest

from experiments.config_checks import StudyConfigError, check_keys, check_value, field_path
from surgery.triggers import Trigger


@pytest.mark.parametrize(
    ("value", "hint", "expected"),
    [
        (1, float, 1.0),
        (1, int, 1),
        (True, bool, True),
        ([1, 2.5], tuple[float, ...], [1.0, 2.5]),
        (["a"], tuple[str, ...] | None, ["a"]),
        (3, float | None, 3.0),
        ({"kind": "always"}, Trigger, {"kind": "always"}),
        ({"any": [1]}, dict, {"any": [1]}),
    ],
)
def test_values_that_fit_come_back_in_json_form(value, hint, expected):
    result = check_value("x", value, hint)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(
    ("value", "hint", "message"),
    [
        (True, int, "x: expected an integer, got True"),
        (1.5, int, "x: expected an integer, got 1.5"),
        ("a", tuple[str, ...], "x: expected a list of strings, got 'a'"),
        (["a", 1], tuple[str, ...], "x: item 1: expected a string, got 1"),
        ([1], tuple[int, int], "x: expected 2 items, got 1"),
        ("3", float | None, "x: expected a number, got '3'"),
        (["a"], str | int, "x: expected a string or an integer, got ['a']"),
        ({"kind": "nope"}, Trigger, "x: not a trigger (unknown trigger kind 'nope'"),
    ],
)
def test_values_that_do_not_fit_name_the_field(value, hint, message):
    with pytest.raises(StudyConfigError) as caught:
        check_value("x", value, hint)
    assert str(caught.value).startswith(message) and caught.value.field == "x"


def test_unknown_keys_suggest_the_closest():
    check_keys("model", {"name": 1}, ["name", "dtype"])
    with pytest.raises(StudyConfigError, match=r"^model\.dtpye: unknown key\. Did you mean 'dtype'\? Known keys: dtype, name$"):
        check_keys("model", {"dtpye": 1}, ["name", "dtype"])
    with pytest.raises(StudyConfigError, match=r"^zzz: unknown key\. Known keys: a$"):
        check_keys("", {"zzz": 1}, ["a"])
    assert field_path("", "name") == "name" and field_path("probes", "mi") == "probes.mi"
