"""Bounds on what a worker decodes, in a module of its own so that the settings (and the command line
that reads them) can name them without loading the decoders."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DecodeLimits"]


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Bounds that keep one hostile or huge file from exhausting a worker."""

    max_file_bytes: int = 256 * 1024 * 1024
    max_image_pixels: int = 1_000_000_000
    """Refuse images declaring more pixels than this, whatever the reduction."""
    max_decoded_pixels: int = 50_000_000
    """Refuse images that, even reduced, would decode to more pixels than this."""
