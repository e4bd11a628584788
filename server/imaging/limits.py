"""Bounds on what a worker decodes, in a module of its own so that the settings (and the command line
that reads them) can name them without loading the decoders."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DecodeLimits"]


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Bounds that keep one hostile or huge file from exhausting a worker (from the settings
    ``max_file_mb``, ``max_image_pixels`` and ``max_decoded_pixels``, where their defaults are declared)."""

    max_file_bytes: int
    max_image_pixels: int
    """Refuse images declaring more pixels than this, whatever the reduction."""
    max_decoded_pixels: int
    """Refuse images that, even reduced, would decode to more pixels than this."""
