"""What runs inside a worker: read, decode, plan the geometry, render a sample into its batch row."""

from stoker.server.imaging.pipelines import BUILTIN_PIPELINES, Pipeline

__all__ = ["Pipeline", "BUILTIN_PIPELINES"]
