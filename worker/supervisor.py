"""`enrich worker --processes N`: N worker processes sharing one device, supervised in one container.

Why: one worker process's own Python (Celery's messaging, batching, the upsert) costs 2-5 ms of CPU per
image besides the model (docs/benchmarks.md), so it tops out at a few hundred images/s, a fraction of one
GPU. Kubernetes gives a GPU to one container, so the processes that share it must live in that container.
Each child is a whole `enrich worker` (its own Celery consumer, GIL, decoding pools and CUDA context); this
process only starts them, restarts one that dies, forwards the shutdown signal (Celery's warm shutdown) and
serves their metrics, summed, on one port once every child has loaded its model (the pod's startup probe).
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry, multiprocess

from schema.settings import Settings, settings_env
from worker import liveness

log = logging.getLogger(__name__)

READY_METRIC = "enrich_worker_processes_ready"
# A child that lived this long before dying had a fault, not a crash loop: its restart starts from no delay.
STABLE_AFTER_S = 60.0
# A child that died young this many times in a row is in a crash loop (a broken device, a full disk): the
# supervisor stops with its exit code rather than keep a pod that answers its probes and does no work, so
# Kubernetes restarts the pod and shows the loop (CrashLoopBackOff) to the operator.
MAX_YOUNG_DEATHS = 5


def child_settings(settings: Settings) -> Settings:
    """Each child serves no metrics port of its own and decodes and computes on its share of the cores."""
    update: dict[str, object] = {"worker_processes": 1, "metrics_port": 0}
    if settings.decode_processes < 0:
        update["decode_processes"] = max(1, settings.effective_decode_processes // settings.worker_processes)
    if settings.model_threads <= 0:
        update["model_threads"] = max(1, settings.effective_model_threads // settings.worker_processes)
    return settings.model_copy(update=update)


@dataclass
class Child:
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)


class WorkerSupervisor:
    def __init__(
        self,
        settings: Settings,
        command: list[str],
        *,
        max_backoff_s: float = 30.0,
        max_young_deaths: int = MAX_YOUNG_DEATHS,
    ) -> None:
        self.settings = settings
        self.command = command
        self.max_backoff_s = max_backoff_s
        self.max_young_deaths = max_young_deaths
        self.young_deaths: dict[int, int] = {}
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="enrich-metrics-"))
        self.env = settings_env(child_settings(settings)) | {
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)
        }
        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=str(self.metrics_dir))
        self.children: dict[int, Child] = {}
        self.backoff_s: dict[int, float] = {}
        self.restart_at: dict[int, float] = {}
        self.stopping = False
        self.serving = False

    def run(self) -> int:
        """Supervises until a shutdown signal, then waits for the children's warm shutdown. The exit code is
        a child's when one fails before all of them were ever ready (bad settings, no device): fail fast."""
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        try:
            for slot in range(self.settings.worker_processes):
                self._spawn(slot)
            while not self.stopping or self.children:
                time.sleep(0.2)
                if (failed := self._reap()) is not None:
                    self._forward(signal.SIGTERM, None)
                    self._wait_all()
                    return failed
                if not self.stopping:
                    self._restart_due()
                    self._serve_when_ready()
            return 0
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def ready_processes(self) -> int:
        return int(
            sum(
                sample.value
                for metric in self.registry.collect()
                if metric.name == READY_METRIC
                for sample in metric.samples
            )
        )

    def _spawn(self, slot: int) -> None:
        # Its own process group: a terminal's Ctrl-C reaches the children once, through _forward.
        process = subprocess.Popen(self.command, env=self.env, process_group=0)
        self.children[slot] = Child(process)
        log.info("worker process %d started (pid %d)", slot, process.pid)

    def _reap(self) -> int | None:
        """Notes children that exited and schedules their restart; returns an exit code to stop with."""
        for slot, child in list(self.children.items()):
            code = child.process.poll()
            if code is None:
                continue
            del self.children[slot]
            multiprocess.mark_process_dead(child.process.pid, str(self.metrics_dir))
            if self.stopping:
                continue
            if not self.serving and code != 0:
                log.error("worker process %d exited with %d before all were ready; stopping", slot, code)
                return code
            lived = time.monotonic() - child.started
            young = lived < STABLE_AFTER_S
            self.young_deaths[slot] = self.young_deaths.get(slot, 0) + 1 if young else 0
            if self.young_deaths[slot] >= self.max_young_deaths:
                log.error(
                    "worker process %d died %d times in a row within %.0f s of its start (last exit %d); "
                    "stopping",
                    slot,
                    self.young_deaths[slot],
                    STABLE_AFTER_S,
                    code,
                )
                return code or 1
            backoff = min(2 * self.backoff_s.get(slot, 0.5), self.max_backoff_s) if young else 1.0
            self.backoff_s[slot] = backoff
            self.restart_at[slot] = time.monotonic() + backoff
            log.warning(
                "worker process %d exited with %d after %.0f s; restarting in %.0f s",
                slot,
                code,
                lived,
                backoff,
            )
        return None

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, when in list(self.restart_at.items()):
            if when <= now:
                del self.restart_at[slot]
                self._spawn(slot)

    def _serve_when_ready(self) -> None:
        if self.serving or self.ready_processes() < self.settings.worker_processes:
            return
        self.serving = True
        liveness.serve(self.settings.metrics_port, self.registry, self.settings.stall_limit_s)
        log.info("%d worker processes ready", self.settings.worker_processes)

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        # A second signal is forwarded too: Celery turns a second SIGINT/SIGTERM into a cold shutdown.
        self.stopping = True
        self.restart_at.clear()
        for child in self.children.values():
            if child.process.poll() is None:
                child.process.send_signal(signum)

    def _wait_all(self) -> None:
        for child in self.children.values():
            child.process.wait()
        self.children.clear()
