"""The README's test command is what CI runs, verbatim."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash")[1:]]
    test_cmd = [b for b in blocks if "pytest" in b]
    assert len(test_cmd) == 1, "the README has exactly one test command"
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd[0] in ci.splitlines(), "the README's test command must appear verbatim in .ci/run"
    setup = [b for b in blocks if b.startswith("python3 -m venv .venv")]
    assert len(setup) == 2, "exactly two set-up commands"
