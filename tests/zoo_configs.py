"""The zoo's model configs for tests that build a variant of a zoo model (another width, vocabulary or length)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qbench.models import zoo

if TYPE_CHECKING:  # transformers is imported when a config is asked for, not when a test module is collected
    from transformers import PretrainedConfig


def zoo_config(name: str, **overrides) -> PretrainedConfig:
    """Zoo model ``name``'s transformers config with ``overrides`` applied, without building its weights.

    A model built on demand gives the config its builder uses (``ZooEntry.config``), so a test follows a change to
    the zoo instead of a copy written out by hand; a shipped model's config is read from its directory. The overrides
    go through the config class's constructor, so its own checks and derived values apply to them."""
    from transformers import AutoConfig

    entry = zoo.ZOO[name]
    config = entry.config() if entry.config is not None else AutoConfig.from_pretrained(entry.build())
    values = config.to_dict()
    values.pop("_name_or_path", None)  # with overrides it is no longer the checkpoint at that path
    return type(config).from_dict({**values, **overrides})
