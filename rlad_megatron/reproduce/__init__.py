"""The tiny-scale reproduction of RLAD's comparison (docs/reproduction.md): `python -m rlad_megatron.reproduce`.

driver.py runs the stages (pair, tuning grid, methods x seeds, rlad-eval), recipe.py holds the settings and the exact
commands, report.py parses the runs back into the report."""

from rlad_megatron.reproduce.driver import main
from rlad_megatron.reproduce.recipe import DIAGNOSTICS, METHOD_LABEL, METHODS, QUICK, ROOT, Recipe, pair_commands

__all__ = ["DIAGNOSTICS", "METHODS", "METHOD_LABEL", "QUICK", "ROOT", "Recipe", "main", "pair_commands"]
