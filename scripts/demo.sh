#!/usr/bin/env bash
# The whole job on the embedded `shapes` data set, offline, on CPU or GPU:
# generate data -> train -> caption test images -> attention figures -> evaluate.
#
#   scripts/demo.sh                       (trains once; a second run reuses the checkpoint)
#   DEMO_RETRAIN=1 scripts/demo.sh        train again
#   DEMO_MAX_TIME=00:00:10:00 scripts/demo.sh   training budget (dd:hh:mm:ss; default 2 minutes)
#   DEMO_CONFIG=shapes-hard scripts/demo.sh     hard attention (or shapes-multihead)
#   DEMO_NO_VENV=1 scripts/demo.sh        use the captioner already on PATH (your own environment)
#
# Outputs: data/shapes/ (data set), runs/shapes/checkpoints/best.ckpt (best model on validation
# CIDEr-D; runs/<DEMO_CONFIG>/... for another config), demo_out/captions.jsonl,
# demo_out/attention/*.png, demo_out/report/ (metrics, summary).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${DEMO_NO_VENV:-0}" = 1 ]; then
    command -v captioner >/dev/null || { echo "DEMO_NO_VENV=1: no captioner on PATH" >&2; exit 2; }
else
    source scripts/_venv.sh
    ensure_venv serve
fi

MAX_TIME="${DEMO_MAX_TIME:-00:00:02:00}"  # the time-to-quality budget (docs/results.md)
CONFIG="${DEMO_CONFIG:-shapes}"
[ -f "configs/$CONFIG.yaml" ] || { echo "DEMO_CONFIG: no configs/$CONFIG.yaml" >&2; exit 2; }
CKPT="runs/$CONFIG/checkpoints/best.ckpt"  # the configs write their runs under runs/<name>
OUT=demo_out
has() { captioner --help 2>/dev/null | grep -qE "^\s+$1\b|[{,]$1[,}]"; }

echo "== 1. data: the synthetic shapes data set (data/shapes)"
if [ ! -f data/shapes/dataset.json ]; then
    captioner shapes --out data/shapes --num-images 4000 --seed 0 --image-size 64
else
    echo "   data/shapes exists"
fi

echo "== 2. train: configs/$CONFIG.yaml (budget $MAX_TIME)"
if [ ! -f "$CKPT" ] || [ "${DEMO_RETRAIN:-0}" = 1 ]; then
    rm -rf "runs/$CONFIG"
    captioner fit --config "configs/$CONFIG.yaml" --trainer.max_time "$MAX_TIME"
else
    echo "   $CKPT exists (DEMO_RETRAIN=1 to train again)"
fi
echo "   best checkpoint: $CKPT"

mkdir -p "$OUT"
mapfile -t SAMPLES < <(python - <<'PY'
import json
d = json.load(open("data/shapes/dataset.json"))
test = [im["filename"] for im in d["images"] if im["split"] == "test"][:6]
print("\n".join(f"data/shapes/images/{f}" for f in test))
PY
)

if has caption; then
    echo "== 3. caption: ${#SAMPLES[@]} test images (beam 3) -> $OUT/captions.jsonl"
    captioner caption --checkpoint "$CKPT" --beam-size 3 --json "${SAMPLES[@]}" | tee "$OUT/captions.jsonl"
    echo "   the same images as JPEGs: on a GPU decoded there by TorchCodec when it is installed"
    echo "   (pip install 'captioner[torchcodec]'), else by PIL: $OUT/jpeg/"
    mkdir -p "$OUT/jpeg"
    python - "$OUT/jpeg" "${SAMPLES[@]}" <<'PY'
import sys
from pathlib import Path

from PIL import Image

for p in sys.argv[2:]:
    Image.open(p).convert("RGB").save(Path(sys.argv[1]) / f"{Path(p).stem}.jpg", quality=95)
PY
    captioner caption --checkpoint "$CKPT" --beam-size 3 --jpeg-decode auto "$OUT"/jpeg/*.jpg
    echo "   the same PNGs decoded with int8 weights on the CPU (--quantize int8) -> $OUT/captions-int8.jsonl"
    captioner caption --checkpoint "$CKPT" --beam-size 3 --quantize int8 --device cpu --json "${SAMPLES[@]}" \
        > "$OUT/captions-int8.jsonl"
    python - "$OUT/captions.jsonl" "$OUT/captions-int8.jsonl" <<'PY'
import json
import sys

fp32, int8 = ([json.loads(line) for line in open(p)] for p in sys.argv[1:])
same = sum(a["caption"] == b["caption"] for a, b in zip(fp32, int8))
print(f"   int8 gives the fp32 caption for {same} of {len(fp32)} images")
PY
fi

if has attend; then
    echo "== 4. attend: per-word attention figures -> $OUT/attention/"
    mkdir -p "$OUT/attention"
    for img in "${SAMPLES[@]:0:3}"; do
        name="$(basename "$img" .png)"
        captioner attend --checkpoint "$CKPT" "$img" --output "$OUT/attention/$name.png" --beam-size 3
    done
fi

if has evaluate; then
    echo "== 5. evaluate: shapes test split (captions, attention correctness) -> $OUT/report/"
    captioner evaluate --checkpoint "$CKPT" --config "configs/$CONFIG.yaml" --split test \
        --model.decoding.beam_size 3 \
        --output "$OUT/metrics.json" --results "$OUT/results.json" --report "$OUT/report"
fi

if has serve; then
    echo "== 6. see it in the browser:"
    echo "   captioner serve --checkpoint $CKPT    # then open http://127.0.0.1:8000/"
fi
