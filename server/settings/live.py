"""The live settings as HTTP shapes, generated from the settings model's fields marked live: the body of
``GET /config`` (and the ``config`` block of ``/status``) and of ``PATCH /config``, with the same types,
ranges and descriptions as the settings themselves."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from stoker.server.settings.model import ServerSettings

__all__ = ["LiveConfig", "ConfigPatch", "patch_model"]


def _constrained(info: FieldInfo) -> Any:
    """The field's type with its range constraints (``ge``, ``le``...) attached."""
    return Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation


def _live_model(name: str, doc: str, optional: bool, **overrides: Any) -> type[BaseModel]:
    # Built from the settings model's live fields: a field marked live there is readable and
    # patchable here and shown in /status, with the same type, range and description.
    fields: dict[str, Any] = {}
    for field, info in ServerSettings.model_fields.items():
        if field not in ServerSettings.live_fields:
            continue
        kind = overrides.get(field, _constrained(info))
        if optional:
            fields[field] = (kind | None, Field(None, description=info.description))
        else:
            fields[field] = (kind, Field(description=info.description))
    config = ConfigDict(extra="forbid") if optional else None
    return create_model(name, __doc__=doc, __config__=config, **fields)


LiveConfig = _live_model("LiveConfig", "Settings that can change while serving, without dropping clients.", False)


def patch_model(max_workers: int) -> type[BaseModel]:
    """The ``PATCH /config`` body: live fields, all optional; ``workers`` capped at this server's
    ``max_workers`` (the cap shows in the OpenAPI schema)."""
    workers = Annotated[int, Field(ge=1, le=max_workers)]
    return _live_model(
        "ConfigPatch", "A change to the live settings; fields left out stay as they are.", True, workers=workers
    )


ConfigPatch = patch_model(1024)
