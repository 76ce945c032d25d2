#!/usr/bin/env bash
# Flickr8k, the whole recipe: download -> data check -> features -> cross-entropy training
# (configs/flickr8k.yaml) -> SCST fine-tuning (configs/flickr8k-scst.yaml) -> evaluation of both on
# the test split -> export of the SCST model as a model folder with its card. Each stage is skipped
# when its output is there, so a killed run is simply run again. Details: docs/training.md,
# "Whole recipes"; needs about 10 GB of disk (1.1 GB download, 6.5 GB of features).
#
#   scripts/train_flickr8k.sh                               downloads into data/flickr8k, runs into runs/flickr8k-recipe
#   scripts/train_flickr8k.sh --source /mnt/archives        Flickr8k_Dataset.zip, caption_datasets.zip from there
#   scripts/train_flickr8k.sh -- --trainer.precision bf16-mixed --data.num_workers 8   settings of the features and both fits
source "$(dirname "$0")/_recipe.sh"

usage() {
    cat <<USAGE
usage: scripts/train_flickr8k.sh [--source DIR] [--data DIR] [--work DIR] [--no-features] [--no-meteor] [-- SETTING...]
  --source DIR    a folder holding Flickr8k_Dataset.zip and/or caption_datasets.zip: used instead of
                  downloading them
  --data DIR      the data folder (default data/flickr8k): Flicker8k_Dataset/, dataset_flickr8k.json
  --work DIR      where the runs go (default runs/flickr8k-recipe)
  --no-features   train from the images instead of a feature cache
USAGE
    usage_common_options 8
}

DATASET=flickr8k
CE_CONFIG="$RECIPE_ROOT/configs/flickr8k.yaml"
SCST_CONFIG="$RECIPE_ROOT/configs/flickr8k-scst.yaml"
SPLIT_FILE=dataset_flickr8k.json
IMAGE_ROOT=Flicker8k_Dataset  # sic: the archive's folder is spelt so

download() {
    stage download "$SPLIT" "$IMAGES" || return 0
    local archive
    if [ ! -f "$SPLIT" ]; then
        archive="$(fetch caption_datasets.zip https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip)"
        extract_file "$archive" "$SPLIT_FILE"
    fi
    if [ ! -d "$IMAGES" ]; then
        archive="$(fetch Flickr8k_Dataset.zip https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip)"
        extract_dir "$archive" "$IMAGE_ROOT"
    fi
}

recipe_main "$@"
