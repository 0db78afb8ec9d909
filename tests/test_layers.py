"""The package's floors (.importlinter): entry points > trainer > step > engines > components > foundations, and no
import cycle between sibling modules. The real tree passes; a planted upward import and a planted cycle fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINT = Path(sys.executable).with_name("lint-imports")
MAX_MODULE_LINES = 420


def lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(tree / ".importlinter"), "--no-cache"], cwd=tree,
                          env={"PYTHONPATH": str(tree), "PATH": ""}, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def copy_of_tree(tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("tree")
    shutil.copytree(ROOT / "rlad_megatron", tree / "rlad_megatron", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tree / ".importlinter")
    return tree


def plant(tree: Path, module: str, line: str) -> str:
    path = tree / module
    original = path.read_text()
    path.write_text(original + f"\n{line}\n")
    return original


def test_the_tree_keeps_its_floors():
    p = lint(ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 kept, 0 broken" in p.stdout, p.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("rlad_megatron/ops/logprobs.py", "import rlad_megatron.trainer  # noqa", "entry points > trainer"),
    ("rlad_megatron/losses/sft.py", "from rlad_megatron.step import algos  # noqa", "entry points > trainer"),
    ("rlad_megatron/step/run.py", "from rlad_megatron.step import rollouts  # noqa", "no import cycles"),
])
def test_a_planted_import_breaks_a_contract(copy_of_tree, module, line, broken):
    original = plant(copy_of_tree, module, line)
    try:
        p = lint(copy_of_tree)
    finally:
        (copy_of_tree / module).write_text(original)
    assert p.returncode != 0, p.stdout
    assert f"{broken}" in p.stdout and "BROKEN" in p.stdout, p.stdout


def test_no_module_is_too_long():
    long = {str(f.relative_to(ROOT)): n for f in (ROOT / "rlad_megatron").rglob("*.py")
            if (n := len(f.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by concept): {long}"
