"""Datasets declared by the operator: the catalog, how each source is listed into a sample table, and
where a sample's bytes are (locators, object stores). Nothing here knows about pipelines or images:
``imaging`` reads what ``data`` locates, never the other way round."""

from stoker.server.data.catalog import Catalog

__all__ = ["Catalog"]
