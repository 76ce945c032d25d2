#!/usr/bin/env bash
# GPU checks in one go: the tests that need CUDA (JPEG decoding on the device, beam search
# replayed as a CUDA graph), decoder and caption benchmarks in fp32 and bf16 autocast, beam
# search and captioning with and without the CUDA graph, captioning with JPEGs decoded by PIL
# threads vs on the GPU, a bf16-mixed `shapes` training run and its test-split evaluation, and
# the figures of issue 31 (bulk captioning at scale): `caption` end to end against the encoder
# alone at batch 64 (goal: at most 1.25x) and its images/s, the time per epoch of `fit` on a
# COCO-sized synthetic split from the feature cache and from JPEG files (50 timed steps after 10,
# extrapolated to the 8,851 steps of a COCO epoch), and the peak GPU memory of each.
#
#   bash scripts/gpu_check.sh [OUT_DIR]               # everything, on a CUDA machine
#   bash scripts/gpu_check.sh --scale-only [OUT_DIR]  # issue 31's figures only (meant to fit in ~8 min on an H100)
#   DEVICE=cpu QUICK=1 bash scripts/gpu_check.sh      # a quick dry run of the same steps on the CPU
#
# Writes OUT_DIR/bench.jsonl (one JSON object per benchmark), OUT_DIR/fit.log,
# OUT_DIR/metrics.json and OUT_DIR/scale.txt (issue 31's figures with the card's name). PYTHON
# picks the interpreter (default: python3); FIT=0 skips the training, DECODER=0 the decoder and
# precision benchmarks, JPEG=0 the PIL vs nvJPEG comparison, SCALE=0 issue 31's figures. Without a
# CUDA GPU (and DEVICE=cuda, the default) it stops at once with one line and status 2.
set -euo pipefail
cd "$(dirname "$0")/.."
ONLY_SCALE=0
OUT_DIR=
for arg in "$@"; do
  case "$arg" in
    --scale-only) ONLY_SCALE=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (--scale-only, --help)" >&2; exit 2 ;;
    *) [[ -z "$OUT_DIR" ]] || { echo "gpu_check.sh: one OUT_DIR at most, got $OUT_DIR and $arg" >&2; exit 2; }
       OUT_DIR=$arg ;;
  esac
