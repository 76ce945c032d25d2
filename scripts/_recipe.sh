# The stages of a whole training recipe, shared by scripts/train_flickr8k.sh and
# scripts/train_coco.sh (sourced; it defines functions and runs nothing itself).
#
# A data-set script sets DATASET, CE_CONFIG, SCST_CONFIG, SPLIT_FILE, IMAGE_ROOT (the images'
# folder in the data folder; empty: the data folder itself), IMAGES_EXPECTED (the image count the
# download must give) and DISK (what the run needs, printed first), defines `download` (the data
# set's archives and layout: the images, then the split file from the first source that answers)
# and `usage` (its own options, then `usage_common_options`), then calls
#   recipe_main "$@"
# which runs: download, data check, features, cross-entropy fit, SCST fit, evaluation of both on
# the test split, export (with --download-only: the download alone). Each stage is skipped when
# its output is there; an output appears only when its stage has finished (written under a
# temporary name and renamed, or marked done at the end), so a killed run is simply run again.
# Details: docs/training.md, "Whole recipes".
set -euo pipefail

RECIPE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAGE_NO=0
STAGES=8
DONE_FILE="recipe.done"  # a fit run's marker: written after `captioner fit` exits 0
# Karpathy's split files; reported 404 since 2023, so each data set has a second source
KARPATHY_URL=https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip

die() { echo "error: $*" >&2; exit 2; }

# The options every recipe takes after its data set's own (--source, --data, --no-features);
# $1: a sensible --data.num_workers for the example.
usage_common_options() {
    cat <<USAGE
  --download-only the download stage alone (the images and the split file; scripts/download_*.sh)
  --expect-images N  the image count the download must give (default $IMAGES_EXPECTED)
  --no-meteor     evaluate without METEOR (Java)
  -- SETTING...   config settings (--section.key value) for the feature extraction and both
                  fits (evaluation reads each run's config.yaml),
                  e.g. -- --trainer.precision bf16-mixed --data.num_workers $1
USAGE
}

abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

begin() { STAGE_NO=$((STAGE_NO + 1)); echo "== $STAGE_NO/$STAGES $1"; }
skip() { STAGE_NO=$((STAGE_NO + 1)); echo "== $STAGE_NO/$STAGES $1: skipped ($2)"; }

# stage NAME PATH...: skip stage NAME when every PATH exists; else begin it and return true.
stage() {
    local name="$1" path
    shift
    for path in "$@"; do
        if [ ! -e "$path" ]; then
            begin "$name"
            return 0
        fi
    done
    skip "$name" "already there: $*"
    return 1
}

recipe_parse() {
    SOURCE=""
    DATA="data/$DATASET"
    WORK="runs/$DATASET-recipe"
    FEATURES=1
    DOWNLOAD_ONLY=0
    EVAL_FLAGS=()
    SETTINGS=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --source|--data|--work|--expect-images)
                [ $# -ge 2 ] || die "$1 needs a value"
                case "$1" in
                    --source) SOURCE="$2" ;;
                    --data) DATA="$2" ;;
                    --work) WORK="$2" ;;
                    --expect-images)
                        case "$2" in ''|*[!0-9]*) die "--expect-images: a whole number, got '$2'" ;; esac
                        IMAGES_EXPECTED="$2" ;;
                esac
                shift 2 ;;
            --no-features) FEATURES=0; shift ;;
            --download-only) DOWNLOAD_ONLY=1; shift ;;
            --no-meteor) EVAL_FLAGS+=(--no-meteor); shift ;;
            -h|--help) usage; exit 0 ;;
            --) shift; SETTINGS=("$@"); break ;;
            *) usage >&2; die "unknown option: $1 (config settings go after --)" ;;
        esac
    done
    if [ -n "$SOURCE" ]; then
        [ -d "$SOURCE" ] || die "--source $SOURCE: not a folder"
        SOURCE="$(abspath "$SOURCE")"
    fi
    DATA="$(abspath "$DATA")"
    WORK="$(abspath "$WORK")"
}

