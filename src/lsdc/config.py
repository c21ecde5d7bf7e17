"""One config style for every stage: a dataclass schema, optionally a YAML file, then dotted
command-line overrides (`train.epochs=3 model.backbone=resnet18`), validated by OmegaConf."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf

from lsdc.fileio import atomic_write_text

C = TypeVar("C")


def load_config(
    schema: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> C:
    """Resolve a config: schema defaults <- YAML file <- dotted overrides; typed and checked."""
    cfg = OmegaConf.structured(schema)
    if path is not None:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(Path(path)))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-able dict of a config dataclass."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) so a run folder is self-describing."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError("save_config expects a config dataclass instance")
    return atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
