"""Datasets declared by the operator (the catalog) and the jobs opened on them."""

from stoker.server.data.catalog import Catalog
from stoker.server.data.jobs import JobRegistry, OpenJob

__all__ = ["Catalog", "JobRegistry", "OpenJob"]