# try_fetch NAME URL: the path of archive NAME: from --source when it is there, else downloaded into
# the data folder (resumed after an interruption: curl -C - on NAME.part, renamed when complete);
# when the download fails (a 404, no network, no curl), says so and returns 1.
try_fetch() {
    local name="$1" url="$2" status=0
    if [ -n "$SOURCE" ] && [ -f "$SOURCE/$name" ]; then
        echo "   $name: from $SOURCE" >&2
        echo "$SOURCE/$name"
        return
    fi
    if [ ! -f "$DATA/$name" ]; then
        [ -z "$SOURCE" ] || echo "   $name: not in $SOURCE, downloading" >&2
        if ! command -v curl >/dev/null; then
            echo "   $name: curl not found (install it, or put $name in a folder and give --source DIR)" >&2
            return 1
        fi
        echo "   $name: $url" >&2
        curl -fL --connect-timeout 30 --retry 5 --retry-delay 10 -C - -o "$DATA/$name.part" "$url" >&2 || status=$?
        if [ "$status" != 0 ]; then
            echo "   $name: download failed (curl exit $status)" >&2
            return 1
        fi
        mv "$DATA/$name.part" "$DATA/$name"
    fi
    echo "$DATA/$name"
}

# fetch NAME URL: try_fetch, for what has no other source (the images): stops the recipe when it fails.
fetch() {
    try_fetch "$@" || die "$1: not available from $2; put it in a folder and give --source DIR"
}

# fetch_to NAME URL: try_fetch, and NAME in the data folder (copied there from --source).
fetch_to() {
    local path
    path="$(try_fetch "$1" "$2")" || return 1
    [ "$path" = "$DATA/$1" ] || cp "$path" "$DATA/$1"
}

# check_image_count FOLDER...: the .jpg files in FOLDERs are IMAGES_EXPECTED, or the recipe stops.
check_image_count() {
    local found
    found="$(find "$@" -type f -iname '*.jpg' | wc -l | tr -d ' ')"
    if [ "$found" != "$IMAGES_EXPECTED" ]; then
        die "$found images in $*, but $DATASET has $IMAGES_EXPECTED: an archive is incomplete or not" \
            "$DATASET's; delete $* (and the image archives) and run again (--expect-images N for another count)"
    fi
    echo "   $found images in $*"
}

# split_from_karpathy: the split file from Karpathy's caption_datasets.zip; 1 when it is not to be had.
split_from_karpathy() {
    local archive
    archive="$(try_fetch caption_datasets.zip "$KARPATHY_URL")" || return 1
    # in a subshell: an archive without the file (or not a zip) is a failed source, not the end
    if ! (extract_file "$archive" "$SPLIT_FILE"); then
        echo "   caption_datasets.zip: no $SPLIT_FILE in it" >&2
        return 1
    fi
}

# convert_split ARG...: `captioner data convert ARG... --image-root IMAGES --out SPLIT`, its report in
# DATA/convert-report.txt; an image of the split missing from IMAGES stops the recipe (duplicate and
# empty captions are dropped and named in the report).
convert_split() {
    local cmd=(captioner data convert "$@" --image-root "$IMAGES" --out "$SPLIT" --tokenizer simple --allow-missing)
    echo "   ${cmd[*]}"
    "${cmd[@]}" > "$DATA/convert-report.txt" || die "${cmd[*]} failed (above)"
    sed 's/^/   /' "$DATA/convert-report.txt"
    if grep -q '^dropped, missing image: ' "$DATA/convert-report.txt"; then
        rm -f "$SPLIT"
        die "$(grep -c '^dropped, missing image: ' "$DATA/convert-report.txt") image(s) of the split are not in" \
            "$IMAGES (listed in $DATA/convert-report.txt): mend the image folder and run again"
    fi
}

