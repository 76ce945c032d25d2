#!/usr/bin/env bash
# COCO 2014 (Karpathy split), the whole recipe: download -> data check -> features -> cross-entropy
# training (configs/coco.yaml) -> SCST fine-tuning (configs/coco-scst.yaml) -> evaluation of both
# on the test split -> export of the SCST model as a model folder with its card. Each stage is
# skipped when its output is there, so a killed run is simply run again. Details:
# docs/training.md, "Whole recipes"; needs about 140 GB of disk (19 GB of archives, 19 GB of
# images, 99 GB of features; --no-features trains from the images instead) and a GPU.
#
#   scripts/train_coco.sh                                   downloads into data/coco, runs into runs/coco-recipe
#   scripts/train_coco.sh --source /mnt/archives            train2014.zip, val2014.zip, caption_datasets.zip from there
#   scripts/train_coco.sh -- --trainer.precision bf16-mixed --data.num_workers 16   settings of the features and both fits
source "$(dirname "$0")/_recipe.sh"

usage() {
    cat <<USAGE
usage: scripts/train_coco.sh [--source DIR] [--data DIR] [--work DIR] [--no-features] [--no-meteor] [-- SETTING...]
  --source DIR    a folder holding train2014.zip, val2014.zip and/or caption_datasets.zip: used
                  instead of downloading them
  --data DIR      the data folder (default data/coco): train2014/, val2014/, dataset_coco.json
  --work DIR      where the runs go (default runs/coco-recipe)
  --no-features   train from the images instead of a feature cache (99 GB)
USAGE
    usage_common_options 16
}

DATASET=coco
CE_CONFIG="$RECIPE_ROOT/configs/coco.yaml"
SCST_CONFIG="$RECIPE_ROOT/configs/coco-scst.yaml"
SPLIT_FILE=dataset_coco.json
IMAGE_ROOT=""  # the data folder itself: the split file's filepath (train2014, val2014) is below it

download() {
    stage download "$SPLIT" "$DATA/train2014" "$DATA/val2014" || return 0
    local archive folder
    if [ ! -f "$SPLIT" ]; then
        archive="$(fetch caption_datasets.zip https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip)"
        extract_file "$archive" "$SPLIT_FILE"
    fi
    for folder in val2014 train2014; do
        if [ ! -d "$DATA/$folder" ]; then
            archive="$(fetch "$folder.zip" "http://images.cocodataset.org/zips/$folder.zip")"
            extract_dir "$archive" "$folder"
        fi
    done
}

recipe_main "$@"
