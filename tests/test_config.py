from dataclasses import dataclass, field

import pytest
import yaml
from omegaconf.errors import ValidationError

from lsdc.config import config_to_dict, load_config, save_config


@dataclass
class Optim:
    lr: float = 1e-3
    epochs: int = 2


@dataclass
class Schema:
    name: str = "demo"
    size: int = 64
    optim: Optim = field(default_factory=Optim)


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("size: 128\noptim:\n  lr: 0.01\n")
    cfg = load_config(Schema, path, ["optim.epochs=7", "name=x"])
    assert isinstance(cfg, Schema) and isinstance(cfg.optim, Optim)
    assert (cfg.name, cfg.size, cfg.optim.lr, cfg.optim.epochs) == ("x", 128, 0.01, 7)


def test_wrong_type_or_unknown_key_is_rejected():
    with pytest.raises(ValidationError):
        load_config(Schema, None, ["size=big"])
    with pytest.raises(Exception, match="nope"):
        load_config(Schema, None, ["nope=1"])


def test_save_round_trip(tmp_path):
    cfg = load_config(Schema, None, ["optim.lr=0.5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.5
    assert load_config(Schema, tmp_path / "config.yaml") == cfg
    assert config_to_dict(cfg) == {"name": "demo", "size": 64, "optim": {"lr": 0.5, "epochs": 2}}