# unzip_to ARCHIVE DEST [PATTERN]: unzip ARCHIVE (its members matching PATTERN) into DEST; with
# Python's zipfile where there is no unzip.
unzip_to() {
    if command -v unzip >/dev/null; then
        local status=0
        unzip -q -o "$1" ${3:+"$3"} -d "$2" || status=$?
        [ "$status" -le 1 ] || die "unzip $1 failed (exit $status)"  # 1: warnings only
        return
    fi
    command -v python3 >/dev/null || die "neither unzip nor python3 found: install unzip"
    python3 - "$1" "$2" "${3:-*}" <<'PY' || die "unzipping $1 failed"
import fnmatch
import sys
import zipfile

archive, dest, pattern = sys.argv[1:]
with zipfile.ZipFile(archive) as z:
    z.extractall(dest, [m for m in z.namelist() if fnmatch.fnmatch(m, pattern)])
PY
}

# extract_dir ARCHIVE FOLDER: the archive's top-level FOLDER as $DATA/FOLDER, moved there whole.
extract_dir() {
    local archive="$1" folder="$2" tmp="$DATA/.$2.unzip"
    echo "   unzipping $(basename "$archive") -> $DATA/$folder" >&2
    rm -rf "$tmp"
    mkdir -p "$tmp"
    unzip_to "$archive" "$tmp"
    [ -d "$tmp/$folder" ] || die "$archive: no $folder/ in it (found: $(ls "$tmp" | tr '\n' ' '))"
    mv "$tmp/$folder" "$DATA/$folder"
    rm -rf "$tmp"
}

# extract_file ARCHIVE NAME: the archive's file NAME (in any folder of it) as $DATA/NAME.
extract_file() {
    local archive="$1" name="$2" tmp="$DATA/.$2.unzip"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    unzip_to "$archive" "$tmp" "*$name"
    local found
    found="$(find "$tmp" -name "$name" -type f | head -n 1)"
    [ -n "$found" ] || die "$archive: no $name in it"
    mv "$found" "$DATA/$name"
    rm -rf "$tmp"
}

# best_checkpoint RUN: best.ckpt (best validation CIDEr-D), or last.ckpt when the run never validated.
best_checkpoint() {
    if [ -f "$1/checkpoints/best.ckpt" ]; then
        echo "$1/checkpoints/best.ckpt"
    elif [ -f "$1/checkpoints/last.ckpt" ]; then
        echo "   $1 has no best.ckpt (it never validated): using last.ckpt" >&2
        echo "$1/checkpoints/last.ckpt"
    else
        die "$1/checkpoints holds no checkpoint"
    fi
}

# fit RUN CONFIG [ARG...]: `captioner fit` into RUN, resumed from its last.ckpt after a kill;
# RUN/recipe.done (the command) marks it finished.
fit() {
    local run="$1" config="$2"
    shift 2
    local cmd=(captioner fit --config "$config" "${DATA_ARGS[@]}" --trainer.default_root_dir "$run" "$@"
               ${SETTINGS[@]+"${SETTINGS[@]}"})
    if [ -f "$run/checkpoints/last.ckpt" ]; then
        echo "   resuming from $run/checkpoints/last.ckpt"
        cmd+=(--ckpt_path "$run/checkpoints/last.ckpt")
    fi
    echo "   ${cmd[*]}"
    "${cmd[@]}"
    printf '%s\n' "${cmd[*]}" > "$run/$DONE_FILE"
}

# evaluate_stage NAME RUN OUT: the run's model on the test split -> OUT (metrics.json, results.json,
# summary.md, curves, attention figures), written in OUT.tmp and renamed when complete.
evaluate_stage() {
    local name="$1" run="$2" out="$3"
    stage "$name" "$out" || return 0
    local ckpt
    ckpt="$(best_checkpoint "$run")"
    rm -rf "$out.tmp"
    local cmd=(captioner evaluate --checkpoint "$ckpt" --split test --report "$out.tmp"
               --results "$out.tmp/results.json" ${EVAL_FLAGS[@]+"${EVAL_FLAGS[@]}"})
    echo "   ${cmd[*]}"
    "${cmd[@]}"
    mv "$out.tmp" "$out"
}

