"""Tile positions along one image axis, shared by crop.py (tiles on disk) and inference.py (tiled
prediction). No torch here."""
from __future__ import annotations


def tile_origins(size: int, width: int, step: int) -> list[int]:
    """Tile starts along an axis of length `size`: 0, step, 2*step, ... while below size - width,
    then one tile flush with the far end (size - width), never a duplicate of the last regular one.

    A size at most `width` gives [0] (that single tile is padded or cropped by the caller).
    step > width leaves gaps between the regular tiles. width or step below 1: ValueError.
    """
    if width < 1 or step < 1:
        raise ValueError(f"width {width} and step {step} must be at least 1")
    if size <= width:
        return [0]
    return [*range(0, size - width, step), size - width]
