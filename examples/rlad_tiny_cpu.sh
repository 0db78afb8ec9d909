#!/usr/bin/env bash
# The embedded default: a complete RLAD run on a 2-core CPU box in a few minutes, from nothing.
#   1. make two tiny random Qwen2 models over a char tokenizer (tools/make_tiny_model.py)
#   2. teacher: SFT on column-addition reasoning traces for longer (its held-out accuracy is printed at the end)
#   3. student: smaller, SFT briefly (-> a weak start)
#   4. RLAD (TRRD, alpha 0.5) on the student with the teacher colocated at TP=2 (student TP=1, DP=2),
#      rollouts from an in-process HF engine on each rank fed by the Megatron -> HF weight sync
#   5. held-out accuracy before and after, measured by this run (builtin sets are held out by construction,
#      data/partition.py; the run also prints the measured overlap: "held-out check: 0 of 256 eval prompts ...")
# Env: OUT (outputs/tiny), RL_ITERS (150), ALGO (rlad).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/tiny}
RL_ITERS=${RL_ITERS:-150}
ALGO=${ALGO:-rlad}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
PY=${PYTHON:-python}
START=$(date +%s)

COMMON=(--prompt-data builtin:addition --eval-data builtin:addition --eval-size 256 --no-chat-template
        --max-response-len 60)
SFT=(--algo sft --sft-source dataset --train-size 100000 --rollout-batch-size 64 --n-samples-per-prompt 1
     --micro-batch-size 64 --lr 3e-3 --lr-warmup-steps 20)

[[ -d $OUT/teacher_init ]] || $PY tools/make_tiny_model.py --out "$OUT/teacher_init" --size teacher --seed 1
[[ -d $OUT/student_init ]] || $PY tools/make_tiny_model.py --out "$OUT/student_init" --size student --seed 2

if [[ ! -d $OUT/teacher ]]; then
  echo "== teacher: SFT on reasoning traces (d=64, 2 layers)"
  $PY -m rlad_megatron.train "${COMMON[@]}" "${SFT[@]}" --student-hf "$OUT/teacher_init" --train-iters 1500 \
    --min-lr 3e-4 --lr-decay-style cosine --seed 1 --output-dir "$OUT/sft_teacher" --save-hf "$OUT/teacher"
fi
if [[ ! -d $OUT/student ]]; then
  echo "== student: short SFT (d=32, 2 layers)"
  $PY -m rlad_megatron.train "${COMMON[@]}" "${SFT[@]}" --student-hf "$OUT/student_init" --train-iters 1000 \
    --seed 2 --output-dir "$OUT/sft_student" --save-hf "$OUT/student"
fi

echo "== $ALGO on the student; teacher at TP=2 beside the student at TP=1 (2 ranks)"
$PY -m torch.distributed.run --standalone --nproc_per_node=2 -m rlad_megatron.train "${COMMON[@]}" \
  --algo "$ALGO" --student-hf "$OUT/student" --teacher-hf "$OUT/teacher" \
  --tensor-model-parallel-size 1 --teacher-tensor-model-parallel-size 2 \
  --rollout-batch-size 8 --n-samples-per-prompt 8 \
  --micro-batch-size 32 --num-updates-per-rollout 2 \
  --lr 1e-4 --lr-warmup-steps 10 --train-iters "$RL_ITERS" --eval-interval 50 --check-weight-sync \
  --output-dir "$OUT/$ALGO" --save "$OUT/$ALGO/ckpt" --save-interval "$RL_ITERS" --save-hf "$OUT/${ALGO}_student"

$PY - "$OUT/$ALGO/metrics.jsonl" "$OUT/sft_teacher/metrics.jsonl" "$(( $(date +%s) - START ))" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
evals = [r for r in rows if "eval/mean@1" in r]
teacher = [json.loads(line) for line in open(sys.argv[2])]
teacher = [r["eval/mean@1"] for r in teacher if "eval/mean@1" in r]
print(f"held-out accuracy (256 prompts, greedy): student before {evals[0]['eval/mean@1']:.3f} -> after "
      f"{evals[-1]['eval/mean@1']:.3f}; teacher {teacher[-1]:.3f}  ({len(rows)} log lines, total wall-clock {sys.argv[3]} s)")
PYEOF
