"""Data sources: one typed config per kind of data set, registered by name.

``data.dataset`` names a source; its section of the config (``data.shapes``, ``data.karpathy``,
``data.coco``) holds that source's settings. Everything that differs between data sets lives on
the source class (reading records per split, preparing the files, where the vocabulary is cached,
word-region grounding), so the data module and the evaluation never branch on the name.

A new source is a frozen dataclass decorated with ``@register_source("name")``, plus a
``CaptionDataModule`` argument of the same name (LightningCLI builds its parser from that signature).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from captioner.data.records import ImageRecord
from captioner.registry import Registry
from captioner.settings import PositiveInt, check_fields

logger = logging.getLogger(__name__)

SOURCES: Registry[DataSource] = Registry("data.dataset")


def register_source(name: str):
    """Register a source class under ``name``, the value of ``data.dataset`` that selects it."""

    def deco(cls: type[DataSource]) -> type[DataSource]:
        cls.name = name  # for messages that name the config section
        return SOURCES.register(name)(cls)

    return deco


@dataclass(frozen=True)
class DataSource:
    """What the data module needs from a data set. Subclasses are frozen dataclasses of settings:
    frozen, because the default instance in ``CaptionDataModule``'s signature is shared. The base
    is a dataclass too, not an ``ABC``: jsonargparse parses only pure dataclasses as nested
    settings (``--data.shapes.data_dir``) rather than as ``class_path``/``init_args``."""

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self, f"data.{self.name}")

    def check(self) -> None:
        """Raise ``ValueError`` naming the setting when a required one is missing. Only the
        selected source is checked: the others' sections keep their defaults."""

    def prepare(self) -> None:
        """Make the files exist (rank 0 only, from ``prepare_data``); most sources just read."""

    def read(self) -> dict[str, list[ImageRecord]]:
        """The records of every split, in the files' order."""
        raise NotImplementedError

    def vocab_dir(self) -> Path:
        """Where the vocabulary is cached unless ``data.vocab_path`` says otherwise."""
        raise NotImplementedError

    def training_captions(self) -> dict:
        """Where the training captions are read from, by content: ``file`` (its name), ``sha256``
        (of its bytes) and the settings that change which captions train. Part of the
        vocabulary cache's key, so two data sets in one folder get a vocabulary each."""
        raise NotImplementedError

    def recorded_tokenizer(self) -> tuple[str, str] | None:
        """(tokenizer name, file) when the source's file records how its captions were split
        into words (``data convert`` writes it); None: they are Karpathy's ``simple`` words."""
        return None

    @property
    def grounded_training(self) -> bool:
        """Training batches carry word-region grounding (only ``shapes`` can)."""
        return False

    def grounding_file(self) -> Path | None:
        """The word-region alignments used to score attention maps, if the source has them."""
        return None

    def attach_grounding(self, records: Sequence[ImageRecord]) -> None:
        """Copy each word's object and the objects' masks onto ``records`` (in place)."""
        raise ValueError(f"word-region grounding was asked for, but data.dataset {self.name!r} has "
                         "none: only the shapes source provides it (data.shapes.grounding)")


@register_source("shapes")
@dataclass(frozen=True)
class ShapesSource(DataSource):
    """The synthetic ``shapes`` set (``captioner.data.shapes``), generated in ``data_dir`` when absent.

    ``num_images``, ``image_size``, ``seed``, ``compositional``: how it is generated (see
    ``ShapesConfig``); they do nothing once ``data_dir`` holds a data set.
    ``grounding``: training batches carry, per word, the object it names and the objects' masks,
    for ``model.loss.attention_supervision``. ``ground_relations``: with ``grounding``, relation
    keywords (left/right/above/below) are grounded too, in the object the relation is about.
    """

    data_dir: str = "data/shapes"
    num_images: PositiveInt = 4000
    image_size: PositiveInt = 64
    seed: int = 0
    compositional: bool = False
    grounding: bool = False
    ground_relations: bool = False

    @property
    def root(self) -> Path:
        return Path(self.data_dir)

    def check(self) -> None:
        if self.ground_relations and not self.grounding:
            raise ValueError("data.shapes.ground_relations needs data.shapes.grounding: true")

    def prepare(self) -> None:
        if (self.root / "dataset.json").exists():
            return
        from captioner.data.shapes import ShapesConfig, generate_shapes

        config = ShapesConfig(num_images=self.num_images, image_size=self.image_size, seed=self.seed,
                              compositional=self.compositional)
        logger.warning("shapes data set not found at %s: generating it (%s)", self.root, config)
        generate_shapes(self.root, config)

    def read(self) -> dict[str, list[ImageRecord]]:
        from captioner.data.karpathy import read_karpathy

        return read_karpathy(self.root / "dataset.json", self.root / "images")

    def vocab_dir(self) -> Path:
        return self.root

    def training_captions(self) -> dict:
        return _file_identity(self.root / "dataset.json")

    @property
    def grounded_training(self) -> bool:
        return self.grounding

    def grounding_file(self) -> Path:
        return self.root / "grounding.json"

    def attach_grounding(self, records: Sequence[ImageRecord]) -> None:
        from captioner.data.grounding import attach_shapes_grounding
        from captioner.data.shapes import load_grounding

        attach_shapes_grounding(records, load_grounding(self.root), relations=self.ground_relations)


