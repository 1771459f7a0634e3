"""Decoding engines, selectable by name."""

from .ar import AREngine
from .base import Engine, GenerationResult, generate

ENGINE_CLASSES: dict[str, type[Engine]] = {"ar": AREngine}

__all__ = ["AREngine", "ENGINE_CLASSES", "Engine", "GenerationResult", "generate"]
