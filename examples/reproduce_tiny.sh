#!/usr/bin/env bash
# Tiny CPU reproduction of RLAD's comparison, from nothing, offline and seeded (python -m rlad_megatron.reproduce):
#   1. the tiny teacher/student pair with the commands of examples/rlad_tiny_cpu.sh (teacher d=64, student d=32)
#   2. GRPO, KDRL, RLAD (TRRD, alpha 0.5) and offline SFT distillation (rejection-sampled teacher traces) on the
#      student, 3 seeds each, identical budgets and hyper-parameters apart from the method
#   3. rlad-eval (Mean@k / Pass@k) of every final student on the held-out split
#   4. docs/reproduction.md (table, diagnostics, commands, machine, wall-clock) + docs/reproduction_accuracy.png
# ~30-40 min on a 2-core box. Env: OUT (outputs/reproduce), QUICK=1 (CI smoke run in a few minutes; writes only
# under $OUT), TUNING (tuning.json of a `--tune` run, shown in the report). Extra arguments go to the driver,
# e.g. `examples/reproduce_tiny.sh --tune` (the short tuning grid), `--resume`, `--seeds 10000 20000`.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
PY=${PYTHON:-python}
ARGS=(--out "${OUT:-outputs/reproduce}")
if [[ -n ${QUICK:-} ]]; then ARGS+=(--quick); fi
if [[ -n ${TUNING:-} ]]; then ARGS+=(--tuning "$TUNING"); fi
exec "$PY" -m rlad_megatron.reproduce "${ARGS[@]}" "$@"
