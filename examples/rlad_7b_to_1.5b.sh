#!/usr/bin/env bash
# RLAD (TRRD, alpha 0.5): DeepSeek-R1-Distill-Qwen-7B teacher -> DeepSeek-R1-Distill-Qwen-1.5B student.
# Multi-node: run this same script on every node with NNODES, NODE_RANK, MASTER_ADDR (and optionally
# GPUS_PER_NODE, MASTER_PORT) set. TASK=kk (Knights & Knaves, default) or TASK=math.
# DRY_RUN=1 validates every flag on any machine (CPU included) without loading models.
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TASK=${TASK:-kk}
WORK=${WORK:-/data/rlad}
STUDENT_HF=${STUDENT_HF:-$WORK/hf/DeepSeek-R1-Distill-Qwen-1.5B}
TEACHER_HF=${TEACHER_HF:-$WORK/hf/DeepSeek-R1-Distill-Qwen-7B}
RUN=${RUN:-$WORK/runs/rlad_7b_to_1.5b_$TASK}

# ---- 1. HF -> Megatron (once; resharding on load means any TP/PP can read these) -------------------
# Teacher and student are converted at their training layouts; skipped when already there.
if [[ "${DRY_RUN:-0}" != 1 && "$NODE_RANK" == 0 ]]; then
  for pair in "student:$STUDENT_HF:1" "teacher:$TEACHER_HF:2"; do
    IFS=: read -r who hf tp <<<"$pair"
    [[ -d $WORK/mcore/$who ]] || torchrun --nproc_per_node="$tp" tools/convert_hf_to_megatron.py \
      --hf-dir "$hf" --save "$WORK/mcore/$who" --tensor-model-parallel-size "$tp" --bf16
  done
fi

# ---- 2. the RL job ----------------------------------------------------------------------------------
# Models: Megatron checkpoints from step 1; tokenizers must match (checked at start-up).
MODEL_ARGS=(
  --student-load "$WORK/mcore/student" --teacher-load "$WORK/mcore/teacher" --tokenizer "$STUDENT_HF"
  --bf16 --transformer-impl transformer_engine
)
# Parallelism: 1.5B student TP1 (pure DP); 7B teacher TP2 on its own groups, colocated on the same GPUs.
PARALLEL_ARGS=(
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
  --teacher-tensor-model-parallel-size 2 --teacher-pipeline-model-parallel-size 1
  --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
)
# Method (paper): TRRD alpha 0.5, clip 0.2 / 0.28, teacher log-ratio clamp 1, group size 8.
RLAD_ARGS=(
  --algo rlad --alpha 0.5 --eps-clip-low 0.2 --eps-clip-high 0.28 --teacher-clamp 1.0
  --loss-agg seq-mean-token-mean
)
# Optimisation (paper): lr 1e-6, global batch 256 sequences per optimizer step. Micro-batches are packs of whole
# sequences of at most 16K tokens (no compute on padding), balanced over the 32 DP ranks by token count; the packs
# are padded to TP x 128 tokens for Transformer Engine's THD attention and FP8.
TRAIN_ARGS=(
  --train-iters 500 --lr 1e-6 --min-lr 1e-6 --lr-warmup-steps 10 --clip-grad 1.0 --weight-decay 0.01
  --use-dynamic-batch-size --max-tokens-per-gpu 16384 --global-batch-size 256 --num-updates-per-rollout 1
  --use-distributed-optimizer
  --seed 42
)
# Rollouts: colocated SGLang, one engine per GPU (ROLLOUT_GPUS_PER_ENGINE=1: 32 engines on 4 x 8 GPUs; 4: 8 engines of
# TP 4), prompt groups handed to whichever engine is free; 32 prompts x 8 samples = 256 sequences, 8K responses, T = 1.
ROLLOUT_ARGS=(
  --rollout-engine sglang --rollout-num-gpus-per-engine "${ROLLOUT_GPUS_PER_ENGINE:-1}" --rollout-chunk-groups 1
  --distributed-timeout-minutes 60 --rollout-batch-size 32 --n-samples-per-prompt 8
  --rollout-temperature 1.0 --rollout-top-p 1.0 --max-response-len 8192
  --update-weight-buffer-size $((512 * 1024 * 1024)) --dynamic-sampling
  --sglang-mem-fraction-static 0.6
)
# FP8 training through Transformer Engine (Hopper); BF16 weights are pushed to SGLang.
FP8_ARGS=(--fp8-format e4m3 --fp8-recipe blockwise)
# Data and rewards: K&K logic (reasoning-gym generator, offline) or a math JSONL with \boxed answers.
if [[ $TASK == kk ]]; then
  DATA_ARGS=(--prompt-data builtin:knights_knaves --eval-data builtin:knights_knaves --eval-size 700
             --reward knights_knaves)
else
  DATA_ARGS=(--prompt-data "$WORK/data/math_train.jsonl" --eval-data "$WORK/data/aime24.jsonl" --reward math
             --eval-samples 32 --eval-temperature 0.6 --reward-workers 16)
fi
# Evaluation, checkpoints, logging.
LOG_ARGS=(
  --eval-interval 20 --save "$RUN/ckpt" --save-interval 20 --load "$RUN/ckpt"
  --output-dir "$RUN" --tensorboard-dir "$RUN/tb" --save-hf "$RUN/hf_final"
)

ARGS=("${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${RLAD_ARGS[@]}" "${TRAIN_ARGS[@]}" "${ROLLOUT_ARGS[@]}"
      "${FP8_ARGS[@]}" "${DATA_ARGS[@]}" "${LOG_ARGS[@]}")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  WORLD_SIZE=$((NNODES * GPUS_PER_NODE)) python -m rlad_megatron.train "${ARGS[@]}" --dry-run
  exit 0
fi
torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m rlad_megatron.train "${ARGS[@]}"