done
OUT_DIR=${OUT_DIR:-gpu_out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
EPOCHS=${EPOCHS:-40}
export PYTHONUNBUFFERED=1
if [[ "$DEVICE" == cuda ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check.sh: no CUDA GPU here (torch.cuda.is_available() is false with $PY): run it on a GPU machine, or DEVICE=cpu QUICK=1 for a dry run" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"

if [[ "${QUICK:-0}" == 1 ]]; then
  SCALE_CAP=(--encoder shapes_cnn --image-size 64 --images 8 --batch-size 4 --repeats 1)
  SCALE_FIT=(--encoder resnet50 --image-size 64 --images 16 --distinct 4 --warmup 1 --steps 2 --batch-size 4
             --num-workers 0 --source-size 80x60)
  DEC=(--encoder-dim 64 --grid 4 --vocab 100 --batch 4 --embed-dim 32 --attention-dim 32 --decoder-dim 32 --repeats 1)
  CAP=(--encoder shapes_cnn --image-size 64 --images 4 --batch-size 2 --repeats 1)
  FIT_ARGS=(--data.shapes.num_images 80 --data.batch_size 16 --trainer.max_epochs 1 --trainer.limit_train_batches 2)
  EPOCHS=1
else
  SCALE_CAP=(--images 1024 --batch-size 64 --repeats 3)
  SCALE_FIT=(--images 4096 --distinct 512 --warmup 10 --steps 50 --batch-size 64 --num-workers 8)
  DEC=(--repeats 5)
  CAP=(--images 256 --batch-size 64 --repeats 3)
  FIT_ARGS=()
fi
if [[ "$DEVICE" == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
  ACCEL=(--trainer.accelerator gpu --trainer.precision bf16-mixed)
else
  ACCEL=(--trainer.accelerator cpu)
fi

# Issue 31 first, so that a run cut short still has them: caption vs the encoder alone (as
# `captioner caption` reads JPEGs: on the device when it is a GPU), then fit from the cache and
# from JPEGs; scale.txt sums them up with the card's name.
if [[ "${SCALE:-1}" == 1 ]]; then
  : >"$OUT_DIR/scale.jsonl"
  "$PY" scripts/benchmark.py caption --device "$DEVICE" "${SCALE_CAP[@]}" --json | tee -a "$OUT_DIR/scale.jsonl"
  for source in cache jpeg; do
    "$PY" scripts/benchmark.py epoch --device "$DEVICE" --source "$source" "${SCALE_FIT[@]}" --json \
      2>>"$OUT_DIR/scale.log" | tee -a "$OUT_DIR/scale.jsonl"
  done
  "$PY" - "$OUT_DIR/scale.jsonl" <<'PYEOF' | tee "$OUT_DIR/scale.txt"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
cap = next(r for r in rows if r.get("benchmark") == "caption")
fits = {r["settings"]["source"]: r for r in rows if r.get("benchmark") == "epoch"}
m = cap["machine"]
mb = lambda v: "n/a" if v is None else f"{v:,.0f} MB"
print(f"card: {m.get('gpu') or m['cpu']} (torch {m['torch']}, {m['cpu_count']} CPU cores)")
print(f"caption end to end / encoder alone: {cap['ratio']:.2f}x (goal <= 1.25x; "
      f"{cap['caption_ms_per_image']:.2f} vs {cap['encoder_ms_per_image']:.2f} ms per image, median of "
      f"{cap['settings']['repeats']} alternating rounds)")
print(f"caption at batch {cap['settings']['batch_size']}: {1000 / cap['caption_ms_per_image']:,.1f} images/s "
      f"({cap['settings']['images']} JPEGs of {cap['settings']['source_size']}, beam {cap['settings']['beam_size']}, "
      f"JPEGs decoded on the device: {cap['jpeg_on_device']}); peak GPU memory {mb(cap['peak_gpu_mb'])}")
for source, r in fits.items():
    s = r["settings"]
    print(f"fit from {source}: {r['s_per_step'] * 1000:.1f} ms per step of {s['batch_size']} -> "
          f"{r['coco_epoch_min']:.1f} min per COCO epoch ({r['coco_epoch_steps']:,} steps, extrapolated from "
          f"{r['timed_steps']} steps after {s['warmup']}); peak GPU memory {mb(r['peak_gpu_mb'])}"
          + (f"; features extract {r['extract_images_per_s']:.0f} images/s with start-up" if source == "cache" else ""))
PYEOF
fi
[[ "$ONLY_SCALE" == 0 ]] || exit 0

"$PY" -m pytest -q -s -p no:cacheprovider tests/test_jpeg.py tests/test_decoding.py 2>&1 | tee "$OUT_DIR/pytest.log" | grep -E "decode|preprocessed|passed|failed|FAIL" \
  || echo "CUDA tests failed: $OUT_DIR/pytest.log"

: >"$OUT_DIR/bench.jsonl"
if [[ "${DECODER:-1}" == 1 ]]; then
  for precision in fp32 bf16; do
    "$PY" scripts/benchmark.py decoder --device "$DEVICE" --precision "$precision" "${DEC[@]}" --json | tee -a "$OUT_DIR/bench.jsonl"
    "$PY" scripts/benchmark.py caption --device "$DEVICE" --precision "$precision" "${CAP[@]}" --json | tee -a "$OUT_DIR/bench.jsonl"
  done
fi
# beam search replayed as a CUDA graph (auto) vs kernels launched one by one (off)
for graph in auto off; do
  "$PY" scripts/benchmark.py decoder --device "$DEVICE" "${DEC[@]}" --only beam --cuda-graph "$graph" --json | tee -a "$OUT_DIR/bench.jsonl"
  "$PY" scripts/benchmark.py caption --device "$DEVICE" "${CAP[@]}" --num-workers 4 --jpeg-decode device --cuda-graph "$graph" --json | tee -a "$OUT_DIR/bench.jsonl"
done
# JPEGs decoded by PIL on reader threads vs by torchvision on the device (nvJPEG on a GPU)
if [[ "${JPEG:-1}" == 1 ]]; then
  for decode in cpu device; do
    for workers in 4 8; do
      "$PY" scripts/benchmark.py caption --device "$DEVICE" "${CAP[@]}" --num-workers "$workers" --jpeg-decode "$decode" --json | tee -a "$OUT_DIR/bench.jsonl"
    done
  done
fi

[[ "${FIT:-1}" == 1 ]] || exit 0
run=runs/gpu-check
rm -rf "$run"
start=$(date +%s)
"$PY" -m captioner.cli fit --config configs/shapes.yaml "${ACCEL[@]}" --trainer.max_time null \
  --trainer.max_epochs "$EPOCHS" --early_stopping.patience 1000 --trainer.enable_progress_bar false \
  --trainer.default_root_dir "$run" --trainer.logger false \
  --data.shapes.data_dir "$run/data" "${FIT_ARGS[@]}" 2>&1 | tee "$OUT_DIR/fit.log" | grep -v "^\s*$" | tail -n 5
echo "fit: $(( $(date +%s) - start )) s for $EPOCHS epochs" | tee -a "$OUT_DIR/fit.log"
"$PY" -m captioner.cli evaluate --checkpoint "$run/checkpoints/best.ckpt" \
  --split test --device "$DEVICE" --output "$OUT_DIR/metrics.json" 2>&1 | tail -n 20
