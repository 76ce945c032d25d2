"""The LightningDataModule: any data source, from a YAML config, to padded caption batches."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from captioner.data.images import ImageLoadError, load_image
from captioner.data.records import ImageRecord
from captioner.data.sampling import EpochSampler
from captioner.data.transforms import Preprocessing
from captioner.data.vocab import PAD_ID, Vocabulary

logger = logging.getLogger(__name__)

DATASETS = ("shapes", "karpathy", "coco")


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
    ) -> None:
        if mode not in ("random", "all", "first"):
            raise ValueError(f"caption mode must be 'random', 'all' or 'first', got {mode!r}")
        self.records = list(records)
        self.vocab = vocab
        self.preprocessing = preprocessing
        self.mode = mode
        self.max_caption_length = max_caption_length
        self.skip_bad_images = skip_bad_images
        self.features = features  # a FeatureStore-like object: .get(image_id) -> Tensor (N, D)
        self.seed = seed
        self.grounding = grounding
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
            item["features"] = self.features.get(rec.image_id)
            return item
        try:
            image = load_image(rec.path)
        except ImageLoadError as err:
            if self.skip_bad_images:
                logger.warning("skipping %s", err)
                return None
            raise ImageLoadError(
                rec.path, f"{err.reason} (run `captioner data check` first, or set "
                "`data.skip_bad_images: true` to skip such files)"
            ) from err
        item["image"] = self.preprocessing(image) if self.preprocessing else image
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
    if "features" in items[0]:
        batch["features"] = torch.stack([it["features"] for it in items]).float()  # (B, N, D)
    else:
        batch["images"] = torch.stack([it["image"] for it in items])  # (B, 3, S, S)
    return batch


class CaptionDataModule(L.LightningDataModule):
    """Serves ``shapes`` (generated on first use), Karpathy split files or COCO annotation files.

    Args:
        dataset: ``shapes``, ``karpathy`` (COCO / Flickr8k / Flickr30k split JSON) or ``coco``
            (COCO caption annotation files, one per split).
        data_dir: ``shapes``: where the data set lives (generated there when absent).
        karpathy_json: the split file for ``karpathy``.
        image_root: the image folder (``karpathy``: COCO's holds train2014/ and val2014/).
        coco_annotations: ``coco``: split -> annotation file, e.g. ``{"train": ".../captions_train2014.json"}``.
        coco_image_roots: ``coco``: split -> image folder.
        shapes: settings for generating ``shapes``.
        restval_to_train: fold Karpathy's ``restval`` into train.
        min_count, max_vocab: vocabulary rule (training split only).
        max_caption_length: words kept per caption (longer ones are cut).
        vocab_path: where the vocabulary is cached (default: beside the data).
        captions_per_image: ``random`` (one reference per image per epoch) or ``all``.
        skip_bad_images: skip unreadable images with a warning instead of stopping.
        preprocessing: resize/normalise; ``captioner fit`` takes it from the encoder.
        feature_cache: a folder written by ``captioner features extract``; images are then not read.
        limit_train, limit_eval: use only the first N images of each split (quick runs).
        seed: the order of training images and the reference drawn per epoch.
        grounding: training batches carry, per word, the object it names and the objects' masks
            (``shapes`` only), for ``model.loss.attention_supervision``.
        ground_relations: with ``grounding``, relation keywords (left/right/above/below) are
            grounded too, in the object the relation is about (the next mention).

    Multi-process training shards through ``EpochSampler`` (so ``captioner fit`` sets
    ``trainer.use_distributed_sampler: false``); mid-epoch resume restores the position.
    """

    def __init__(
        self,
        dataset: str = "shapes",
        data_dir: str = "data/shapes",
        karpathy_json: str | None = None,
        image_root: str | None = None,
        coco_annotations: dict[str, str] | None = None,
        coco_image_roots: dict[str, str] | None = None,
        shapes_num_images: int = 4000,
        shapes_image_size: int = 64,
        shapes_seed: int = 0,
        shapes_compositional: bool = False,
        restval_to_train: bool = True,
        min_count: int = 5,
        max_vocab: int | None = None,
        max_caption_length: int = 20,
        vocab_path: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        captions_per_image: str = "random",
        skip_bad_images: bool = False,
        preprocessing: Preprocessing | None = None,
        feature_cache: str | None = None,
        limit_train: int | None = None,
        limit_eval: int | None = None,
        seed: int = 0,
        grounding: bool = False,
        ground_relations: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"data.dataset must be one of {DATASETS}, got {dataset!r}")
        if captions_per_image not in ("random", "all"):
            raise ValueError(f"data.captions_per_image must be 'random' or 'all', got {captions_per_image!r}")
        if dataset == "karpathy" and not (karpathy_json and image_root):
            raise ValueError("data.dataset 'karpathy' needs data.karpathy_json and data.image_root")
        if dataset == "coco" and not (coco_annotations and coco_image_roots):
            raise ValueError("data.dataset 'coco' needs data.coco_annotations and data.coco_image_roots")
        self.dataset = dataset
        self.data_dir = Path(data_dir)
        self.karpathy_json = karpathy_json
        self.image_root = image_root
        self.coco_annotations = coco_annotations or {}
        self.coco_image_roots = coco_image_roots or {}
        self.shapes_kwargs = {
            "num_images": shapes_num_images, "image_size": shapes_image_size,
            "seed": shapes_seed, "compositional": shapes_compositional,
        }
        self.restval_to_train = restval_to_train
        self.min_count = min_count
        self.max_vocab = max_vocab
        self.max_caption_length = max_caption_length
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
        self.grounding = grounding
        if grounding and dataset != "shapes":
            raise ValueError("data.grounding needs word-region alignments: only data.dataset 'shapes' has them")
        if ground_relations and not grounding:
            raise ValueError("data.ground_relations needs data.grounding: true")
        self.ground_relations = ground_relations
        self._records: dict[str, list[ImageRecord]] | None = None
        self._grounded: set[str] = set()  # splits whose records carry grounding.json's alignments
        self._vocab: Vocabulary | None = None
        self._resume: dict | None = None
        self._train_sampler: EpochSampler | None = None
        self._feature_store = None

    # -- preparing -----------------------------------------------------------------------------
    @property
    def vocab_path(self) -> Path:
        if self._vocab_path:
            return Path(self._vocab_path)
        base = self.data_dir if self.dataset == "shapes" else Path(
            self.karpathy_json or next(iter(self.coco_annotations.values()))).parent
        cap = f"-max{self.max_vocab}" if self.max_vocab else ""
        return base / f"vocab-min{self.min_count}{cap}.json"

    @property
    def karpathy_path(self) -> Path:
        return self.data_dir / "dataset.json" if self.dataset == "shapes" else Path(self.karpathy_json)

    def prepare_data(self) -> None:
        """Generate ``shapes`` when absent; build and cache the vocabulary (rank 0 only)."""
        if self.dataset == "shapes" and not (self.data_dir / "dataset.json").exists():
            from captioner.data.shapes import ShapesConfig, generate_shapes

            logger.warning("shapes data set not found at %s: generating it (%s)", self.data_dir, self.shapes_kwargs)
            generate_shapes(self.data_dir, ShapesConfig(**self.shapes_kwargs))
        if not self.vocab_path.exists():
            train = self.records["train"]
            vocab = Vocabulary.build((c for r in train for c in r.captions), self.min_count, self.max_vocab)
            vocab.save(self.vocab_path)
            logger.info("built a vocabulary of %d words from %d training images -> %s",
                        len(vocab), len(train), self.vocab_path)

    @property
    def records(self) -> dict[str, list[ImageRecord]]:
        if self._records is None:
            self._records = self._read()
        return self._records

    def _read(self) -> dict[str, list[ImageRecord]]:
        if self.dataset in ("shapes", "karpathy"):
            from captioner.data.karpathy import read_karpathy

            root = self.data_dir / "images" if self.dataset == "shapes" else self.image_root
            return read_karpathy(self.karpathy_path, root, restval_to_train=self.restval_to_train)
        from captioner.data.coco import read_coco_annotations

        out = {}
        for split, ann in self.coco_annotations.items():
            if split not in self.coco_image_roots:
                raise ValueError(f"data.coco_image_roots has no folder for split {split!r}")
            out[split] = read_coco_annotations(ann, self.coco_image_roots[split], split=split)
        return out

    @property
    def vocab(self) -> Vocabulary:
        """The vocabulary; prepares the data first when needed (so the CLI can link it)."""
        if self._vocab is None:
            if not self.vocab_path.exists():
                self.prepare_data()
            self._vocab = Vocabulary.load(self.vocab_path)
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

    def dataset_for(self, split: str, mode: str | None = None, grounding: bool | None = None) -> CaptionDataset:
        """``grounding``: items carry word-region grounding; None: for the training split when
        ``data.grounding`` is set (only training uses it)."""
        mode = mode or (self.captions_per_image if split == "train" else "first")
        grounding = self.grounding and split == "train" if grounding is None else grounding
        records = self.split_records(split)
        if grounding:
            self._attach_grounding(split)
        return CaptionDataset(
            records, self.vocab, self.preprocessing, mode,
            self.max_caption_length, self.skip_bad_images, self._features(), self.seed,
            grounding=grounding,
        )

    def _attach_grounding(self, split: str) -> None:
        """Copy ``grounding.json`` onto the split's records, once, when a dataset needs it (so
        commands that never train, such as ``evaluate``, do not read the file for it)."""
        if split in self._grounded or self.dataset != "shapes":
            return
        from captioner.data.grounding import attach_shapes_grounding
        from captioner.data.shapes import load_grounding

        attach_shapes_grounding(self.records[split], load_grounding(self.data_dir), relations=self.ground_relations)
        self._grounded.add(split)

    def setup(self, stage: str | None = None) -> None:
        self.vocab  # noqa: B018 - load it in every process

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.dataset_for(split)
        sampler = EpochSampler(len(ds), shuffle=shuffle, seed=self.seed)
        if split == "train":
            self._train_sampler = sampler
            self._apply_resume()
        return DataLoader(
            ds,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_captions,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
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