recipe_main() {
    recipe_parse "$@"
    if ! command -v captioner >/dev/null; then
        # shellcheck source=scripts/_venv.sh
        source "$RECIPE_ROOT/scripts/_venv.sh"
        ensure_venv hub
    fi
    mkdir -p "$DATA"
    [ "$DOWNLOAD_ONLY" = 1 ] || mkdir -p "$WORK"
    SPLIT="$DATA/$SPLIT_FILE"
    IMAGES="$DATA${IMAGE_ROOT:+/$IMAGE_ROOT}"
    local features="$WORK/features" ce="$WORK/ce" scst="$WORK/scst" model="$WORK/captioner-$DATASET"
    local karpathy=(--data.karpathy.split_file "$SPLIT" --data.karpathy.image_root "$IMAGES")
    DATA_ARGS=("${karpathy[@]}")
    [ "$FEATURES" = 0 ] || DATA_ARGS+=(--data.feature_cache "$features")
    if [ "$DOWNLOAD_ONLY" = 1 ]; then
        echo "recipe $DATASET, the download alone: data in $DATA"
    else
        echo "recipe $DATASET: data in $DATA, runs in $WORK"
    fi
    echo "disk: $DISK"

    download
    if [ "$DOWNLOAD_ONLY" = 1 ]; then
        echo "done: $SPLIT, images in $IMAGES"
        return 0
    fi

    if stage "data check" "$WORK/data-check.txt"; then
        echo "   captioner data check --karpathy-json $SPLIT --image-root $IMAGES"
        if ! captioner data check --karpathy-json "$SPLIT" --image-root "$IMAGES" | tee "$WORK/data-check.txt.tmp"; then
            die "the data check found problems (above); mend them and run again"
        fi
        mv "$WORK/data-check.txt.tmp" "$WORK/data-check.txt"
    fi

    if [ "$FEATURES" = 0 ]; then
        skip features "--no-features: training reads the images"
    elif grep -Eqs '"complete": *true' "$features/index.json"; then
        skip features "$features is complete"
    else
        begin features
        # resumable: the finished shards of an interrupted extraction are kept
        local cmd=(captioner features extract --config "$CE_CONFIG" --out "$features" "${karpathy[@]}"
                   ${SETTINGS[@]+"${SETTINGS[@]}"})
        echo "   ${cmd[*]}"
        "${cmd[@]}"
    fi

    if stage "cross-entropy training" "$ce/$DONE_FILE"; then
        fit "$ce" "$CE_CONFIG"
    fi
    local ckpt
    if stage "SCST fine-tuning" "$scst/$DONE_FILE"; then
        ckpt="$(best_checkpoint "$ce")"
        fit "$scst" "$SCST_CONFIG" --model.init_from "$ckpt"
    fi
    evaluate_stage "evaluate the cross-entropy model" "$ce" "$WORK/eval-ce"
    evaluate_stage "evaluate the SCST model" "$scst" "$WORK/eval-scst"

    if stage export "$model"; then
        ckpt="$(best_checkpoint "$scst")"
        # written in a hidden temporary folder and renamed: a killed export leaves no $model
        echo "   captioner export --checkpoint $ckpt --out $model --metrics $WORK/eval-scst/metrics.json"
        captioner export --checkpoint "$ckpt" --out "$model" --metrics "$WORK/eval-scst/metrics.json"
    fi

    echo "done: test-split scores in $WORK/eval-ce/summary.md (cross-entropy) and"
    echo "      $WORK/eval-scst/summary.md (SCST); caption with: captioner caption --checkpoint $model photos/"
}
