"""Pieces for commands that drive the whole stack (soak, bench): worker processes, an S3 server, images."""

from __future__ import annotations

import io
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from schema.settings import REPO_ROOT, Settings, settings_env

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer

DATASETS = REPO_ROOT.parent / "shared" / "datasets"
IMAGE_SETS = {"small": DATASETS / "fashion-small" / "images", "fullres": DATASETS / "fashion-fullres"}


def machine_busy_seconds() -> float:
    """CPU time spent by every process on this machine so far (all cores; idle and I/O wait excluded)."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    # After the command name, which may itself hold ")": state, ppid, ..., utime (11), stime (12).
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_seconds(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of one process so far; OSError once it has gone."""
    return _cpu_seconds(_stat_fields(pid))


def process_table() -> dict[int, tuple[int, str, float]]:
    """Every live process: pid -> (parent pid, command line, CPU seconds so far)."""
    seen: dict[int, tuple[int, str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        seen[int(entry.name)] = (int(fields[1]), cmdline, _cpu_seconds(fields))
    return seen


def descendants(pid: int, table: dict[int, tuple[int, str, float]] | None = None) -> set[int]:
    """Children, grandchildren, ... of `pid` by parent pid (/proc/PID/task/PID/children lists only what
    the main thread started)."""
    table = process_table() if table is None else table
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, (parent, _, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """Every live process's CPU seconds so far and the group it counts in."""
    seen = process_table()
    return {pid: (_process_group(pid, seen), seconds) for pid, (_, _, seconds) in seen.items()}


_GROUPS = (
    (re.compile(r"enrich(\.cli)? worker"), "worker processes"),
    (re.compile(r"\bnanio\b"), "S3 server"),
    (re.compile(r"\bpostgres\b"), "Postgres"),
    (re.compile(r"redis-server"), "Redis"),
)


def _process_group(pid: int, seen: dict[int, tuple[int, str, float]]) -> str:
    """By the process's own command line, else by its nearest ancestor's: a pool process's command line
    names only multiprocessing, and both the worker's fetching/decoding pools and nanio's server
    processes are such pools."""
    if pid == os.getpid():
        return "bench process"  # the publisher and row polling; moto's server too when it is in use
    own = True
    while pid in seen:
        parent, cmdline, _ = seen[pid]
        for pattern, group in _GROUPS:
            if pattern.search(cmdline):
                return "fetching + decoding" if group == "worker processes" and not own else group
        own, pid = False, parent
    return "other"


def cpu_by_group_since(before: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per process group since `before` (processes that ended meanwhile are not counted)."""
    groups: dict[str, float] = {}
    for pid, (group, seconds) in cpu_by_process().items():
        spent = seconds - before[pid][1] if pid in before else seconds
        groups[group] = groups.get(group, 0.0) + spent
    return groups


def stop_processes(processes: list[subprocess.Popen[bytes]], *, grace_s: float) -> None:
    """SIGTERM to all at once (a worker's warm shutdown), then SIGKILL to any still running after grace_s."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + grace_s
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WorkerProcess:
    """An `enrich worker` child process with its own metrics port; with `settings.worker_processes` > 1, the
    supervisor of that many worker processes, whose figures are summed."""

    def __init__(self, settings: Settings, *args: str, quiet: bool = False) -> None:
        self.settings = settings.model_copy(update={"metrics_port": free_port()})
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "enrich.cli",
                "worker",
                "--loglevel",
                "error" if quiet else "warning",
                *args,
            ],
            env=settings_env(self.settings),
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL if quiet else None,
        )

    def metric(self, name: str) -> float:
        """Sum of a Prometheus sample of this worker; NaN (false in any comparison) until it serves."""
        url = f"http://127.0.0.1:{self.settings.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = response.read().decode()
        except OSError:
            return float("nan")
        total = 0.0
        for line in body.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_ready(self, timeout: float = 300) -> None:
        """Ready once every worker process has loaded its model, just before Celery starts consuming."""
        deadline = time.monotonic() + timeout
        while not self.metric("enrich_worker_processes_ready") >= self.settings.worker_processes:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start (exit code {self.process.poll()})")
            time.sleep(0.2)

    def exited(self) -> int | None:
        return self.process.poll()

    def worker_pids(self) -> list[int]:
        """The Celery worker processes: this one, or the supervisor's children (never decoding processes)."""
        pid = self.process.pid
        if self.settings.worker_processes <= 1:
            return [pid]
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def cpu_seconds(self) -> float:
        """CPU time of the worker processes themselves, not their fetching and decoding processes."""
        return sum(process_cpu_seconds(pid) for pid in self.worker_pids())

    def peak_rss_mib(self) -> float:
        total = 0
        for pid in self.worker_pids():
            with open(f"/proc/{pid}/status") as status:
                total += int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
        return total / 1024

    def stop(self) -> None:
        stop_processes([self.process], grace_s=60)


def start_moto() -> tuple[ThreadedMotoServer, str]:
    """moto's S3+SQS API server on a loopback port (a dev dependency: `pip install -e .[dev]`)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


NANIO_CREDENTIALS = ("enrich-bench", "enrich-bench-secret")


class NanioServer:
    """nanio's S3 API server (a dev dependency) in `workers` processes: objects are files (in /dev/shm
    where there is one), so its processes share them; moto keeps its state in one process's memory and
    serves at most a few hundred GETs/s, too few for a benchmark on a many-core GPU machine."""

    def __init__(self, workers: int) -> None:
        shm = Path("/dev/shm")
        self.data_dir = Path(tempfile.mkdtemp(prefix="enrich-nanio-", dir=shm if shm.is_dir() else None))
        port = free_port()
        access_key, secret_key = NANIO_CREDENTIALS
        command = [sys.executable, "-m", "nanio", "serve", "--data-dir", str(self.data_dir)]
        command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
        command += ["--no-access-log", "--log-level", "warning"]
        self.process = subprocess.Popen(
            command,
            env=os.environ | {"NANIO_ACCESS_KEY": access_key, "NANIO_SECRET_KEY": secret_key},
        )
        self.endpoint = f"http://127.0.0.1:{port}"
        try:
            wait_for_port(port, self.process)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        stop_processes([self.process], grace_s=30)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def minio_event(bucket: str, key: str, etag: str) -> dict[str, Any]:
    """The body MinIO's webhook target POSTs for one upload (`key` URL-encoded, as MinIO sends it)."""
    return {
        "EventName": "s3:ObjectCreated:Put",
        "Key": f"{bucket}/{key}",
        "Records": [
            {
                "eventVersion": "2.0",
                "eventSource": "minio:s3",
                "eventName": "s3:ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                    "object": {"key": key, "size": 1000, "eTag": etag, "sequencer": "17A1"},
                },
            }
        ],
    }


def wait_for_port(port: int, process: subprocess.Popen[bytes], *, timeout_s: float = 60) -> None:
    """Until a child process's server accepts connections; RuntimeError if it exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{process.args!r} did not start (exit code {process.poll()})") from None
            time.sleep(0.1)


def with_port(url: str, port: int) -> str:
    """The same URL (credentials and path kept) pointed at 127.0.0.1:port, e.g. through a TcpProxy."""
    parts = urlsplit(url)
    user, _, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"))


def catalogue_images(n: int, source: str | Path = "small", *, seed: int = 0) -> list[bytes]:
    """n JPEGs from a shipped image set (cycled), else synthetic ones where no dataset is beside the repo."""
    folder = Path(IMAGE_SETS.get(str(source), source))
    paths = sorted(folder.glob("*.jpg"))[:n] if folder.is_dir() else []
    images = [p.read_bytes() for p in paths]
    if images:
        return [images[i % len(images)] for i in range(n)]
    from PIL import Image

    rng = random.Random(seed)
    synthetic = []
    for _ in range(n):
        buffer = io.BytesIO()
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        Image.new("RGB", (60, 80), colour).save(buffer, format="JPEG")
        synthetic.append(buffer.getvalue())
    return synthetic
