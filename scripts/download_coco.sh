#!/usr/bin/env bash
# COCO 2014 images and the Karpathy split file into data/coco/ (needs internet; ~38 GB of disk):
# the download stage of scripts/train_coco.sh alone, which says where each file comes from (the
# split file: Karpathy's caption_datasets.zip, else BLIP/LAVIS's coco_karpathy_*.json with COCO's
# caption files through `captioner data convert --from coco-karpathy`) and checks the image count.
#   data/coco/train2014/  data/coco/val2014/  data/coco/dataset_coco.json
# Then: captioner data check --karpathy-json data/coco/dataset_coco.json --image-root data/coco
#   scripts/download_coco.sh [DEST] [--source DIR] [--expect-images N]
set -euo pipefail
[ $# -eq 0 ] || [ "${1#-}" != "$1" ] || set -- --data "$@"  # DEST, as before: --data DEST
exec "$(dirname "$0")/train_coco.sh" --download-only "$@"
