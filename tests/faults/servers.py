"""PostgreSQL and Redis servers of the fault tests' own, on their own ports and data directories.

The fault tests restart PostgreSQL and kill Redis (and wipe its data). Doing that to the servers
of scripts/services.sh would pull the floor from under anything else using them (a dev stack,
another test run), so the fault stack gets a throwaway pair under .run/faults/.
"""

import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psycopg2
import redis


def _pg_bindir() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not candidates:
        raise RuntimeError("PostgreSQL binaries not found under /usr/lib/postgresql (scripts/services.sh)")
    return candidates[-1]


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: as root the cluster belongs to 'postgres' (as services.sh does).
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _chown_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _postgres_can_enter(path: Path) -> bool:
    return (
        subprocess.run(
            ["runuser", "-u", "postgres", "--", "test", "-x", str(path)], check=False, cwd="/"
        ).returncode
        == 0
    )


def pg_home(root: Path, port: int) -> Path:
    """Where a cluster for `root` lives: there, unless we are root and 'postgres' cannot reach it
    (a checkout under /root or in a 0700 folder); then under postgres's home, one directory per
    checkout and port, as scripts/services.sh does."""
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or _postgres_can_enter(root):
        return root
    key = hashlib.sha1(str(root.resolve()).encode(), usedforsecurity=False).hexdigest()[:12]
    home = Path(pwd.getpwnam("postgres").pw_dir) / "payments-dev" / f"{key}-{port}"
    (home / "log").mkdir(parents=True, exist_ok=True)
    for path in (home, home / "log"):
        _chown_postgres(path)
    home.chmod(0o700)
    return home


class PgServer:
    def __init__(self, root: Path, port: int) -> None:
        home = pg_home(root, port)
        self.data = home / "pg"
        self.log = home / "log" / "postgres.log"
        self.port = port
        self.bin = _pg_bindir()

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{dbname}"

    def running(self) -> bool:
        return (
            subprocess.run(
                [str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)], check=False
            ).returncode
            == 0
        )

    def ensure(self) -> None:
        if not (self.data / "PG_VERSION").exists():
            self.data.mkdir(parents=True, exist_ok=True)
            _chown_postgres(self.data)
            self.data.chmod(0o700)
            subprocess.run(
                _as_postgres(
                    [
                        str(self.bin / "initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "-E",
                        "UTF8",
                        "--locale=C.UTF-8",
                    ]
                ),
                check=True,
                stdout=subprocess.DEVNULL,
                cwd="/",  # postgres may not be allowed into the checkout
            )
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(
                    f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.data}'\nmax_connections = 200\n"
                )
        if not self.running():
            self.start()

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        _chown_postgres(self.log)
        subprocess.run(
            _as_postgres(
                [
                    str(self.bin / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-w",
                    "-t",
                    "60",
                    # the port asked for, whatever an older cluster's postgresql.conf says
                    "-o",
                    f"-p {self.port}",
                    "start",
                ]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
            cwd="/",
        )

    def stop(self) -> None:
        if self.running():
            subprocess.run(
                _as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
                check=True,
                stdout=subprocess.DEVNULL,
                cwd="/",
            )

    def recreate_database(self, name: str) -> None:
        conn = psycopg2.connect(self.dsn())
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cursor.execute(f'CREATE DATABASE "{name}"')
        conn.close()


class RedisServer:
    def __init__(self, root: Path, port: int) -> None:
        self.dir = root / "redis"
        self.pidfile = root / "redis.pid"
        self.log = root / "log" / "redis.log"
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=5)

    def running(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        if self.running():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.pidfile),
                "--logfile",
                str(self.log),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.running():
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis on {self.port} did not start; see {self.log}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final AOF rewrite; whatever was not flushed is gone."""
        pid = int(self.pidfile.read_text().strip())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("redis did not die")
            time.sleep(0.02)
        self.pidfile.unlink(missing_ok=True)

    def wipe(self) -> None:
        """Empty the data directory (the AOF files): the next start is a Redis with nothing in it."""
        for child in self.dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def stop(self) -> None:
        if self.running():
            try:
                self.client().shutdown(nosave=True)
            except redis.RedisError:
                pass  # the connection drops as the server exits
