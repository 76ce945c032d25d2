#!/usr/bin/env bash
# Flickr8k images + its split file into data/flickr8k/ (needs internet; ~2.2 GB of disk): the
# download stage of scripts/train_flickr8k.sh alone, which says where each file comes from (the
# split file: Karpathy's caption_datasets.zip, else Flickr8k_text.zip through `captioner data
# convert --from flickr8k`) and checks the image count.
#   data/flickr8k/Flicker8k_Dataset/*.jpg   data/flickr8k/dataset_flickr8k.json
# Then: captioner data check --karpathy-json data/flickr8k/dataset_flickr8k.json --image-root data/flickr8k/Flicker8k_Dataset
#   scripts/download_flickr8k.sh [DEST] [--source DIR] [--expect-images N]
set -euo pipefail
[ $# -eq 0 ] || [ "${1#-}" != "$1" ] || set -- --data "$@"  # DEST, as before: --data DEST
exec "$(dirname "$0")/train_flickr8k.sh" --download-only "$@"
