"""The LightningDataModule: any data source, from a YAML config, to padded caption batches."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from captioner.data.fingerprint import differences, sha256_json
from captioner.data.images import ImageLoadError, load_image
from captioner.data.records import ImageRecord
from captioner.data.sampling import EpochSampler
from captioner.data.sources import SOURCES, CocoSource, KarpathySource, ShapesSource, as_source
from captioner.data.tokenizers import TOKENIZERS, get_tokenizer, lost_letters_warning
from captioner.data.transforms import Preprocessing
from captioner.data.vocab import PAD_ID, Vocabulary
from captioner.settings import NonNegativeInt, PositiveInt, check_arguments

logger = logging.getLogger(__name__)

# Keys (relative to ``data.``) that moved into a source's section when the sources became a
# registry; the CLI and ``check_renamed_data_keys`` answer the old spelling with the new one.
RENAMED_DATA_KEYS = {
    "data_dir": "shapes.data_dir",
    "shapes_num_images": "shapes.num_images",
    "shapes_image_size": "shapes.image_size",
    "shapes_seed": "shapes.seed",
    "shapes_compositional": "shapes.compositional",
    "grounding": "shapes.grounding",
    "ground_relations": "shapes.ground_relations",
    "karpathy_json": "karpathy.split_file",
    "image_root": "karpathy.image_root",
    "restval_to_train": "karpathy.restval_to_train",
    "coco_annotations": "coco.annotations",
    "coco_image_roots": "coco.image_roots",
}


def check_renamed_data_keys(keys: Iterable[str]) -> None:
    """Raise ``ValueError`` for settings under their old names, e.g. "data.shapes_num_images is
    now data.shapes.num_images" (keys may carry the ``data.`` prefix or not)."""
    old = [k.removeprefix("data.") for k in keys if k.removeprefix("data.") in RENAMED_DATA_KEYS]
    if old:
        raise ValueError("; ".join(f"data.{k} is now data.{RENAMED_DATA_KEYS[k]}" for k in old))


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux: MemAvailable; else all of it)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class CaptionDataset(Dataset):
    """Images (or cached features) with one caption each.

    ``mode="random"``: one item per image, a reference drawn afresh each time (so each epoch sees a
    different one; deterministic under ``seed_everything(workers=True)``). ``mode="all"``: one item
    per (image, caption). ``mode="first"``: one item per image with its first reference (evaluation).

    ``grounding=True`` (records that carry ``grounding``, i.e. ``shapes``) adds ``token_objects``
    (T,): for each target step (the caption's words, then ``<end>``) the index of the object the
    word names or -1; and ``object_masks`` (K, H, W) bool, the image's objects.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        vocab: Vocabulary,
        preprocessing: Preprocessing | None,
        mode: str = "random",
        max_caption_length: int | None = 20,
        skip_bad_images: bool = False,
        features=None,
        seed: int = 0,
        grounding: bool = False,
        images: Sequence[Tensor | None] | None = None,
    ) -> None:
        if mode not in ("random", "all", "first"):
            raise ValueError(f"caption mode must be 'random', 'all' or 'first', got {mode!r}")
        self.records = list(records)
        self.vocab = vocab
        self.preprocessing = preprocessing
        self.mode = mode
        self.max_caption_length = max_caption_length
        self.skip_bad_images = skip_bad_images
        self.features = features  # a FeatureStore-like object: .item(image_id) -> {"features": (N, D), ...}
        self.seed = seed
        self.grounding = grounding
        # data.in_memory: each record's preprocessed image (None: unreadable, skipped), read once
        self.images = images
        self._masks: dict[int, Tensor] = {}
        if grounding:
            missing = [r for r in self.records if r.grounding is None]
            if missing:
                raise ValueError(
                    f"word-region grounding requested but {len(missing)} image(s) have none, e.g. "
                    f"{missing[0].path}: only the shapes data set provides it (grounding.json)")
        if mode == "all":
            self.items = [(i, j) for i, r in enumerate(self.records) for j in range(len(r.captions))]
        else:
            self.items = [(i, 0) for i in range(len(self.records))]

    def __len__(self) -> int:
        return len(self.items)

    def _grounding_item(self, i: int, caption: int, steps: int) -> dict[str, Tensor]:
        grounding = self.records[i].grounding
        objects = grounding["token_objects"][caption][:steps - 1]  # the words kept; <end> names none
        token_objects = torch.full((steps,), -1, dtype=torch.long)
        token_objects[: len(objects)] = torch.tensor(objects, dtype=torch.long)
        masks = self._masks.get(i)
        if masks is None:  # drawn once per image (and worker): 3 objects cost ~0.2 ms to rasterise
            from captioner.data.shapes import object_mask

            size = grounding["image_size"]
            masks = torch.from_numpy(np.stack([object_mask(o, size) for o in grounding["objects"]]))
            self._masks[i] = masks  # (K, H, W) bool
        return {"token_objects": token_objects, "object_masks": masks}

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        i, j = self.items[index]
        rec = self.records[i]
        if self.mode == "random" and len(rec.captions) > 1:
            # a function of (seed, epoch, image) only: the same whatever the workers or ranks
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
            j = int(torch.randint(len(rec.captions), (1,), generator=g))
        caption = torch.tensor(self.vocab.encode(rec.captions[j], self.max_caption_length), dtype=torch.long)
        item = {"caption": caption, "image_id": rec.image_id, "index": i}
        if self.grounding:
            item.update(self._grounding_item(i, j, len(caption) - 1))
        if self.features is not None:
            item.update(self.features.item(rec.image_id))
            return item
        if self.images is not None:
            if self.images[i] is None:
                return None
            item["image"] = self.images[i]
            return item
        try:
            image = self.preprocessing.load(rec.path) if self.preprocessing else load_image(rec.path)
        except ImageLoadError as err:
            if self.skip_bad_images:
                logger.warning("skipping %s", err)
                return None
            raise ImageLoadError(
                rec.path, f"{err.reason} (run `captioner data check` first, or set "
                "`data.skip_bad_images: true` to skip such files)"
            ) from err
        item["image"] = image
        return item


def collate_captions(items: list[dict | None]) -> dict[str, Tensor]:
    """Stack images/features; pad captions with ``<pad>``; drop items that could not be read."""
    items = [it for it in items if it is not None]
    if not items:
        return {}
    caps = [it["caption"] for it in items]
    lengths = torch.tensor([len(c) for c in caps], dtype=torch.long)
    padded = torch.full((len(caps), int(lengths.max())), PAD_ID, dtype=torch.long)
    for k, c in enumerate(caps):
        padded[k, : len(c)] = c
    batch = {
        "captions": padded,  # (B, L)
        "lengths": lengths,  # (B,)
        "image_ids": torch.tensor([it["image_id"] for it in items], dtype=torch.long),
        "indices": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }
    if "token_objects" in items[0]:
        objs = torch.full((len(items), int(lengths.max()) - 1), -1, dtype=torch.long)
        k_max = max(it["object_masks"].size(0) for it in items)
        masks = torch.zeros((len(items), k_max, *items[0]["object_masks"].shape[1:]), dtype=torch.bool)
        for k, it in enumerate(items):
            objs[k, : it["token_objects"].size(0)] = it["token_objects"]
            masks[k, : it["object_masks"].size(0)] = it["object_masks"]
        batch["token_objects"] = objs  # (B, T) object named at each target step, -1 for none
        batch["object_masks"] = masks  # (B, K, H, W)
    if "feature_scales" in items[0]:  # an int8 cache: dequantised on the device (batch_features)
        batch["features"] = torch.stack([it["features"] for it in items])  # (B, N, D) int8
        batch["feature_scales"] = torch.stack([it["feature_scales"] for it in items])  # (B, D)
    elif "features" in items[0]:
        batch["features"] = torch.stack([it["features"] for it in items]).float()  # (B, N, D)
    else:
        batch["images"] = torch.stack([it["image"] for it in items])  # (B, 3, S, S)
    return batch


class CaptionDataModule(L.LightningDataModule):
    """Serves any registered data source: ``shapes`` (generated on first use), Karpathy split files
    or COCO annotation files.

    Args:
        dataset: the source to use, a name from ``captioner.data.sources.SOURCES``: ``shapes``,
            ``karpathy`` (COCO / Flickr8k / Flickr30k split JSON) or ``coco`` (COCO caption
            annotation files, one per split).
        shapes, karpathy, coco: each source's settings (``ShapesSource``, ``KarpathySource``,
            ``CocoSource``, or a plain mapping of them); only the one ``dataset`` names is used.
            Word-region grounding is a ``shapes`` setting (``shapes.grounding``).
        tokenizer: how caption text becomes words, a name from ``captioner.data.tokenizers``:
            ``simple`` (English; Karpathy files' ``tokens`` are used as they are), ``unicode``
            (any alphabet) or ``char`` (Chinese, Japanese); with any but ``simple`` every
            caption's ``raw`` text is tokenised again. None (the default): the one the split
            file records (``data convert`` writes it), else ``simple``; a name that differs
            from the split file's is a ``ValueError``. The name used is ``tokenizer_name``,
            stored in the checkpoint for captioning.
        min_count, max_vocab: vocabulary rule (training split only).
        max_caption_length: tokens kept per caption (longer ones are cut); None: the
            tokenizer's ``max_length`` (20 for ``simple``, 50 for ``unicode`` and ``char``).
        vocab_path: where the vocabulary is cached (default: beside the data, named after the data
            file, the rule and a hash of what it is made from). A file made from other data or
            settings is refused (the default cache is rebuilt instead).
        captions_per_image: ``random`` (one reference per image per epoch) or ``all``.
        skip_bad_images: skip unreadable images with a warning instead of stopping.
        preprocessing: resize/normalise; ``captioner fit`` takes it from the encoder.
        feature_cache: a folder written by ``captioner features extract``; images are then not read.
        limit_train, limit_eval: use only the first N images of each split (quick runs).
        in_memory: read and preprocess each split's images once, into RAM (float32), and serve
            batches from there without worker processes (``num_workers`` is then unused). Refused
            (``ValueError``) when a split would take more than half the memory available.
        seed: the order of training images and the reference drawn per epoch.

    Multi-process training shards through ``EpochSampler`` (so ``captioner fit`` sets
    ``trainer.use_distributed_sampler: false``); mid-epoch resume restores the position.
    """

    def __init__(
        self,
        dataset: Annotated[str, SOURCES] = "shapes",
        # frozen dataclasses, so these shared default instances cannot be changed through one module
        shapes: ShapesSource = ShapesSource(),
        karpathy: KarpathySource = KarpathySource(),
        coco: CocoSource = CocoSource(),
        tokenizer: str | None = None,
        min_count: PositiveInt = 5,
        max_vocab: PositiveInt | None = None,
        max_caption_length: PositiveInt | None = None,
        vocab_path: str | None = None,
        batch_size: PositiveInt = 32,
        eval_batch_size: PositiveInt | None = None,
        num_workers: NonNegativeInt = 2,
        captions_per_image: Literal["random", "all"] = "random",
        skip_bad_images: bool = False,
        preprocessing: Preprocessing | None = None,
        feature_cache: str | None = None,
        limit_train: PositiveInt | None = None,
        limit_eval: PositiveInt | None = None,
        seed: int = 0,
        in_memory: bool = False,
    ) -> None:
        super().__init__()
        # every argument against its annotation (an unknown data.dataset lists the registered ones)
        check_arguments(CaptionDataModule.__init__, "data", locals())
        if tokenizer is not None:
            TOKENIZERS.get(tokenizer)  # an unknown tokenizer fails here, listing the registered ones
        # The sections are typed arguments (so LightningCLI can parse and override them), named as
        # the registry names them; mappings become the registered classes here.
        self.sources = {name: as_source(name, value)
                        for name, value in (("shapes", shapes), ("karpathy", karpathy), ("coco", coco))}
        self.dataset = dataset
        self.source = self.sources[dataset]
        self.source.check()
        self.tokenizer = tokenizer  # the setting; tokenizer_name is the one used
        self._tokenizer_name: str | None = None
        self.min_count = min_count
        self.max_vocab = max_vocab
        self._max_caption_length = max_caption_length
        self._vocab_path = vocab_path
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.captions_per_image = captions_per_image
        self.skip_bad_images = skip_bad_images
        self.preprocessing = preprocessing or Preprocessing()
        self.feature_cache = feature_cache
        self.limit_train = limit_train
        self.limit_eval = limit_eval
        self.seed = seed
        self.in_memory = in_memory
        self._images: dict[str, list[Tensor | None]] = {}  # data.in_memory: per split
        self.grounding = self.source.grounded_training
        self._records: dict[str, list[ImageRecord]] | None = None
        self._grounded: set[str] = set()  # splits whose records carry the source's grounding
        self._vocab: Vocabulary | None = None
        self._vocab_made_from: dict | None = None
        self._warned_old_vocab = False
        self._resume: dict | None = None
        self._train_sampler: EpochSampler | None = None
        self._feature_store = None

    # -- the tokenizer ---------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        """The tokenizer the captions are split with: ``data.tokenizer`` when set, else the one
        the split file records, else ``simple``. ``ValueError`` when the two differ."""
        if self._tokenizer_name is None:
            recorded = self.source.recorded_tokenizer()
            if recorded is not None:
                name, where = recorded
                if name not in TOKENIZERS:
                    raise ValueError(f"{where}: unknown tokenizer {name!r} (this version of captioner "
                                     f"has {', '.join(TOKENIZERS.names())})")
                if self.tokenizer is not None and self.tokenizer != name:
                    raise ValueError(f"data.tokenizer {self.tokenizer} differs from the tokenizer {name!r} "
                                     f"that {where} was made with; leave data.tokenizer unset")
            self._tokenizer_name = self.tokenizer or (recorded[0] if recorded else "simple")
        return self._tokenizer_name

    @property
    def max_caption_length(self) -> int:
        """Tokens kept per caption: ``data.max_caption_length``, else the tokenizer's limit."""
        if self._max_caption_length is not None:
            return self._max_caption_length
        return get_tokenizer(self.tokenizer_name).max_length

    # -- preparing -----------------------------------------------------------------------------
    @property
    def vocab_made_from(self) -> dict:
        """What decides the vocabulary, as its file records it (``made_from``): the training
        captions' source by content (``training_captions``), the tokenizer, ``min_count`` and
        ``max_vocab``. Not ``max_caption_length``: the words of whole captions are counted."""
        if self._vocab_made_from is None:
            self._vocab_made_from = {**self.source.training_captions(), "tokenizer": self.tokenizer_name,
                                     "min_count": self.min_count, "max_vocab": self.max_vocab}
        return self._vocab_made_from

    @property
    def vocab_path(self) -> Path:
        """``data.vocab_path``, or the cache beside the data named after what it is made from:
        ``vocab-<data file's stem>-min<N>[-max<M>][-<tokenizer>]-<hash>.json``, the hash of
        ``vocab_made_from`` (so two split files in one folder, or one file edited, get their own)."""
        if self._vocab_path:
            return Path(self._vocab_path)
        made = self.vocab_made_from
        cap = f"-max{self.max_vocab}" if self.max_vocab else ""
        tok = "" if self.tokenizer_name == "simple" else f"-{self.tokenizer_name}"
        return self.source.vocab_dir() / f"vocab-{Path(made['file']).stem}-min{self.min_count}{cap}{tok}-{sha256_json(made)[:8]}.json"

    def prepare_data(self) -> None:
        """Let the source prepare its files (``shapes``: generate when absent); build and cache
        the vocabulary unless the cached one was made from the same (rank 0 only)."""
        self.source.prepare()
        if self._cached_vocab() is None:
            self._build_vocab()

    def _cached_vocab(self) -> Vocabulary | None:
        """The cached vocabulary if it was made from what this config asks (``vocab_made_from``).
        None when there is none, or when the default cache was made from something else (it is
        then rebuilt). A ``data.vocab_path`` made from something else -> ``ValueError`` naming
        each field; one of an earlier release (no record) is used as it is, with a warning."""
        path = self.vocab_path
        if not path.exists():
            return None
        vocab = Vocabulary.load(path)
        expected = self.vocab_made_from
        if vocab.made_from is None:
            if not self._vocab_path:
                return None
            if not self._warned_old_vocab:
                logger.warning("data.vocab_path %s does not record what it was made from (an earlier "
                               "release): used as it is, unchecked", path)
                self._warned_old_vocab = True
            return vocab
        diff = differences(vocab.made_from, expected)
        if not diff:
            return vocab
        if self._vocab_path:
            raise ValueError(
                f"data.vocab_path {path}: the vocabulary there was made from other data or settings (the "
                f"file's vs this config's: {', '.join(diff)}); remove the file to rebuild it, or set "
                "data.vocab_path to another file (null: a cache beside the data, named after what it is made from)")
        logger.warning("%s was made from other data or settings (%s): rebuilding it", path, ", ".join(diff))
        return None

    def _build_vocab(self) -> Vocabulary:
        train = self.records["train"]
        vocab = Vocabulary.build((c for r in train for c in r.captions), self.min_count, self.max_vocab)
        vocab.made_from = self.vocab_made_from
        vocab.save(self.vocab_path)
        logger.info("built a vocabulary of %d words from %d training images -> %s",
                    len(vocab), len(train), self.vocab_path)
        return vocab

    @property
    def records(self) -> dict[str, list[ImageRecord]]:
        if self._records is None:
            tok = get_tokenizer(self.tokenizer_name)
            records = self.source.read()
            if tok.name != "simple":  # the sources tokenise with `simple`: redo it from raw
                for recs in records.values():
                    for r in recs:
                        if r.raw:
                            r.captions = [tok.tokenize(text) for text in r.raw]
            captions = ((raw, words) for recs in records.values() for r in recs
                        for raw, words in zip(r.raw, r.captions))
            _, warning = lost_letters_warning(
                tok, captions, "make the split file again with `captioner data convert` (its default "
                "tokenizer, unicode, keeps every letter; char suits Chinese and Japanese)")
            if warning:
                logger.warning("%s", warning)
            self._records = records
        return self._records

    @property
    def vocab(self) -> Vocabulary:
        """The vocabulary; prepares the data first when needed (so the CLI can link it)."""
        if self._vocab is None:
            self.source.prepare()  # its files decide the vocabulary's name (shapes: generated when absent)
            vocab = self._cached_vocab()
            self._vocab = vocab if vocab is not None else self._build_vocab()
        return self._vocab

    def split_records(self, split: str) -> list[ImageRecord]:
        if split not in self.records:
            raise ValueError(f"split {split!r} not in the data set (has: {', '.join(self.records)})")
        recs = self.records[split]
        limit = self.limit_train if split == "train" else self.limit_eval
        return recs[:limit] if limit else recs

    def references(self, split: str) -> dict[int, list[str]]:
        """All reference captions per image id, as space-joined tokens."""
        return {r.image_id: [" ".join(c) for c in r.captions] for r in self.split_records(split)}

    def _features(self):
        """The feature cache, opened (its index read) once for all splits."""
        if not self.feature_cache:
            return None
        if self._feature_store is None:
            from captioner.data.features import FeatureStore

            self._feature_store = FeatureStore(self.feature_cache)
        return self._feature_store

    def check_feature_cache(self, encoder: dict, preprocessing: Preprocessing | None,
                            splits: Sequence[str]) -> None:
        """With ``data.feature_cache``: refuse (``FeatureCacheError``, a ``ValueError``: one line
        naming each difference) a cache made by another encoder than ``encoder`` (its fingerprint,
        ``captioner.models.encoder_fingerprint``) or other ``preprocessing``, or whose image ids
        name other files than the data's ``splits`` (those present) do now, or lack some of them.
        The model is passed in, so the data do not depend on it: ``CaptioningSystem.setup`` calls
        this before the first step."""
        store = self._features()
        if store is None:
            return
        records = [r for s in splits if s in self.records for r in self.split_records(s)]
        store.check(encoder, preprocessing, records)

    def feature_cache_preprocessing(self) -> Preprocessing | None:
        """The preprocessing the feature cache recorded (None without a cache)."""
        store = self._features()
        return None if store is None else store.preprocessing

    def dataset_for(self, split: str, mode: str | None = None, grounding: bool | None = None) -> CaptionDataset:
        """``grounding``: items carry word-region grounding; None: for the training split when
        ``data.shapes.grounding`` is set (only training uses it)."""
        mode = mode or (self.captions_per_image if split == "train" else "first")
        grounding = self.grounding and split == "train" if grounding is None else grounding
        records = self.split_records(split)
        if grounding:
            self._attach_grounding(split)
        return CaptionDataset(
            records, self.vocab, self.preprocessing, mode,
            self.max_caption_length, self.skip_bad_images, self._features(), self.seed,
            grounding=grounding, images=self._images_in_memory(split),
        )

    def _images_in_memory(self, split: str) -> list[Tensor | None] | None:
        """``data.in_memory``: the split's preprocessed images, read once (None per unreadable
        image when ``skip_bad_images``); None when off or when a feature cache replaces images."""
        if not self.in_memory or self.feature_cache:
            return None
        if split not in self._images:
            records = self.split_records(split)
            size = self.preprocessing.image_size
            need = len(records) * 3 * size * size * 4  # float32 (3, S, S) per image
            available = available_memory()
            if need > available / 2:
                raise ValueError(
                    f"data.in_memory: the {split} split's {len(records)} images at {size} px need "
                    f"{need / 2**30:.1f} GiB, more than half the {available / 2**30:.1f} GiB of memory "
                    "available; set data.in_memory: false (images are then read per batch)")
            reader = CaptionDataset(records, self.vocab, self.preprocessing, "first", self.max_caption_length,
                                    self.skip_bad_images)
            self._images[split] = [item["image"] if item else None for item in map(reader.__getitem__, range(len(records)))]
            logger.info("data.in_memory: %d %s images (%.0f MiB)", len(records), split, need / 2**20)
        return self._images[split]

    def _attach_grounding(self, split: str) -> None:
        """Copy the source's word-region grounding onto the split's records, once, when a dataset
        needs it (so commands that never train, such as ``evaluate``, do not read it)."""
        if split in self._grounded:
            return
        self.source.attach_grounding(self.records[split])
        self._grounded.add(split)

    def setup(self, stage: str | None = None) -> None:
        self.vocab  # noqa: B018 - load it in every process

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.dataset_for(split)
        sampler = EpochSampler(len(ds), shuffle=shuffle, seed=self.seed)
        if split == "train":
            self._train_sampler = sampler
            self._apply_resume()
        workers = 0 if ds.images is not None else self.num_workers  # in memory: nothing left to read
        return DataLoader(
            ds,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_captions,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # -- resuming mid-epoch ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where training is in the data: saved in every checkpoint by Lightning."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": int(trainer.current_epoch), "batches_done": int(progress.processed)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state) if state else None
        self._apply_resume()

    def _apply_resume(self) -> None:
        if self._resume and self._train_sampler is not None:
            done = self._resume["batches_done"] * self.batch_size
            # a checkpoint at the end of an epoch has nothing left to skip
            self._train_sampler.skip = done if done < len(self._train_sampler) else 0
            self._train_sampler.set_epoch(self._resume["epoch"])
            self._resume = None
