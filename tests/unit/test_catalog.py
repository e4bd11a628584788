"""Datasets: ImageFolder scans match torchvision's indices; file lists parse as declared."""

from __future__ import annotations

from pathlib import Path

import pytest
from torchvision.datasets import ImageFolder

from stoker.server.data.catalog import DatasetDecl, load_dataset
from tests.helpers import DEMO_DATA


def test_image_folder_matches_torchvision_classes_and_order() -> None:
    table = load_dataset(DatasetDecl("demo", DEMO_DATA))
    reference = ImageFolder(str(DEMO_DATA))
    assert list(table.classes) == reference.classes
    assert len(table) == len(reference.samples) == 48
    for i, (path, target) in enumerate(reference.samples):
        assert table.display_path(i) == path
        assert table.labels[i] == target


def test_paths_live_in_numpy_arrays_not_python_lists() -> None:
    table = load_dataset(DatasetDecl("demo", DEMO_DATA))
    assert not any(isinstance(value, list) for value in vars(table).values())


def test_file_list_with_names_and_header(tmp_path: Path) -> None:
    images = sorted(DEMO_DATA.rglob("*.jpg"))[:4]
    listing = tmp_path / "list.tsv"
    listing.write_text("path\tlabel\n" + "".join(f"{p}\t{'cat' if i % 2 else 'dog'}\n" for i, p in enumerate(images)))
    table = load_dataset(DatasetDecl("list", listing, "file_list"))
    assert table.classes == ("cat", "dog")
    assert table.labels.tolist() == [1, 0, 1, 0]
    assert table.display_path(2) == str(images[2])


def test_file_list_with_relative_paths_and_int_labels(tmp_path: Path) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text("fish/a.jpg,2\ntools/b.jpg,0\n")
    table = load_dataset(DatasetDecl("list", listing, "file_list", root=DEMO_DATA))
    assert table.classes == ("0", "1", "2")
    assert table.display_path(0) == str(DEMO_DATA / "fish" / "a.jpg")


@pytest.mark.parametrize(("content", "needle"), [("a.jpg\n", "path,label"), ("a.jpg,-1\n", ">= 0"), ("", "no images")])
def test_bad_file_lists_are_refused(tmp_path: Path, content: str, needle: str) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text(content)
    with pytest.raises(ValueError, match=needle):
        load_dataset(DatasetDecl("list", listing, "file_list"))


def test_missing_dataset_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        load_dataset(DatasetDecl("gone", tmp_path / "nope"))
