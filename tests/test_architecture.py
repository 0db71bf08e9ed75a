"""The layout's rules (README "Where things are") hold: import-linter's contracts in pyproject.toml."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    # when: import-linter checks every contract of pyproject.toml against the code
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # then: none is broken (the output names the offending import when one is)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout
    assert result.stdout.count("KEPT") == 5


def test_a_broken_rule_is_caught(tmp_path):
    # given: a copy of the rules with one contract no code can keep (core may import no app, and
    # here nothing may import orders at all)
    config = (ROOT / "pyproject.toml").read_text() + (
        "\n[[tool.importlinter.contracts]]\n"
        'name = "nothing imports orders"\n'
        'type = "forbidden"\n'
        'source_modules = ["gateway"]\n'
        'forbidden_modules = ["orders"]\n'
    )
    rules = tmp_path / "pyproject.toml"
    rules.write_text(config)
    # when: import-linter checks it
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache", "--config", str(rules)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # then: it fails and names the contract (the check can fail)
    assert result.returncode != 0
    assert "nothing imports orders BROKEN" in result.stdout
