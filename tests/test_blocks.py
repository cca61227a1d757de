"""The block registry and protocol helpers."""

import json
from dataclasses import dataclass

import pytest
import torch

from interventions import ResidualAdd
from probes import RecordSite
from surgery.blocks import Intervention, Probe, block_class, register_block, registered_blocks
from surgery.triggers import OnTokens


def test_registry_knows_the_shipped_blocks():
    blocks = registered_blocks()
    assert blocks["residual_add"] is ResidualAdd and blocks["record_site"] is RecordSite
    assert list(blocks) == sorted(blocks)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(KeyError, match="Did you mean 'residual_add'"):
        block_class("residual_ad")


def test_register_validates_names_and_classes():
    with pytest.raises(ValueError, match="lower_snake_case"):
        register_block("Bad-Name")
    with pytest.raises(TypeError, match="Intervention or Probe subclass"):
        register_block("not_a_block")(int)

    @dataclass(frozen=True)
    class Config:
        site: str = "logits"

    class Other(Probe):
        config = Config()

    with pytest.raises(ValueError, match="already taken"):
        register_block("residual_add")(Other)


def test_configs_serialise_to_json():
    for block in (ResidualAdd(torch.ones(3), site="resid_pre.1", when=~OnTokens("x")), RecordSite("logits")):
        data = json.loads(json.dumps(block.to_dict()))
        assert data["block"] == block.name
        assert isinstance(block, (Intervention, Probe))
