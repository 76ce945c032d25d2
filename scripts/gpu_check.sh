#!/usr/bin/env bash
# GPU checks in one go: the tests that need CUDA (JPEG decoding on the device, beam search
# replayed as a CUDA graph), decoder and caption benchmarks in fp32 and bf16 autocast, beam
# search and captioning with and without the CUDA graph, captioning with JPEGs decoded by PIL
# threads vs on the GPU, then a bf16-mixed `shapes` training run and its test-split evaluation.
#
#   bash scripts/gpu_check.sh [OUT_DIR]            # on a CUDA machine with captioner installed
#   DEVICE=cpu QUICK=1 bash scripts/gpu_check.sh   # a quick dry run of the same steps on the CPU
#
# Writes OUT_DIR/bench.jsonl (one JSON object per benchmark), OUT_DIR/fit.log and
# OUT_DIR/metrics.json. PYTHON picks the interpreter (default: python3); FIT=0 skips the training,
# DECODER=0 the decoder and precision benchmarks, JPEG=0 the PIL vs nvJPEG comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu_out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
EPOCHS=${EPOCHS:-40}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"

if [[ "${QUICK:-0}" == 1 ]]; then
  DEC=(--encoder-dim 64 --grid 4 --vocab 100 --batch 4 --embed-dim 32 --attention-dim 32 --decoder-dim 32 --repeats 1)
  CAP=(--encoder shapes_cnn --image-size 64 --images 4 --batch-size 2 --repeats 1)
  FIT_ARGS=(--data.shapes.num_images 80 --data.batch_size 16 --trainer.max_epochs 1 --trainer.limit_train_batches 2)
  EPOCHS=1
else
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
