"""Data sources: the registry, each source's required settings, old keys, nested config sections."""

from __future__ import annotations

import inspect
import json

import pytest
from PIL import Image

from captioner.data.datamodule import RENAMED_DATA_KEYS, CaptionDataModule, check_renamed_data_keys
from captioner.data.sources import SOURCES, CocoSource, KarpathySource, ShapesSource
from captioner.data.transforms import Preprocessing

PRE = Preprocessing(16, [0.5] * 3, [0.5] * 3)


def test_registry_lists_the_sources_and_the_data_module_takes_each() -> None:
    assert SOURCES.names() == ["coco", "karpathy", "shapes"]
    params = inspect.signature(CaptionDataModule.__init__).parameters
    for name in SOURCES.names():
        # LightningCLI parses a source's section from the argument of the same name
        assert isinstance(params[name].default, SOURCES.get(name)), name
    assert {SOURCES.get(n) for n in SOURCES.names()} == {ShapesSource, KarpathySource, CocoSource}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dataset": "karpathy"}, "data.karpathy.split_file and data.karpathy.image_root"),
    ({"dataset": "karpathy", "karpathy": {"split_file": "x.json"}}, "data.karpathy.image_root"),
    ({"dataset": "coco"}, "data.coco.annotations and data.coco.image_roots"),
    ({"dataset": "coco", "coco": {"annotations": {"val": "a.json"}, "image_roots": {"train": "."}}},
     "data.coco.image_roots has no folder for split 'val'"),
    ({"shapes": {"ground_relations": True}}, "data.shapes.ground_relations needs data.shapes.grounding"),
    ({"shapes": {"num_imgs": 30}}, r"unknown setting\(s\) in data.shapes: num_imgs \(it takes: data_dir, "),
])
def test_missing_or_unknown_settings_are_named(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        CaptionDataModule(**kwargs)


def test_only_the_selected_source_is_checked() -> None:
    dm = CaptionDataModule(dataset="shapes", coco={"annotations": {"val": "a.json"}})
    assert dm.source == ShapesSource()
    assert dm.sources["coco"] == CocoSource(annotations={"val": "a.json"})


def test_old_keys_name_their_new_place(tmp_path) -> None:
    with pytest.raises(ValueError, match="data.data_dir is now data.shapes.data_dir; "
                                         "data.karpathy_json is now data.karpathy.split_file"):
        check_renamed_data_keys(["data.data_dir", "min_count", "karpathy_json"])
    # every new key exists
    for new in RENAMED_DATA_KEYS.values():
        section, _, key = new.partition(".")
        assert key in inspect.signature(SOURCES.get(section)).parameters, new


def _tiny_karpathy(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    images = []
    for i, (split, colour) in enumerate([("train", "red"), ("train", "blue"), ("restval", "red"),
                                         ("val", "green"), ("test", "blue")]):
        Image.new("RGB", (20, 20), colour).save(root / f"{i}.png")
        images.append({"filename": f"{i}.png", "imgid": i, "split": split, "sentences": [
            {"tokens": ["a", colour, "square"], "raw": f"A {colour} square."},
            {"tokens": ["a", colour, "box"], "raw": f"A {colour} box."}]})
    path = tmp_path / "dataset_tiny.json"
    path.write_text(json.dumps({"dataset": "tiny", "images": images}))
    return path, root


def test_karpathy_source_serves_batches(tmp_path) -> None:
    path, root = _tiny_karpathy(tmp_path)
    dm = CaptionDataModule(dataset="karpathy", karpathy=KarpathySource(str(path), str(root)),
                           min_count=1, batch_size=4, num_workers=0, preprocessing=PRE)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.vocab_path.parent == tmp_path  # beside the split file, named after it
    assert dm.vocab_path.name.startswith("vocab-dataset_tiny-min1-")
    assert dm.vocab_path.is_file()
    assert [r.image_id for r in dm.split_records("train")] == [0, 1, 2]  # restval folded in
    assert [r.image_id for r in dm.split_records("val")] == [3]
    assert "green" not in dm.vocab.to_list()  # the vocabulary is built from training captions only
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (3, 3, 16, 16)
    assert dm.grounding is False and dm.source.grounding_file() is None

    kept = CaptionDataModule(dataset="karpathy", vocab_path=str(dm.vocab_path), preprocessing=PRE,
                             karpathy={"split_file": str(path), "image_root": str(root), "restval_to_train": False})
    assert [r.image_id for r in kept.records["restval"]] == [2]


def test_jsonargparse_parses_nested_sources(tmp_path) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CaptionDataModule, "data")
    cfg = parser.parse_args(["--data.dataset", "karpathy", "--data.karpathy.split_file", "s.json",
                             "--data.karpathy.image_root", "img", "--data.shapes.data_dir", "elsewhere",
                             "--data.coco.annotations", '{"val": "v.json"}'])
    dm = parser.instantiate_classes(cfg).data
    assert dm.source == KarpathySource(split_file="s.json", image_root="img")
    assert dm.sources["shapes"].data_dir == "elsewhere"
    assert dm.sources["coco"].annotations == {"val": "v.json"}
