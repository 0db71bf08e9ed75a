"""`python -m gateway.sandbox_server`: run the sandbox under gunicorn with the package's settings."""

import os
import sys
from pathlib import Path


def main() -> None:
    """Replace this process with gunicorn; extra arguments are passed through."""
    conf = Path(__file__).with_name("gunicorn_conf.py")
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        str(conf),
        *sys.argv[1:],
        "gateway.sandbox_server.app:application",
    ]
    # exec, not a child process: signals from a process manager then reach gunicorn's master directly.
    os.execv(sys.executable, args)  # noqa: S606


if __name__ == "__main__":
    main()
