"""The trainable zoo models and how each is trained: glm-tiny's recipe (qbench.models.train) and glm4-moe-tiny's
(qbench.models.train_moe), for ``qbench zoo train NAME``."""

from __future__ import annotations

from qbench.models import train_moe
from qbench.models.train import Recipe, TrainConfig

TRAINED = ("glm-tiny", "glm4-moe-tiny")  # the names recipe() knows


def recipe(name: str) -> tuple[type[TrainConfig], Recipe]:
    """The config class (its defaults make the shipped model) and the recipe of trainable zoo model ``name``."""
    if name == Recipe.name:
        return TrainConfig, Recipe()
    if name == train_moe.MoeRecipe.name:
        return train_moe.MoeTrainConfig, train_moe.MoeRecipe()
    raise KeyError(name)
