"""A dataset listed by the operator's own code: ``plugin = "module:attribute"`` is imported from the
server's environment and called once at start with ``kwargs``; it returns ``(locator, label)`` pairs,
where a locator is a local path or an ``s3://`` URL and a label an integer or a class name."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from stoker.server.data.table import SampleTable, TableBuilder

__all__ = ["list_with_plugin"]

Progress = Callable[[int], None]


def _import(call: str) -> Callable[..., Any]:
    module_name, _, attribute = call.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{call} is a {type(target).__name__}, not a function")
    return target


def list_with_plugin(name: str, call: str, kwargs: dict[str, Any], progress: Progress) -> SampleTable:
    """Run the listing plugin and check what it returns; ``ValueError`` names the dataset and why."""
    where = f"dataset {name!r}: plugin {call}"
    try:
        listing = _import(call)(**kwargs)
    except (ImportError, AttributeError, TypeError) as exc:
        raise ValueError(f"{where}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # the operator's code may fail in any way: say so, with its words
        raise ValueError(f"{where} raised {type(exc).__name__}: {exc}") from exc
    builder = TableBuilder(name, [""])
    try:
        for count, (locator, label) in enumerate(listing, 1):
            if not isinstance(locator, str) or not locator or isinstance(label, bool):
                raise ValueError(f"item {count} ({locator!r}, {label!r}) is not (path or URL, label)")
            if not isinstance(label, (int, str)):
                raise ValueError(f"item {count}: label {label!r} must be an int or a class name")
            builder.add(0, locator, label)
            if count % 100000 == 0:
                progress(count)
        if not len(builder):
            raise ValueError("returned no samples")
        return builder.build()
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    except Exception as exc:  # an iterator of the plugin's own failing half-way
        raise ValueError(f"{where} raised {type(exc).__name__} while listing: {exc}") from exc
