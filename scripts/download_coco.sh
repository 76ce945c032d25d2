#!/usr/bin/env bash
# COCO 2014 images, caption annotations and Karpathy's split file into data/coco/ (needs internet; ~20 GB).
#   data/coco/train2014/  data/coco/val2014/  data/coco/annotations/captions_*2014.json
#   data/coco/dataset_coco.json
# Then: captioner data check --karpathy-json data/coco/dataset_coco.json --image-root data/coco
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-data/coco}"
mkdir -p "$DEST"
cd "$DEST"
# resumed after an interruption (-C -); renamed only when complete, so a rerun skips it
fetch() { [ -f "$2" ] || { curl -fL --retry 3 -C - -o "$2.part" "$1" && mv "$2.part" "$2"; }; }
fetch http://images.cocodataset.org/zips/train2014.zip train2014.zip
fetch http://images.cocodataset.org/zips/val2014.zip val2014.zip
fetch http://images.cocodataset.org/annotations/annotations_trainval2014.zip annotations_trainval2014.zip
fetch https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip caption_datasets.zip
[ -d train2014 ] || unzip -q train2014.zip
[ -d val2014 ] || unzip -q val2014.zip
[ -d annotations ] || unzip -q annotations_trainval2014.zip
[ -f dataset_coco.json ] || unzip -q -j caption_datasets.zip dataset_coco.json
echo "COCO ready in $DEST"
