#!/usr/bin/env bash
# Tiny CPU reproduction of RLAD's comparison, from nothing, offline and seeded (python -m rlad_megatron.reproduce):
#   1. the pair: a d=64 teacher SFT'd on 4-digit column-addition traces (2-3 terms) until it is strong, a d=32
#      student (3.8x fewer parameters) SFT'd briefly so it starts weak
#   2. tuning: the same grid for GRPO, KDRL, RLAD (TRRD) and offline SFT distillation on a tuning seed, scored on a
#      tuning eval split (lr x updates per rollout, then each method's own knob), selection rule fixed in advance
#   3. finals: every method at its chosen setting on 5 seeds; rlad-eval (Mean@k / Pass@k) of every final student
#   4. the measured overlap of the held-out sets with every training set, and docs/reproduction.md + PNG
#      (tables, paired differences with 95% CIs, TRRD-vs-GRPO update diagnostics)
# Two single-rank runs side by side (--lanes); the end-to-end time on a 2-core box is not measured yet.
# Env: OUT (outputs/reproduce), QUICK=1 (the CI smoke run: tiny budgets, writes only under $OUT). Extra arguments go
# to the driver (e.g. --lanes 4). Finished jobs found in $OUT are reused: an interrupted run continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
PY=${PYTHON:-python}
ARGS=(--out "${OUT:-outputs/reproduce}")
if [[ -n ${QUICK:-} ]]; then ARGS+=(--quick); fi
exec "$PY" -m rlad_megatron.reproduce "${ARGS[@]}" "$@"
