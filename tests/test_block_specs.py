"""One block of a study as a TOML table (experiments.block_specs): any registered block works."""

from dataclasses import dataclass

import pytest

from experiments.block_specs import parse_block
from experiments.config_checks import StudyConfigError
from experiments.model_shape import ModelShape
import surgery.blocks
from surgery.blocks import Intervention
from surgery.triggers import Always, OnText, Trigger


@dataclass(frozen=True)
class ScaleSiteConfig:
    site: str = "resid_post.0"
    factor: float = 1.0
    when: Trigger = Always()


class ScaleSite(Intervention):
    """A block experiments.block_specs has never heard of, registered by the fixture below."""

    name = "test_scale_site"
    config_class = ScaleSiteConfig

    def __init__(self, site="resid_post.0", factor=1.0, when=None):
        if factor < 0:
            raise ValueError(f"factor must be >= 0, got {factor}")
        self.config = ScaleSiteConfig(site, factor, when or Always())

    def sites(self):
        return (self.config.site,)

    def edit(self, site, value, step):
        return value * self.config.factor


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """In the registry for this module's tests only (the block contract test runs over the registry)."""
    monkeypatch.setitem(surgery.blocks._REGISTRY, ScaleSite.name, ScaleSite)


SHAPE = ModelShape(n_layers=4, d_model=64, architecture="llama")


def parse(table, shape=SHAPE):
    return parse_block("conditions.c.blocks[0]", table, ".", shape, kind="intervention", model_name="tiny")


def test_a_newly_registered_block_is_read_from_its_config_class():
    spec = parse({"type": "test_scale_site", "site": "blocks.3.hook_out", "factor": 2, "when": {"kind": "text", "text": "\n\n"}})
    assert spec.config == {"site": "blocks.3.hook_out", "factor": 2.0, "when": OnText("\n\n").to_dict()}
    assert spec.to_dict() == {"type": "test_scale_site", "config": spec.config, "from": None, "from_sha256": None,
                              "answers_from": None}


@pytest.mark.parametrize(
    ("table", "field", "words"),
    [
        ({"type": "test_scale_site", "factr": 2.0}, "conditions.c.blocks[0].factr", "Did you mean 'factor'?"),
        ({"type": "test_scale_site", "factor": "2"}, "conditions.c.blocks[0].factor", "expected a number, got '2'"),
        ({"type": "test_scale_site", "factor": -1.0}, "conditions.c.blocks[0]", "refuses these settings: factor must be >= 0"),
        ({"type": "test_scale_site", "site": "blocks.4.hook_out"}, "conditions.c.blocks[0].site", "tiny has 4 blocks"),
        ({"type": "test_scale_site", "site": "blocks.x.hook_out"}, "conditions.c.blocks[0].site", "unknown site"),
        ({"factor": 1.0}, "conditions.c.blocks[0].type", "missing. Registered blocks:"),
        (["test_scale_site"], "conditions.c.blocks[0]", 'expected a table such as { type = "token_mask"'),
    ],
)
def test_a_bad_table_names_the_field(table, field, words):
    with pytest.raises(StudyConfigError) as caught:
        parse(table)
    assert caught.value.field == field and words in str(caught.value)


def test_without_the_model_shape_the_range_waits_for_the_model():
    assert parse({"type": "test_scale_site", "site": "resid_post.40"}, shape=None).config["site"] == "resid_post.40"
