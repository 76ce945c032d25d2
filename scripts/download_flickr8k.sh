#!/usr/bin/env bash
# Flickr8k images + Karpathy's split file into data/flickr8k/ (needs internet; ~1.1 GB).
#   data/flickr8k/Flicker8k_Dataset/*.jpg   data/flickr8k/dataset_flickr8k.json
# Then: captioner data check --karpathy-json data/flickr8k/dataset_flickr8k.json --image-root data/flickr8k/Flicker8k_Dataset
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-data/flickr8k}"
mkdir -p "$DEST"
cd "$DEST"
# resumed after an interruption (-C -); renamed only when complete, so a rerun skips it
fetch() { [ -f "$2" ] || { curl -fL --retry 3 -C - -o "$2.part" "$1" && mv "$2.part" "$2"; }; }
fetch https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip Flickr8k_Dataset.zip
fetch https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip caption_datasets.zip
[ -d Flicker8k_Dataset ] || unzip -q Flickr8k_Dataset.zip
[ -f dataset_flickr8k.json ] || unzip -q -j caption_datasets.zip dataset_flickr8k.json
echo "Flickr8k ready in $DEST"
