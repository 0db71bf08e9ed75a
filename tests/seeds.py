"""The commit under test, which seeds the generated tests: new cases per commit, the same ones for
one commit (so a red build replays)."""

import subprocess
from pathlib import Path


def commit_hash() -> str | None:
    """HEAD's hash, or None outside a git checkout (a source tarball)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
