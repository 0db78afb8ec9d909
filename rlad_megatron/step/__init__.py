"""What takes the run state, one module per stage of a step (see `trainer.py` for the order):
run (the typed Run, build, checkpoint state), configs, build, rollouts, sft, score, algos, update, sync, evaluate,
diagnostics."""
