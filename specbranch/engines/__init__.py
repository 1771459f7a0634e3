"""Decoding engines, selectable by name."""

from .ar import AREngine
from .base import Engine, GenerationResult, generate
from .sd import SDEngine
from .specbranch import PearlEngine, SpecBranchEngine

ENGINE_CLASSES: dict[str, type[Engine]] = {
    "ar": AREngine,
    "sd": SDEngine,
    "pearl": PearlEngine,
    "specbranch": SpecBranchEngine,
}

__all__ = ["AREngine", "ENGINE_CLASSES", "Engine", "GenerationResult", "PearlEngine", "SDEngine",
           "SpecBranchEngine", "generate"]
