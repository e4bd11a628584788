"""What an operator declares: a dataset's name and where its samples are. The kind follows from the
declaration when it is not given: a ``plugin``, a ``label_pattern`` (a flat folder), a tar shard
pattern, an object-storage URL, a folder (ImageFolder) or a file (a manifest).

Checks that need no listing run at start-up (:meth:`DatasetDecl.check`), so a typo in a path fails
``stoker serve`` at once; the listing itself can take minutes and runs while the server answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from stoker.server.data.targets import BOX_FORMATS, TargetDecl, resolve_targets

__all__ = ["DatasetDecl", "Kind", "KINDS", "IMAGE_EXTENSIONS", "MANIFEST_SUFFIXES"]

Kind = Literal["auto", "image_folder", "file_list", "manifest", "flat", "shards", "plugin", "coco"]
KINDS: tuple[str, ...] = ("auto", "image_folder", "file_list", "manifest", "flat", "shards", "plugin", "coco")
# The same extensions torchvision's ImageFolder accepts, matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".tab", ".jsonl", ".json", ".ndjson", ".txt")
_PLUGIN_CALL = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class DatasetDecl:
    """A declared dataset. ``path`` is a folder, a manifest, a shard pattern or an ``s3://`` URL."""

    name: str
    path: str | Path | None = None
    kind: Kind = "auto"
    root: str | Path | None = None
    """For a manifest: where relative paths are read from (default: the manifest's folder)."""
    label_pattern: str | None = None
    """For a flat folder: a regex on the file name whose group 1 is the label."""
    plugin: str | None = None
    """``module:attribute`` returning ``(locator, label)`` pairs."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    cache: bool = False
    """Keep its decoded images in the decoded-sample cache."""
    cache_min_side: int = 0
    """Its images decode down to this shorter side (0: full size), cached or not."""
    weight: float = 1.0
    """Its jobs' share of worker time among contending jobs (``engine/fairness.py``)."""
    targets: dict[str, str] = field(default_factory=dict)
    """Per-sample fields beyond the label: ``{field: kind or member extension}`` (:mod:`.targets`)."""
    box_format: str = "xyxy"
    """How a ``boxes`` field's boxes are written in the source: ``xyxy``, ``xywh`` or ``cxcywh``."""
    min_box_visibility: float = 0.0
    """A box keeps (with its class) when at least this share of it remains in the output (0: any area)."""
    crowd: bool = False
    """COCO: keep ``iscrowd`` boxes too."""

    def target_decls(self) -> tuple[TargetDecl, ...]:
        """The declared targets, checked (a COCO instances file declares ``boxes`` itself)."""
        declared = dict(self.targets)
        if self.kind == "coco":
            declared.setdefault("boxes", "boxes")
        return resolve_targets(declared)

    @property
    def location(self) -> str:
        """``path`` as text (``~`` expanded for local paths)."""
        text = str(self.path) if self.path is not None else ""
        return text if text.startswith("s3://") else str(Path(text).expanduser()) if text else ""

    @property
    def remote(self) -> bool:
        """Whether the listing lives on object storage."""
        return self.location.startswith("s3://")

    def resolved(self) -> DatasetDecl:
        """The declaration with its kind decided (``auto`` replaced)."""
        if self.kind != "auto":
            return self
        return replace(self, kind=self._guess())

    def _guess(self) -> Kind:
        location = self.location
        if self.plugin is not None:
            return "plugin"
        if self.label_pattern is not None:
            return "flat"
        if "{" in location or location.lower().endswith(".tar"):
            return "shards"
        if self.remote:
            return "image_folder" if location.endswith("/") else "manifest"
        path = Path(location)
        if path.is_file() or (not path.exists() and path.suffix.lower() in MANIFEST_SUFFIXES):
            return "manifest"
        return "image_folder"  # a folder, or a missing path that names none: "not a directory"

    def check(self) -> None:
        """Refuse what is wrong without listing anything; raises ``ValueError`` naming the dataset."""
        decl = self.resolved()
        where = f"dataset {self.name!r}"
        if decl.kind not in KINDS:
            raise ValueError(f"{where}: kind={decl.kind!r} must be one of {KINDS}")
        try:
            decl.target_decls()
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if decl.box_format not in BOX_FORMATS:
            raise ValueError(f"{where}: box_format={decl.box_format!r} must be one of {BOX_FORMATS}")
        if not 0.0 <= decl.min_box_visibility <= 1.0:
            raise ValueError(f"{where}: min_box_visibility={decl.min_box_visibility!r} must be in [0, 1]")
        if decl.targets and decl.kind in ("image_folder", "flat", "file_list", "plugin"):
            raise ValueError(f"{where}: targets come from JSON Lines fields, shard members or COCO, not a {decl.kind}")
        if decl.kind == "plugin":
            if not isinstance(decl.plugin, str) or not _PLUGIN_CALL.match(decl.plugin):
                raise ValueError(f"{where}: plugin={decl.plugin!r} must be 'module:attribute'")
            return
        if not decl.location:
            raise ValueError(f"{where}: needs a path (or a plugin)")
        if decl.label_pattern is not None:
            try:
                pattern = re.compile(decl.label_pattern)
            except re.error as exc:
                raise ValueError(f"{where}: label_pattern {decl.label_pattern!r} is not a regex: {exc}") from None
            if pattern.groups < 1:
                raise ValueError(f"{where}: label_pattern {decl.label_pattern!r} needs a group for the label")
        if decl.remote or decl.kind == "shards":
            return  # checked when listed: a pattern or a URL names nothing on this disk to look at now
        path = Path(decl.location)
        if decl.kind in ("image_folder", "flat") and not path.is_dir():
            raise ValueError(f"{where}: {str(path)!r} is not a directory")
        if decl.kind in ("manifest", "file_list", "coco") and not path.is_file():
            raise ValueError(f"{where}: file list {str(path)!r} does not exist")