@register_source("karpathy")
@dataclass(frozen=True)
class KarpathySource(DataSource):
    """A Karpathy split file (COCO, Flickr8k, Flickr30k ``dataset_*.json``) and its images.

    ``image_root``: COCO's folder holds ``train2014/`` and ``val2014/``; Flickr's the images
    themselves. ``restval_to_train``: fold COCO's ``restval`` into train (the usual setup).
    """

    split_file: str | None = None
    image_root: str | None = None
    restval_to_train: bool = True

    def check(self) -> None:
        if not (self.split_file and self.image_root):
            raise ValueError("data.dataset 'karpathy' needs data.karpathy.split_file and "
                             "data.karpathy.image_root")

    def read(self) -> dict[str, list[ImageRecord]]:
        from captioner.data.karpathy import read_karpathy

        self._need_split_file()
        return read_karpathy(self.split_file, self.image_root, restval_to_train=self.restval_to_train)

    def vocab_dir(self) -> Path:
        return Path(self.split_file).parent

    def training_captions(self) -> dict:
        self._need_split_file()
        return {**_file_identity(self.split_file), "restval_to_train": self.restval_to_train}

    def recorded_tokenizer(self) -> tuple[str, str] | None:
        from captioner.data.karpathy import recorded_tokenizer

        self._need_split_file()
        name = recorded_tokenizer(self.split_file)
        return None if name is None else (name, self.split_file)

    def _need_split_file(self) -> None:
        if not Path(self.split_file).is_file():
            raise FileNotFoundError(f"data.karpathy.split_file: {self.split_file} not found "
                                    "(see docs/data.md for where to get it)")


@register_source("coco")
@dataclass(frozen=True)
class CocoSource(DataSource):
    """COCO caption annotation files, one per split, e.g.
    ``annotations: {train: .../captions_train2014.json}``, ``image_roots: {train: .../train2014}``."""

    annotations: dict[str, str] | None = None
    image_roots: dict[str, str] | None = None

    def check(self) -> None:
        if not (self.annotations and self.image_roots):
            raise ValueError("data.dataset 'coco' needs data.coco.annotations and data.coco.image_roots")
        for split in self.annotations:
            if split not in self.image_roots:
                raise ValueError(f"data.coco.image_roots has no folder for split {split!r}")

    def read(self) -> dict[str, list[ImageRecord]]:
        from captioner.data.coco import read_coco_annotations

        for split, ann in self.annotations.items():
            if not Path(ann).is_file():
                raise FileNotFoundError(f"data.coco.annotations.{split}: {ann} not found")
        return {split: read_coco_annotations(ann, self.image_roots[split], split=split)
                for split, ann in self.annotations.items()}

    def vocab_dir(self) -> Path:
        return Path(next(iter(self.annotations.values()))).parent

    def training_captions(self) -> dict:
        split = "train" if "train" in self.annotations else next(iter(self.annotations))
        if not Path(self.annotations[split]).is_file():
            raise FileNotFoundError(f"data.coco.annotations.{split}: {self.annotations[split]} not found")
        return _file_identity(self.annotations[split])


def _file_identity(path: str | Path) -> dict:
    from captioner.data.fingerprint import sha256_file

    return {"file": Path(path).name, "sha256": sha256_file(path)}


def as_source(name: str, value: DataSource | Mapping[str, Any] | None) -> DataSource:
    """The ``name`` source from its config section: an instance, a plain mapping (Python callers,
    YAML read by hand) or None (defaults). Raises ``ValueError`` naming unknown keys."""
    cls = SOURCES.get(name)
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"data.{name} must be a {cls.__name__} or a mapping, got {type(value).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = [k for k in value if k not in known]
    if unknown:
        raise ValueError(f"unknown setting(s) in data.{name}: {', '.join(map(str, unknown))} "
                         f"(it takes: {', '.join(known)})")
    return cls(**value)

