"""KEDA's replica arithmetic for the worker ScaledObject, and a small simulation of a burst of uploads.

    python deploy/scaling.py                       # simulate the gpu overlay, write docs/scaling.png
    python deploy/scaling.py --overlay cpu --out /tmp/cpu.png

The ScaledObject is read from the rendered kustomize overlay (``kubectl kustomize``), or from the base file
when kubectl is absent, so the numbers are the ones that would be applied. What is modelled:

* KEDA polls LLEN every ``pollingInterval``; the scaler is active when LLEN > ``activationListLength``.
  KEDA itself takes the Deployment 0 -> 1 on activity and 1 -> 0 after ``cooldownPeriod`` without it.
* While replicas >= 1 the HPA sets ceil(LLEN / listLength) within [max(1, min), max], leaves the count
  alone inside its 10 % tolerance, and follows the ScaledObject's scale-up/scale-down policies and
  stabilization windows (approximated at the polling cadence).
* A new pod processes nothing for ``startup_s`` (node, image pull, model load), then ``throughput`` images/s.
* The queue is FIFO, so an image's latency is when the cumulative count processed reaches its position.

The throughput used by the docs (2,000 images/s per H100 worker) is a PLACEHOLDER until `enrich bench`
measures it; change ``--throughput`` and the ScaledObject's listLength together.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
HPA_TOLERANCE = 0.1
COLORS = ("tab:blue", "tab:orange", "tab:green")

# PLACEHOLDERS, to be replaced by measured numbers (docs/scaling.md).
WORKER_IMAGES_PER_S = 2000.0  # one H100 worker, end to end (fetch, decode, infer, upsert)
GPU_HOUR_USD = 3.00  # on-demand price of one H100 GPU-hour with its share of the node


# -- reading the manifests ----------------------------------------------------------------------------------


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(target: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize TARGET` as a list of objects (raises when kubectl is absent or fails)."""
    exe = kubectl()
    if exe is None:
        raise FileNotFoundError("kubectl is not on PATH")
    out = subprocess.run([exe, "kustomize", str(target)], check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def load_objects(overlay: str | None) -> list[dict[str, Any]]:
    """Objects of an overlay (rendered) or, with no overlay or no kubectl, of the base's ScaledObject file."""
    if overlay is not None and kubectl() is not None:
        return render(K8S / "overlays" / overlay)
    return [d for d in yaml.safe_load_all((K8S / "base" / "keda-scaledobject.yaml").read_text()) if d]


@dataclass(frozen=True, slots=True)
class ScalerSpec:
    """The numbers of a ScaledObject with one `redis` trigger that decide the replica count."""

    list_name: str
    list_length: int
    activation: int
    min_replicas: int
    max_replicas: int
    cooldown_s: int
    polling_s: int
    scale_up_window_s: int = 0
    scale_down_window_s: int = 300
    scale_up_pods: int = 4
    scale_up_percent: int = 100
    scale_up_period_s: int = 15
    scale_down_pods: int = 2
    scale_down_period_s: int = 60

    @classmethod
    def from_scaled_object(cls, obj: dict[str, Any], *, name: str = "enrich-worker") -> ScalerSpec:
        if obj.get("kind") != "ScaledObject" or obj["metadata"]["name"] != name:
            raise ValueError(f"not the ScaledObject {name!r}")
        spec = obj["spec"]
        (redis,) = [t for t in spec["triggers"] if t["type"] == "redis"]
        meta = redis["metadata"]
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
        up = behavior.get("scaleUp", {})
        down = behavior.get("scaleDown", {})

        def policy(rules: dict[str, Any], kind: str, default: tuple[int, int]) -> tuple[int, int]:
            for p in rules.get("policies", []):
                if p["type"] == kind:
                    return int(p["value"]), int(p["periodSeconds"])
            return default

        up_pods, up_period = policy(up, "Pods", (4, 15))
        up_percent, _ = policy(up, "Percent", (100, 15))
        down_pods, down_period = policy(down, "Pods", (2, 60))
        return cls(
            list_name=str(meta["listName"]),
            list_length=int(meta.get("listLength", "5")),
            activation=int(meta.get("activationListLength", "0")),
            min_replicas=int(spec.get("minReplicaCount", 0)),
            max_replicas=int(spec.get("maxReplicaCount", 100)),
            cooldown_s=int(spec.get("cooldownPeriod", 300)),
            polling_s=int(spec.get("pollingInterval", 30)),
            scale_up_window_s=int(up.get("stabilizationWindowSeconds", 0)),
            scale_down_window_s=int(down.get("stabilizationWindowSeconds", 300)),
            scale_up_pods=up_pods,
            scale_up_percent=up_percent,
            scale_up_period_s=up_period,
            scale_down_pods=down_pods,
            scale_down_period_s=down_period,
        )


def worker_spec(objects: Iterable[dict[str, Any]]) -> ScalerSpec:
    for obj in objects:
        if obj.get("kind") == "ScaledObject" and obj["metadata"]["name"] == "enrich-worker":
            return ScalerSpec.from_scaled_object(obj)
    raise LookupError("no ScaledObject enrich-worker")


# -- KEDA's formula ---------------------------------------------------------------------------------------


def is_active(list_length: int, spec: ScalerSpec) -> bool:
    """KEDA's redis scaler: active when LLEN is strictly above activationListLength."""
    return list_length > spec.activation


def target_replicas(list_length: int, spec: ScalerSpec) -> int:
    """Replicas KEDA + HPA settle on for a steady LLEN (cooldown elapsed, no rate limits, from 0 replicas).

    Inactive: minReplicaCount (0 scales to zero). Active: ceil(LLEN / listLength) bounded by
    [max(1, minReplicaCount), maxReplicaCount].
    """
    if not is_active(list_length, spec):
        return spec.min_replicas
    wanted = math.ceil(list_length / spec.list_length)
    return max(max(1, spec.min_replicas), min(spec.max_replicas, wanted))


# -- simulation -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimResult:
    t: np.ndarray  # seconds
    arrivals: np.ndarray  # images arriving in each second
    queue: np.ndarray  # LLEN at the end of each second
    replicas: np.ndarray  # Deployment replicas (what KEDA/HPA asked for)
    ready: np.ndarray  # pods processing
    latency: np.ndarray  # seconds from upload to row for the last image of each second (nan: none)
    gpu_seconds: float

    @property
    def images(self) -> int:
        return int(self.arrivals.sum())


def burst_arrivals(
    duration_s: int, bursts: Sequence[tuple[int, int, float]], background_per_s: float = 0.0
) -> np.ndarray:
    """Images per second: `bursts` are (start_s, length_s, images_per_s) on top of a background rate."""
    a = np.full(duration_s, background_per_s)
    for start, length, rate in bursts:
        a[start : start + length] += rate
    return np.round(a).astype(np.int64)


def scenario() -> np.ndarray:
    """45 minutes: idle; a 2-minute folder upload (600,000 images); a trickle of 20 images/s for 25 minutes
    with a second burst (540,000 images in 90 s) inside it; idle again."""
    arrivals = burst_arrivals(2700, [(60, 120, 5000.0), (1200, 90, 6000.0)])
    arrivals[300:1800] += 20
    return arrivals


def simulate(
    arrivals: np.ndarray,
    spec: ScalerSpec,
    *,
    throughput: float = WORKER_IMAGES_PER_S,
    startup_s: int = 90,
) -> SimResult:
    n = len(arrivals)
    queue = np.zeros(n)
    replicas_t = np.zeros(n, dtype=np.int64)
    ready_t = np.zeros(n, dtype=np.int64)
    processed = np.zeros(n)
    pods: list[float] = [0.0] * spec.min_replicas  # ready-at times of the pods that exist
    replicas = spec.min_replicas
    last_active = -math.inf
    history: list[tuple[int, int]] = []  # (time, HPA recommendation) for the stabilization windows
    last_up = last_down = -math.inf
    q = 0.0
    gpu_seconds = 0.0
    for t in range(n):
        q += float(arrivals[t])
        if t % spec.polling_s == 0:
            llen = int(q)
            active = is_active(llen, spec)
            if active:
                last_active = t
            if replicas == 0:
                if active:  # KEDA's activation: 0 -> 1, then the HPA takes over
                    replicas = max(1, spec.min_replicas)
            elif not active and spec.min_replicas == 0 and t - last_active >= spec.cooldown_s:
                replicas = 0  # KEDA's deactivation: the only step cooldownPeriod governs
            else:
                # The HPA, also while the scaler is inactive (LLEN 0 asks for its floor of 1 replica).
                wanted = math.ceil(llen / spec.list_length)
                recommendation = max(max(1, spec.min_replicas), min(spec.max_replicas, wanted))
                if abs(llen / (spec.list_length * replicas) - 1.0) <= HPA_TOLERANCE:
                    recommendation = replicas
                history.append((t, recommendation))
                down_window = [r for (s, r) in history if t - s <= spec.scale_down_window_s]
                up_window = [r for (s, r) in history if t - s <= spec.scale_up_window_s] or [recommendation]
                if recommendation > replicas and t - last_up >= spec.scale_up_period_s:
                    by_percent = replicas * (100 + spec.scale_up_percent) // 100
                    limit = max(by_percent, replicas + spec.scale_up_pods)
                    new = min(min(up_window), limit, spec.max_replicas)
                    if new > replicas:
                        replicas, last_up = new, t
                elif recommendation < replicas and t - last_down >= spec.scale_down_period_s:
                    new = max(max(down_window), replicas - spec.scale_down_pods)
                    if new < replicas:
                        replicas, last_down = new, t
        # The Deployment converges on `replicas`: new pods start cold; removed pods go not-ready-first.
        while len(pods) < replicas:
            pods.append(t + startup_s)
        if len(pods) > replicas:
            pods = sorted(pods)[:replicas]
        ready = sum(1 for p in pods if p <= t)
        done = min(q, ready * throughput)
        q -= done
        queue[t], processed[t], replicas_t[t], ready_t[t] = q, done, replicas, ready
        gpu_seconds += len(pods)
    arrived = np.cumsum(arrivals)
    finished = np.cumsum(processed)
    finish_idx = np.searchsorted(finished, arrived - 1e-6, side="left").astype(float)
    latency = np.where((arrivals > 0) & (finish_idx < n), finish_idx - np.arange(n) + 1.0, np.nan)
    return SimResult(
        t=np.arange(n),
        arrivals=arrivals,
        queue=queue,
        replicas=replicas_t,
        ready=ready_t,
        latency=latency,
        gpu_seconds=gpu_seconds,
    )


def plot(results: dict[str, SimResult], spec: ScalerSpec, out: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True, constrained_layout=True)
    first = next(iter(results.values()))
    minutes = first.t / 60.0
    ax = axes[0]
    for (label, r), color in zip(results.items(), COLORS, strict=False):
        ax.plot(minutes, r.queue / 1000.0, color=color, label=f"LLEN, {label}")
    ax2 = ax.twinx()
    ax2.fill_between(minutes, first.arrivals / 1000.0, color="grey", alpha=0.25, step="mid")
    ax2.set_ylabel("uploads (k images/s, grey)")
    ax.set_ylabel("queue depth (k messages)")
    ax.legend(loc="upper right")
    ax.set_title(title)
    ax = axes[1]
    for (label, r), color in zip(results.items(), COLORS, strict=False):
        ax.step(minutes, r.replicas, where="post", color=color, label=f"replicas asked, {label}")
        ax.step(minutes, r.ready, where="post", color=color, linestyle="--", label=f"workers ready, {label}")
    ax.axhline(spec.max_replicas, color="red", linewidth=0.8, linestyle=":", label="maxReplicaCount")
    ax.set_ylabel("workers")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[2]
    for (label, r), color in zip(results.items(), COLORS, strict=False):
        ax.plot(minutes, r.latency, color=color, label=f"upload -> row, {label}")
    ax.set_ylabel("latency (s)")
    ax.set_xlabel("minutes")
    ax.legend(loc="upper right")
    for a in axes:
        a.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def summary(r: SimResult, throughput: float, gpu_hour_usd: float) -> dict[str, float]:
    """Headline numbers of a run; latencies only over the images that were finished within it."""
    processed = float(r.images - r.queue[-1])
    finished = ~np.isnan(r.latency)
    latencies = np.repeat(r.latency[finished], r.arrivals[finished])
    backlog = np.nonzero(r.queue > 0)[0]
    return {
        "images": float(r.images),
        "unfinished": float(r.queue[-1]),
        "peak_queue": float(r.queue.max()),
        "peak_replicas": float(r.replicas.max()),
        "p50_latency_s": float(np.percentile(latencies, 50)) if latencies.size else math.nan,
        "p95_latency_s": float(np.percentile(latencies, 95)) if latencies.size else math.nan,
        "max_latency_s": float(latencies.max()) if latencies.size else math.nan,
        "last_backlog_s": float(backlog[-1]) if backlog.size else 0.0,
        "gpu_hours": r.gpu_seconds / 3600.0,
        "utilisation": processed / throughput / r.gpu_seconds if r.gpu_seconds else 0.0,
        "usd_per_million": r.gpu_seconds / 3600.0 * gpu_hour_usd / processed * 1e6 if processed else math.nan,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--overlay", default="gpu")
    parser.add_argument("--throughput", type=float, default=WORKER_IMAGES_PER_S, help="images/s per worker")
    parser.add_argument("--startup", type=int, default=90, help="seconds from scale-up to a ready worker")
    parser.add_argument("--gpu-hour-usd", type=float, default=GPU_HOUR_USD)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "scaling.png")
    args = parser.parse_args(argv)
    spec = worker_spec(load_objects(args.overlay))
    arrivals = scenario()
    warm = ScalerSpec(**{**{f: getattr(spec, f) for f in spec.__slots__}, "min_replicas": 1})
    results = {
        f"minReplicaCount {spec.min_replicas}": simulate(
            arrivals, spec, throughput=args.throughput, startup_s=args.startup
        ),
        "minReplicaCount 1": simulate(arrivals, warm, throughput=args.throughput, startup_s=args.startup),
    }
    plot(
        results,
        spec,
        args.out,
        title=(
            f"{args.overlay}: listLength {spec.list_length}, max {spec.max_replicas}, "
            f"{args.throughput:g} img/s/worker (placeholder), {args.startup}s cold start"
        ),
    )
    for label, r in results.items():
        print(label, {k: round(v, 3) for k, v in summary(r, args.throughput, args.gpu_hour_usd).items()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
