"""The tiny-scale reproduction of RLAD's comparison (docs/reproduction.md): `python -m rlad_megatron.reproduce`.

driver.py plans the jobs (pair, tuning grid, finals, rlad-eval, held-out check) and lanes.py runs them; recipe.py holds
the settings, the grid, its rule and the exact commands; runs.py, report.py and text.py parse the runs back into the report."""

from rlad_megatron.reproduce.driver import main
from rlad_megatron.reproduce.recipe import DIAGNOSTICS, METHOD_LABEL, METHODS, QUICK, ROOT, Recipe, pair_commands

__all__ = ["DIAGNOSTICS", "METHODS", "METHOD_LABEL", "QUICK", "ROOT", "Recipe", "main", "pair_commands"]
