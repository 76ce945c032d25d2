"""The published split files of Flickr8k and COCO -> :class:`Row` s (``data convert --from
flickr8k`` / ``--from coco-karpathy``), for when Karpathy's ``caption_datasets.zip`` is not at hand.

- Flickr8k: ``Flickr8k.token.txt`` (``<image>.jpg#<0-4><TAB><caption>``) and the split lists
  ``Flickr_8k.{train,dev,test}Images.txt`` (one image name a line; dev -> val), as the text
  archive of the images' release ships them.
- COCO: the Karpathy split as BLIP/LAVIS publish it (``coco_karpathy_{train,val,test}.json``: the
  split of each image) with COCO's own ``captions_{train,val}2014.json`` (its id and every caption).

Each reader returns a :class:`Published`: the rows for :func:`convert_rows`, what it left out on
purpose (images in no split), and :meth:`Published.finish` to name the data set in the file
(and give COCO entries their ``filepath`` and ``cocoid``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from captioner.data.convert import ConvertError, Row

FLICKR8K_TOKENS = "Flickr8k.token.txt"
# split -> the list's name in Flickr8k_text.zip (its "dev" list is the val split)
FLICKR8K_LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                  "test": "Flickr_8k.testImages.txt"}
COCO_KARPATHY = {s: f"coco_karpathy_{s}.json" for s in ("train", "val", "test")}
COCO_CAPTIONS = ("captions_train2014.json", "captions_val2014.json")


@dataclass
class Published:
    rows: list[Row]
    dataset: str  # the split file's "dataset"
    left_out: list[str] = field(default_factory=list)  # report lines: what was left out on purpose
    cocoids: dict[str, int] = field(default_factory=dict)  # COCO: image (filepath/filename) -> id

    def finish(self, data: dict) -> dict:
        """The split file from :func:`convert_rows` as Karpathy's files name it: ``dataset``, and
        for COCO each entry's ``filepath`` (train2014/val2014), bare ``filename`` and ``cocoid``."""
        data["dataset"] = self.dataset
        if self.cocoids:
            for i, entry in enumerate(data["images"]):
                image = entry.pop("filename")
                filepath, _, filename = image.rpartition("/")
                data["images"][i] = {"filepath": filepath, "filename": filename,
                                     "cocoid": self.cocoids[image], **entry}
        return data


