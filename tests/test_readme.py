"""The README's two fresh-machine commands exist, and CI runs exactly the README's test command."""

import re

from tests.conftest import ROOT


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Fresh machine: two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup, flags=re.DOTALL)


def test_two_commands_run_and_test():
    run, test = readme_commands()
    assert "examples/rlad_tiny_cpu.sh" in run and "torch==2.13.0" in run
    assert "pytest" in test and "torch==2.13.0" in test


def test_ci_runs_the_readme_test_command():
    _, test = readme_commands()
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert test in ci, ".ci/run must run the README's test command verbatim"
