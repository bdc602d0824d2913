#!/usr/bin/env bash
# Device run of issue 4: the SC09-style audio recipe (6.2M parameters, 1 s clips, 16 kHz mu-law,
# clip-aligned windows of 16000) trained with the CUDA scan on a folder of 1-second clips; prints the
# training throughput in samples per second, the validation figure, then a streaming eval and 4
# generated clips (WAV + PNG + samples.json under $OUT/gen).
#
# Run from the repository root on the GPU machine, carrying the soundfile wheels and the data:
#   (here, once)  bash ../shared/tools/device-wheels.sh          # fills .whl/ (git-ignored)
#                 cp -r ../shared/data/audio/digits_synth _data   # ~22 MB; or only train/ + valid/
#   run: carry [".whl", "_data"], command:
#     bash scripts/device_sc09.sh _data/train _data/valid [STEPS]
# Env: STEPS (default 300), BATCH (16), GEN (1: generate afterwards), OUT (where results go back).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bytemamba_out}
TRAIN=${1:?usage: bash scripts/device_sc09.sh TRAIN_FOLDER [VALID_FOLDER] [STEPS]}
VALID=${2:-}
STEPS=${3:-${STEPS:-300}}
BATCH=${BATCH:-16}
RUN=/tmp/bytemamba_sc09_run
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target _site .whl/*.whl \
  || { echo "device_sc09: installing the soundfile wheels from .whl/ failed (carry .whl)"; exit 1; }
export PYTHONPATH=$PWD/_site:$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader | tee "$OUT/gpu.txt"
[ -d "$TRAIN" ] || { echo "device_sc09: no data folder $TRAIN (carry it)"; exit 1; }
echo "train files: $(find "$TRAIN" -type f | wc -l)${VALID:+, valid files: $(find "$VALID" -type f | wc -l)}"
rm -rf "$RUN"
python3 -m bytemamba train recipes/audio_sc09.toml \
  data.path="$TRAIN" audio.val_path="$VALID" audio.cache_dir=/tmp/bytemamba_audio_cache \
  model.scan_backend=cuda train.device=cuda train.max_steps="$STEPS" train.batch_size="$BATCH" \
  train.out_dir="$RUN" train.log_every=25 train.eval_every="$STEPS" train.save_every="$STEPS" \
  train.eval_batches=8 train.trackers=none optim.warmup_steps=50 2>&1 | tr '\r' '\n' \
  | grep -v '^\s*$' | grep -vE '^\s*[0-9]+%\|' | tee "$OUT/train.log" | tail -20
cp "$RUN"/result.json "$RUN"/metrics.jsonl "$RUN"/config.toml "$OUT"/ 2>/dev/null
python3 - "$RUN/result.json" "$STEPS" "$BATCH" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
sps = r.get("train/symbols_per_second", float("nan"))
print(f"SC09-style recipe, {sys.argv[2]} steps, batch {sys.argv[3]} x 16000: "
      f"{sps:,.0f} samples/second (training, last log window; 1 sample = 1 mu-law symbol), "
      f"validation {r['val_bits_per_symbol']:.4f} bits per sample")
PY
if [ -n "$VALID" ]; then
  python3 -m bytemamba eval "$RUN/model" --data "$VALID" --window 16384 2>&1 | tr '\r' '\n' | tail -1 | tee "$OUT/eval.txt"
fi
if [ "${GEN:-1}" = 1 ]; then
  T0=$SECONDS
  python3 -m bytemamba generate "$RUN/model" --audio --seconds 1 --num-samples 4 --out "$OUT/gen" \
    --temperature 1.0 2>&1 | tr '\r' '\n' | grep -vE 'sample/s\]$' | tail -8
  echo "generate: 4 x 1 s in $((SECONDS - T0)) s wall (model load + CUDA graphs included)"
fi
