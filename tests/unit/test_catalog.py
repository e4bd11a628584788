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


def test_json_lines_manifests_take_int_or_class_name_labels_and_report_bad_lines(tmp_path: Path) -> None:
    images = sorted(DEMO_DATA.rglob("*.jpg"))[:4]
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(f'{{"path": "{p}", "label": "{p.parent.name}"}}\n' for p in images) + "\n")
    table = load_dataset(DatasetDecl("list", listing))
    assert table.classes == tuple(sorted({p.parent.name for p in images}))
    assert [table.display_path(i) for i in range(4)] == [str(p) for p in images]
    listing.write_text('{"path": "a.jpg", "label": 1}\n{"path": "b.jpg"}\n')
    with pytest.raises(ValueError, match="line 2 must be"):
        load_dataset(DatasetDecl("list", listing))
    listing.write_text('{"path": "a.jpg", "label": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        load_dataset(DatasetDecl("list", listing))
    listing.write_text('{"path": "a.jpg", "label": 1}\n{"path": "b.jpg", "label": "cat"}\n')
    with pytest.raises(ValueError, match="not a mix"):
        load_dataset(DatasetDecl("list", listing))


def test_a_flat_folder_takes_its_labels_from_the_file_names(tmp_path: Path) -> None:
    for name in ("cat_1.jpg", "dog_2.jpg", "cat_3.png", "notes.txt", "7.jpg"):
        (tmp_path / name).write_bytes(b"x")
    table = load_dataset(DatasetDecl("flat", tmp_path, label_pattern=r"^([a-z]+)_"))
    assert table.classes == ("cat", "dog") and table.labels.tolist() == [0, 0, 1]
    assert [table.member(i) for i in range(3)] == ["cat_1.jpg", "cat_3.png", "dog_2.jpg"]
    numbers = load_dataset(DatasetDecl("flat", tmp_path, label_pattern=r"_(\d+)\."))
    assert numbers.labels.tolist() == [1, 3, 2] and numbers.classes == ("0", "1", "2", "3")
    with pytest.raises(ValueError, match="needs a group"):
        DatasetDecl("flat", tmp_path, label_pattern=r"^\d").check()


def test_a_listing_plugin_returns_locators_and_labels(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(DEMO_DATA.parent.parent / "tests" / "plugins"))
    table = load_dataset(DatasetDecl("custom", plugin="stoker_test_datasets:list_demo", kwargs={"split": "odd"}))
    assert len(table) == 24 and table.classes == tuple(sorted(p.name for p in DEMO_DATA.iterdir() if p.is_dir()))
    with pytest.raises(ValueError, match="no_such_module"):
        load_dataset(DatasetDecl("custom", plugin="no_such_module:listing"))


def test_a_failed_listing_keeps_the_plugins_traceback_for_status(monkeypatch, tmp_path: Path) -> None:
    from stoker.server.data.catalog import Catalog
    from stoker.server.engine import Engine
    from stoker.server.engine.state import build_status
    from stoker.server.imaging.pipelines import BUILTIN_PIPELINES
    from stoker.server.settings import EngineSettings

    monkeypatch.syspath_prepend(str(DEMO_DATA.parent.parent / "tests" / "plugins"))
    decl = DatasetDecl("custom", plugin="stoker_test_datasets:list_from_a_broken_index", kwargs={"index": "x.db"})
    with pytest.raises(ValueError, match="cannot open the operator's index 'x.db'") as raised:
        load_dataset(decl)
    assert isinstance(raised.value.__cause__, RuntimeError), "the operator's exception stays the cause"
    catalog = Catalog(decls=[decl], index_dir=str(tmp_path))
    assert not catalog.load_declared()
    engine = Engine(EngineSettings(workers=1, bind="tcp://127.0.0.1:0"), catalog, BUILTIN_PIPELINES)
    try:
        (shown,) = build_status(engine).datasets  # built from the parts; the engine need not run
    finally:
        engine.close()
    assert shown.state == "failed" and "x.db" in (shown.error or "")
    assert "stoker_test_datasets.py" in (shown.traceback or "") and "_read_index" in (shown.traceback or "")


def test_the_index_cache_returns_the_same_table_and_notices_a_changed_manifest(tmp_path: Path) -> None:
    from stoker.server.data.index_cache import IndexCache

    images = sorted(DEMO_DATA.rglob("*.jpg"))[:6]
    listing = tmp_path / "list.csv"
    listing.write_text("".join(f"{p},{i % 2}\n" for i, p in enumerate(images)))
    cache = IndexCache(str(tmp_path / "index"))
    first = load_dataset(DatasetDecl("list", listing), cache=cache)
    again = load_dataset(DatasetDecl("list", listing), cache=cache)
    assert getattr(again, "from_cache", False) and not getattr(first, "from_cache", False)
    assert again.fingerprint == first.fingerprint and again.labels.tolist() == first.labels.tolist()
    assert [again.locator(i) for i in range(6)] == [first.locator(i) for i in range(6)]
    listing.write_text("".join(f"{p},{i % 3}\n" for i, p in enumerate(images)))
    changed = load_dataset(DatasetDecl("list", listing), cache=cache)
    assert not getattr(changed, "from_cache", False) and changed.fingerprint != first.fingerprint