def _examples(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise ConvertError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConvertError(f"{path}: cannot read ({err})") from None


# -- Flickr8k ------------------------------------------------------------------------------------
def read_flickr8k(path: str | os.PathLike, lists: dict[str, str | os.PathLike | None] | None = None) -> Published:
    """``path``: ``Flickr8k.token.txt`` or the folder holding it; ``lists``: split -> its image
    list (default: the archive's names, beside the token file). Every caption of a listed image
    becomes a row with the list's split; a listed image without a caption a row with none (so the
    report names it); captioned images in no list are left out and counted."""
    path = Path(path)
    tokens = path / FLICKR8K_TOKENS if path.is_dir() else path
    split_of: dict[str, tuple[str, str]] = {}  # image -> (split, "list:line")
    for split, default in FLICKR8K_LISTS.items():
        given = (lists or {}).get(split)
        list_path = Path(given) if given else tokens.parent / default
        if not list_path.is_file():
            raise ConvertError(f"{list_path}: not found (Flickr8k's {split} list, {default} in "
                               f"Flickr8k_text.zip; give --{split}-list FILE)")
        for n, line in enumerate(_lines(list_path), 1):
            image = line.strip()
            if not image:
                continue
            where = f"{list_path}:{n}"
            if image in split_of:
                raise ConvertError(f"{where}: {image} is already listed at {split_of[image][1]}")
            split_of[image] = (split, where)

    rows: list[Row] = []
    captioned: set[str] = set()
    unlisted: dict[str, None] = {}  # ordered set
    for n, line in enumerate(_lines(tokens), 1):
        if not line.strip():
            continue
        where = f"{tokens}:{n}"
        key, tab, caption = line.partition("\t")
        image, hash_, number = key.strip().rpartition("#")
        if not tab or not hash_ or not image or not number.isdigit():
            raise ConvertError(f"{where}: expected '<image>#<number><TAB><caption>', got {line[:80]!r}")
        if image not in split_of:
            unlisted[image] = None
            continue
        captioned.add(image)
        rows.append(Row(image, caption, split_of[image][0], where))
    for image, (split, where) in split_of.items():
        if image not in captioned:
            rows.append(Row(image, None, split, f"{where} (no caption in {tokens})"))
    left_out = []
    if unlisted:
        left_out.append(f"left out, in no split list: {len(unlisted)} captioned image(s) of {tokens.name} "
                        f"({_examples(list(unlisted))})")
    return Published(rows, "flickr8k", left_out)


# -- COCO, Karpathy split as BLIP/LAVIS publish it ------------------------------------------------
def _karpathy_entries(path: Path) -> list[tuple[str, list[str]]]:
    """``coco_karpathy_*.json`` -> (image, its captions in this file) per entry, in order."""
    if not path.is_file():
        raise ConvertError(f"{path}: not found (BLIP/LAVIS's {path.name}; see docs/data.md, "
                           "'Published split files')")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise ConvertError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise ConvertError(f"{path}: expected a JSON list of {{\"image\", \"caption\"}} objects")
    out = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
            raise ConvertError(f"{where}: expected an object with a string 'image'")
        caption = entry.get("caption")
        captions = [caption] if isinstance(caption, str) else caption
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ConvertError(f"{where} ({entry['image']}): 'caption' must be a string or a list of strings")
        if "/" not in entry["image"]:
            raise ConvertError(f"{where}: 'image' must be FOLDER/FILE (train2014/..., val2014/...), "
                               f"got {entry['image']!r}")
        out.append((entry["image"], captions))
    return out


def read_coco_karpathy(path: str | os.PathLike, captions: list[str | os.PathLike] | None = None) -> Published:
    """``path``: the folder holding ``coco_karpathy_{train,val,test}.json`` (or one of them);
    ``captions``: COCO's caption files (default ``captions_{train,val}2014.json`` in that folder
    or its ``annotations/``). The Karpathy files decide each image's split; COCO's files give its
    id and all its captions (ordered by annotation id). COCO images in no split are left out and
    counted."""
    from captioner.data.coco import read_coco_annotations

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    split_of: dict[str, tuple[str, str]] = {}  # image -> (split, "file: entry i")
    for split, name in COCO_KARPATHY.items():
        for i, (image, _) in enumerate(_karpathy_entries(folder / name)):
            where = f"{folder / name}: entry {i}"
            seen = split_of.setdefault(image, (split, where))
            if seen[0] != split:
                raise ConvertError(f"{where}: {image} is already in the {seen[0]} split ({seen[1]})")

    if captions:
        caption_files = [Path(c) for c in captions]
    else:
        caption_files = []
        for name in COCO_CAPTIONS:
            found = [p for p in (folder / name, folder / "annotations" / name) if p.is_file()]
            if not found:
                raise ConvertError(f"{folder / name}: not found, nor in {folder / 'annotations'} (COCO's "
                                   "caption file, in annotations_trainval2014.zip; give --coco-captions FILE...)")
            caption_files.append(found[0])
    coco: dict[str, tuple[int, list[str], list[int], Path]] = {}  # file_name -> (id, captions, ann ids, file)
    for file in caption_files:
        try:
            records = read_coco_annotations(file, ".")
        except (OSError, ValueError) as err:
            raise ConvertError(" ".join(str(err).split())) from None
        for r in records:
            coco[Path(r.filename).name] = (r.image_id, r.raw, r.sentids, file)

    rows: list[Row] = []
    cocoids: dict[str, int] = {}
    for image, (split, where) in split_of.items():
        name = image.rpartition("/")[2]
        if name not in coco:
            raise ConvertError(f"{where}: {name} is in none of COCO's caption files "
                               f"({', '.join(str(f) for f in caption_files)})")
        cocoid, raws, ann_ids, file = coco[name]
        cocoids[image] = cocoid
        if not raws:
            rows.append(Row(image, None, split, f"{file}: image {cocoid} (no caption)", image_id=cocoid))
        for k, raw in enumerate(raws):
            ann = f"annotation {ann_ids[k]}" if k < len(ann_ids) else f"image {cocoid}"
            rows.append(Row(image, raw, split, f"{file}: {ann}", image_id=cocoid))
    used = {image.rpartition("/")[2] for image in split_of}
    unsplit = sorted(name for name in coco if name not in used)
    left_out = [f"left out, in no Karpathy split: {len(unsplit)} image(s) of COCO's caption files "
                f"({_examples(unsplit)})"] if unsplit else []
    return Published(rows, "coco", left_out, cocoids)


# format -> reader(path, split lists, COCO caption files); each takes the inputs it has
READERS: dict[str, Callable[[Path, dict, list], Published]] = {
    "flickr8k": lambda path, lists, captions: read_flickr8k(path, lists),
    "coco-karpathy": lambda path, lists, captions: read_coco_karpathy(path, captions),
}


def read_published(fmt: str, path: str | os.PathLike, lists: dict[str, str | os.PathLike | None] | None = None,
                   captions: list[str | os.PathLike] | None = None) -> Published:
    if fmt not in READERS:
        raise ConvertError(f"unknown published format {fmt!r}; choose one of {', '.join(READERS)}")
    if not Path(path).exists():
        raise ConvertError(f"{path}: not found")
    return READERS[fmt](Path(path), lists or {}, list(captions or []))


__all__ = ["COCO_CAPTIONS", "COCO_KARPATHY", "FLICKR8K_LISTS", "FLICKR8K_TOKENS", "READERS", "Published",
           "read_coco_karpathy", "read_flickr8k", "read_published"]
