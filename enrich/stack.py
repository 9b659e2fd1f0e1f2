"""Pieces for commands that drive the whole stack (soak, bench): worker processes, an S3 server, images."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from schema.settings import REPO_ROOT, Settings

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer

DATASETS = REPO_ROOT.parent / "shared" / "datasets"
IMAGE_SETS = {"small": DATASETS / "fashion-small" / "images", "fullres": DATASETS / "fashion-fullres"}


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment in which a child process reads the same Settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENRICH_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        # pydantic-settings reads list-valued variables as JSON.
        env[f"ENRICH_{name.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WorkerProcess:
    """An `enrich worker` child process with its own metrics port."""

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
        """The metrics port answers once the model is loaded, just before Celery starts consuming."""
        deadline = time.monotonic() + timeout
        while math.isnan(self.metric("enrich_forward_passes_total")):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start (exit code {self.process.poll()})")
            time.sleep(0.2)

    def cpu_seconds(self) -> float:
        """CPU time (user + system, every thread) of the worker process itself, not its decoding processes."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class WorkerGroup:
    """N `enrich worker` processes on one queue (and one device): how one GPU is shared by several
    processes, each with its own Celery consumer, GIL and CUDA context. Figures are summed."""

    def __init__(self, settings: Settings, processes: int, *args: str, quiet: bool = False) -> None:
        if processes > 1 and settings.decode_processes < 0:
            # Split the cores between the groups' decoding pools instead of oversubscribing them.
            cores = settings.effective_decode_processes
            settings = settings.model_copy(update={"decode_processes": max(1, cores // processes)})
        self.settings = settings
        self.workers = [WorkerProcess(settings, *args, quiet=quiet) for _ in range(processes)]

    def wait_ready(self) -> None:
        for worker in self.workers:
            worker.wait_ready()

    def exited(self) -> int | None:
        """The exit code of a worker that has stopped, else None."""
        return next((w.process.returncode for w in self.workers if w.process.poll() is not None), None)

    def cpu_seconds(self) -> float:
        return sum(worker.cpu_seconds() for worker in self.workers)

    def peak_rss_mib(self) -> float:
        return sum(worker.peak_rss_mib() for worker in self.workers)

    def metric(self, name: str) -> float:
        return sum(worker.metric(name) for worker in self.workers)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


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
