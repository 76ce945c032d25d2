#!/usr/bin/env bash
# COCO 2014 (Karpathy split), the whole recipe: download -> data check -> features -> cross-entropy
# training (configs/coco.yaml) -> SCST fine-tuning (configs/coco-scst.yaml) -> evaluation of both
# on the test split -> export of the SCST model as a model folder with its card. Each stage is
# skipped when its output is there, so a killed run is simply run again. Details:
# docs/training.md, "Whole recipes"; needs about 137 GB of disk (19 GB of archives, 19 GB of
# images, 99 GB of features, reserved whole when extraction starts; --no-features trains from the
# images instead) and a GPU. The split file comes from the first source that answers: Karpathy's
# caption_datasets.zip, else BLIP/LAVIS's coco_karpathy_{train,val,test}.json with COCO's caption
# files (through `captioner data convert --from coco-karpathy`).
#
#   scripts/train_coco.sh                                   downloads into data/coco, runs into runs/coco-recipe
#   scripts/train_coco.sh --source /mnt/archives            the archives and files named in --help from there
#   scripts/train_coco.sh -- --trainer.precision bf16-mixed --data.num_workers 16   settings of the features and both fits
source "$(dirname "$0")/_recipe.sh"

usage() {
    cat <<USAGE
usage: scripts/train_coco.sh [--source DIR] [--data DIR] [--work DIR] [--no-features] [--no-meteor] [--download-only] [--expect-images N] [-- SETTING...]
  --source DIR    a folder holding train2014.zip, val2014.zip, caption_datasets.zip,
                  coco_karpathy_{train,val,test}.json and/or annotations_trainval2014.zip: used
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
IMAGES_EXPECTED=123287  # 82,783 in train2014 + 40,504 in val2014
LAVIS_URL=https://storage.googleapis.com/sfr-vision-language-research/datasets
CAPTION_FILES=(captions_train2014.json captions_val2014.json)
DISK="about 137 GB: 19 GB of archives, 19 GB of images, 99 GB of features (123,287 x 802,816 B;
      extraction reserves the whole cache at its start and never needs more); 38 GB with --no-features"

# split_from_lavis: the split file from BLIP/LAVIS's Karpathy-split files and COCO's caption files
# (annotations_trainval2014.zip); 1 when they are not to be had.
split_from_lavis() {
    local split name archive=""
    for split in train val test; do
        [ -f "$DATA/coco_karpathy_$split.json" ] || fetch_to "coco_karpathy_$split.json" \
            "$LAVIS_URL/coco_karpathy_$split.json" || return 1
    done
    for name in "${CAPTION_FILES[@]}"; do
        [ ! -f "$DATA/$name" ] || continue
        if [ -z "$archive" ]; then
            archive="$(try_fetch annotations_trainval2014.zip \
                http://images.cocodataset.org/annotations/annotations_trainval2014.zip)" || return 1
        fi
        if ! (extract_file "$archive" "$name"); then
            echo "   annotations_trainval2014.zip: no $name in it" >&2
            return 1
        fi
    done
    convert_split --from coco-karpathy "$DATA" --coco-captions "${CAPTION_FILES[@]/#/$DATA/}"
}

download() {
    stage download "$SPLIT" "$DATA/train2014" "$DATA/val2014" || return 0
    local archive folder
    for folder in val2014 train2014; do
        if [ ! -d "$DATA/$folder" ]; then
            archive="$(fetch "$folder.zip" "http://images.cocodataset.org/zips/$folder.zip")"
            extract_dir "$archive" "$folder"
        fi
    done
    check_image_count "$DATA/train2014" "$DATA/val2014"
    [ -f "$SPLIT" ] || split_from_karpathy || split_from_lavis || die "no source of $SPLIT_FILE answered \
(caption_datasets.zip, coco_karpathy_*.json, annotations_trainval2014.zip: above). The manual way:
  put Karpathy's $SPLIT_FILE in $DATA, or
  put coco_karpathy_train.json, coco_karpathy_val.json, coco_karpathy_test.json (BLIP/LAVIS) and
  ${CAPTION_FILES[*]} (from COCO's annotations_trainval2014.zip) in $DATA and run
    captioner data convert --from coco-karpathy $DATA --image-root $DATA --out $SPLIT
  then run this script again (or give --source DIR, a folder holding those files)"
}

recipe_main "$@"
