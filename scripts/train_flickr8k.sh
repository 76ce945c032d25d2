#!/usr/bin/env bash
# Flickr8k, the whole recipe: download -> data check -> features -> cross-entropy training
# (configs/flickr8k.yaml) -> SCST fine-tuning (configs/flickr8k-scst.yaml) -> evaluation of both on
# the test split -> export of the SCST model as a model folder with its card. Each stage is skipped
# when its output is there, so a killed run is simply run again. Details: docs/training.md,
# "Whole recipes"; needs about 8.7 GB of disk (1.1 GB download, 1.1 GB of images, 6.5 GB of
# features, reserved whole when extraction starts). The split file comes from the first source
# that answers: Karpathy's caption_datasets.zip, else the Flickr8k text archive of the images'
# release (Flickr8k.token.txt and the split lists, through `captioner data convert --from flickr8k`).
#
#   scripts/train_flickr8k.sh                               downloads into data/flickr8k, runs into runs/flickr8k-recipe
#   scripts/train_flickr8k.sh --source /mnt/archives        Flickr8k_Dataset.zip, Flickr8k_text.zip, caption_datasets.zip from there
#   scripts/train_flickr8k.sh -- --trainer.precision bf16-mixed --data.num_workers 8   settings of the features and both fits
source "$(dirname "$0")/_recipe.sh"

usage() {
    cat <<USAGE
usage: scripts/train_flickr8k.sh [--source DIR] [--data DIR] [--work DIR] [--no-features] [--no-meteor] [--download-only] [--expect-images N] [-- SETTING...]
  --source DIR    a folder holding Flickr8k_Dataset.zip, Flickr8k_text.zip and/or caption_datasets.zip:
                  used instead of downloading them
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
IMAGES_EXPECTED=8091
RELEASE=https://github.com/jbrownlee/Datasets/releases/download/Flickr8k
TEXT_FILES=(Flickr8k.token.txt Flickr_8k.trainImages.txt Flickr_8k.devImages.txt Flickr_8k.testImages.txt)
DISK="about 8.7 GB: 1.1 GB of archives, 1.1 GB of images, 6.5 GB of features (8,091 x 802,816 B;
      extraction reserves the whole cache at its start and never needs more); 2.2 GB with --no-features"

# split_from_text: the split file from the text archive of the images' release; 1 when it is not to be had.
split_from_text() {
    local archive name
    archive="$(try_fetch Flickr8k_text.zip "$RELEASE/Flickr8k_text.zip")" || return 1
    for name in "${TEXT_FILES[@]}"; do
        if [ ! -f "$DATA/$name" ] && ! (extract_file "$archive" "$name"); then
            echo "   Flickr8k_text.zip: no $name in it" >&2
            return 1
        fi
    done
    convert_split --from flickr8k "$DATA/Flickr8k.token.txt"
}

download() {
    stage download "$SPLIT" "$IMAGES" || return 0
    local archive
    if [ ! -d "$IMAGES" ]; then
        archive="$(fetch Flickr8k_Dataset.zip "$RELEASE/Flickr8k_Dataset.zip")"
        extract_dir "$archive" "$IMAGE_ROOT"
    fi
    check_image_count "$IMAGES"
    [ -f "$SPLIT" ] || split_from_karpathy || split_from_text || die "no source of $SPLIT_FILE answered \
(caption_datasets.zip, Flickr8k_text.zip: above). The manual way:
  put Karpathy's $SPLIT_FILE in $DATA, or
  put ${TEXT_FILES[*]} (from Flickr8k_text.zip) in $DATA and run
    captioner data convert --from flickr8k $DATA/Flickr8k.token.txt --image-root $IMAGES --out $SPLIT
  then run this script again (or give --source DIR, a folder holding caption_datasets.zip or Flickr8k_text.zip)"
}

recipe_main "$@"
