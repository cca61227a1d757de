"""Block configs to JSON and back (surgery.config_json)."""

import json
from dataclasses import dataclass, field

import pytest

from surgery.config_json import config_from_json, config_to_json
from surgery.triggers import Always, InThink, OnText, OnTokens, StepWindow, Trigger


@dataclass(frozen=True)
class Config:
    words: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    penalty: float | None = -3.0
    when: Trigger = field(default_factory=Always)
    name: str = "x"


def test_a_config_survives_json_text():
    config = Config(
        words=("wait", "let me"),
        layers=(3, 5),
        penalty=None,
        when=(OnText("\n\n") | OnTokens(ids=(4, 7))) & ~StepWindow(0, 3) & InThink(),
    )
    data = json.loads(json.dumps(config_to_json(config)))
    again = config_from_json(Config, data)
    assert again == config
    assert isinstance(again.words, tuple) and isinstance(again.layers, tuple)


def test_optional_tuples_stay_none_and_missing_fields_take_defaults():
    assert config_from_json(Config, {"layers": None}) == Config()
    assert config_from_json(Config, {}) == Config()


def test_an_unknown_field_names_the_known_ones():
    with pytest.raises(ValueError, match=r"Config has no field\(s\) \['wrods'\]: expected some of .*'words'"):
        config_from_json(Config, {"wrods": ["wait"]})
