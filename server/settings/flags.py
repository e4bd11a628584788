"""``stoker serve`` flags generated from the settings' fields: ``max_prefetch`` becomes
``--max-prefetch``, with the field's type, choices, description and default, so a new setting gets
its flag by being declared once."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, SecretStr
from pydantic.fields import FieldInfo

__all__ = ["add_setting_flags", "given_settings"]

_DEST_PREFIX = "setting_"


def _scalar(annotation: Any) -> Any:
    """The non-None member of ``X | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return members[0] if len(members) == 1 else str
    return annotation


def _flag_options(info: FieldInfo) -> dict[str, Any]:
    annotation = _scalar(info.annotation)
    options: dict[str, Any] = {}
    if annotation is bool:
        options.update(action="store_const", const=True)  # a switch: absent leaves the setting as it is
    elif typing.get_origin(annotation) is list:
        options["action"] = "append"  # repeatable: --cache a --cache b
    elif typing.get_origin(annotation) is Literal:
        options["choices"] = list(typing.get_args(annotation))
    elif annotation is ByteSize:
        pass  # text such as 8GiB: the model parses the units
    elif annotation in (int, float):
        options["type"] = annotation
    elif annotation not in (str, SecretStr):
        raise TypeError(f"no command-line form for a setting of type {annotation!r}")
    help_text = info.description or ""
    if info.default_factory is None and info.default is not None and annotation is not bool:
        help_text += f" (default {info.default})"
    options["help"] = help_text
    return options


def add_setting_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: set[str]) -> None:
    """Add one flag per scalar field of ``model`` (fields in ``skip`` excluded)."""
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        options = _flag_options(info)
        if "choices" not in options and options.get("action") in (None, "append"):
            options["metavar"] = str((info.json_schema_extra or {}).get("metavar", name.upper()))  # type: ignore[union-attr]
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        # A field may name its flag where the field name reads badly as one (curve_secret_key_file).
        flag = str(extra.get("flag") or f"--{name.replace('_', '-')}")
        parser.add_argument(flag, dest=_DEST_PREFIX + name, **options)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, by field name (flags left out are absent)."""
    return {
        dest[len(_DEST_PREFIX) :]: value
        for dest, value in vars(args).items()
        if dest.startswith(_DEST_PREFIX) and value is not None
    }
