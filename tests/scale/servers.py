"""Brokers of the scale tests' own, on their own ports and directories under .run/scale/:
a Redis Sentinel group (one master, one replica, three sentinels) and a RabbitMQ node.

Debian's redis-server runs sentinels (`redis-server conf --sentinel`); RabbitMQ runs from
/usr/lib/rabbitmq/bin as the current user, with its own node name, Erlang port mapper port,
distribution port, cookie (HOME) and data directory, so it never meets another node on the box.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            where = f"; the end of {log}:\n{_tail(log)}" if log else ""
            raise RuntimeError(f"timed out waiting for {what}{where}")
        time.sleep(0.05)


class SentinelGroup:
    MASTER_NAME = "mymaster"

    def __init__(self, root: Path, *, master_port: int, replica_port: int, sentinel_ports: tuple[int, ...]):
        self.root = root
        self.ports = {"master": master_port, "replica": replica_port}
        self.sentinel_ports = sentinel_ports

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports)

    def _redis(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=3)

    def _up(self, port: int) -> bool:
        try:
            return bool(self._redis(port).ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        for role, port in self.ports.items():
            args = [
                "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(self.root),
                "--dbfilename", f"{role}.rdb", "--appendonly", "yes", "--appendfilename", f"{role}.aof",
                "--appenddirname", f"aof-{role}", "--maxmemory-policy", "noeviction", "--save", "",
                "--daemonize", "yes", "--pidfile", str(self.root / f"{role}.pid"),
                "--logfile", str(self.root / f"{role}.log"),
            ]  # fmt: skip
            if role == "replica":
                args += ["--replicaof", "127.0.0.1", str(self.ports["master"])]
            subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        for role, port in self.ports.items():
            _wait(lambda port=port: self._up(port), 10, f"redis {port}", self.root / f"{role}.log")
        for port in self.sentinel_ports:
            conf = self.root / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize yes\ndir {self.root}\n"
                f"pidfile {self.root / f'sentinel-{port}.pid'}\nlogfile {self.root / f'sentinel-{port}.log'}\n"
                f"sentinel monitor {self.MASTER_NAME} 127.0.0.1 {self.ports['master']} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {self.MASTER_NAME} 5000\n"
            )
            subprocess.run(["redis-server", str(conf), "--sentinel"], check=True, stdout=subprocess.DEVNULL)
        # ready when every sentinel knows the replica, in sync, and the other sentinels
        _wait(self._ready, 30, "sentinels to know the replica and each other")

    def _ready(self) -> bool:
        try:
            for port in self.sentinel_ports:
                sentinel = self._redis(port)
                master = sentinel.sentinel_master(self.MASTER_NAME)
                replicas = sentinel.sentinel_slaves(self.MASTER_NAME)
                if master["num-other-sentinels"] < len(self.sentinel_ports) - 1:
                    return False
                # promotable: seen up, and in sync as of its last INFO (NOGOODSLAVE otherwise)
                if not any(
                    r["port"] == self.ports["replica"]
                    and not r["is_sdown"]
                    and r.get("master-link-status") == "ok"
                    for r in replicas
                ):
                    return False
            return self._redis(self.ports["master"]).info("replication")["connected_slaves"] >= 1
        except (redis.RedisError, KeyError):
            return False

    def master_port(self) -> int:
        return int(self._redis(self.sentinel_ports[0]).sentinel_get_master_addr_by_name(self.MASTER_NAME)[1])

    def failover(self) -> tuple[int, int]:
        """SENTINEL FAILOVER: the replica becomes master, the old master its replica. Returns the
        master's port before and after, once every sentinel and the new master agree."""
        before = self.master_port()
        self._redis(self.sentinel_ports[0]).execute_command("SENTINEL", "FAILOVER", self.MASTER_NAME)

        def switched() -> bool:
            try:
                ports = {
                    int(self._redis(p).sentinel_get_master_addr_by_name(self.MASTER_NAME)[1])
                    for p in self.sentinel_ports
                }
                if len(ports) != 1 or ports == {before}:
                    return False
                return self._redis(ports.pop()).info("replication")["role"] == "master"
            except redis.RedisError:
                return False

        _wait(switched, 30, "the failover")
        return before, self.master_port()

    def stop(self) -> None:
        for pidfile in self.root.glob("*.pid"):
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, signal.SIGKILL)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                continue


class RabbitNode:
    """One RabbitMQ node of our own (node name, ports, cookie and data all under `root`)."""

    def __init__(self, root: Path, *, port: int, dist_port: int, epmd_port: int) -> None:
        self.root = root
        self.port = port
        self.env = {
            **os.environ,
            "HOME": str(root / "home"),  # the Erlang cookie lives there
            "RABBITMQ_NODENAME": f"scale{port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "ERL_EPMD_PORT": str(epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(root / "rabbitmq.pid"),
        }
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @staticmethod
    def available() -> bool:
        return (RABBITMQ_BIN / "rabbitmq-server").exists()

    def ctl(self, *args: str, timeout: float = 60) -> str:
        return subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-q", *args],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        ).stdout

    def launch(self) -> None:
        """Start the node without waiting for it (it boots in about ten seconds): see ready()."""
        shutil.rmtree(self.root, ignore_errors=True)
        for sub in ("home", "mnesia", "log"):
            (self.root / sub).mkdir(parents=True)
        (self.root / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        (self.root / "enabled_plugins").write_text("[].\n")
        with open(self.root / "log" / "stdout.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.root,
            )

    def ready(self) -> None:
        self.ctl("wait", "--timeout", "90", self.env["RABBITMQ_PID_FILE"], timeout=100)

    def queues(self) -> dict[str, str]:
        rows = self.ctl("list_queues", "name", "type", "--no-table-headers").splitlines()
        return dict(row.split("\t")[:2] for row in rows if "\t" in row)

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
            self.proc = None
        # the node's own Erlang port mapper, a daemon on our port: asked to go, by that port,
        # until its port closes (it refuses while the killed node is still registered)
        deadline = time.monotonic() + 10
        while _listening(int(self.env["ERL_EPMD_PORT"])) and time.monotonic() < deadline:
            subprocess.run(
                ["epmd", "-port", self.env["ERL_EPMD_PORT"], "-kill"],
                capture_output=True,
                check=False,
                timeout=5,
            )
            time.sleep(0.2)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
