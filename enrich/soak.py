"""`enrich soak`: N images through the real stack while faults are injected, ending with an exact ledger.

Real parts: an S3 API server (moto's, started here unless --s3-endpoint is given), the configured Redis
and Postgres, and `enrich worker` processes. Faults: SIGKILL of a random worker (a new one replaces it),
Postgres outages (a TCP proxy between the workers and the database is cut), corrupt images, and duplicate
events. The ledger counts, per uploaded key, the rows that exist: every key must have exactly one, good
images `ok`, corrupt ones `failed_decode`.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from enrich.stack import WorkerProcess, catalogue_images, start_moto, stop_processes, with_port
from enrich.tcp_proxy import TcpProxy
from ingest.backfill import without_a_row
from ingest.publisher import JobPublisher
from schema.db import make_engine
from schema.migrate import upgrade
from schema.results import ObjectRef
from schema.s3 import make_s3_client
from schema.settings import Settings
from schema.tables import Enrichment
from worker.model.config import BundleConfig


@dataclass
class Ledger:
    uploaded: int = 0
    events_sent: int = 0
    expected_ok: set[str] = field(default_factory=set)
    expected_failed: set[str] = field(default_factory=set)
    kills: int = 0
    db_outages: int = 0
    reconciled: list[str] = field(default_factory=list)  # keys re-queued after the run stalled without rows
    rows_by_key: dict[str, list[str]] = field(default_factory=dict)

    @property
    def lost(self) -> list[str]:
        return sorted(k for k in self.expected_ok | self.expected_failed if not self.rows_by_key.get(k))

    @property
    def duplicated(self) -> list[str]:
        return sorted(k for k, statuses in self.rows_by_key.items() if len(statuses) > 1)

    @property
    def wrong_status(self) -> list[str]:
        wrong = [k for k in self.expected_ok if self.rows_by_key.get(k, ["ok"]) != ["ok"]]
        wrong += [
            k for k in self.expected_failed if self.rows_by_key.get(k, ["failed_decode"]) != ["failed_decode"]
        ]
        return sorted(wrong)

    @property
    def exact(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong_status)

    def lines(self) -> list[str]:
        statuses = Counter(s for v in self.rows_by_key.values() for s in v)
        return [
            f"uploaded keys        {self.uploaded}",
            f"events sent          {self.events_sent} (duplicates included)",
            f"worker SIGKILLs      {self.kills}",
            f"database outages     {self.db_outages}",
            f"re-queued by reconcile {len(self.reconciled)} {self.reconciled[:5]}",
            f"rows by status       {dict(sorted(statuses.items()))}",
            f"expected ok          {len(self.expected_ok)}",
            f"expected failed      {len(self.expected_failed)}",
            f"lost                 {len(self.lost)} {self.lost[:5]}",
            f"duplicated           {len(self.duplicated)} {self.duplicated[:5]}",
            f"wrong status         {len(self.wrong_status)} {self.wrong_status[:5]}",
            f"ledger exact         {self.exact}",
        ]


def run_soak(
    settings: Settings,
    *,
    n: int,
    workers: int,
    bad_fraction: float,
    duplicate_fraction: float,
    kill_every_s: float,
    outage_every_s: float,
    timeout_s: float,
    seed: int,
    s3_endpoint: str | None,
    bundle: Path | None,
    reconcile_after_s: float = 90.0,
    worker_processes: int = 1,
    log: object = print,
) -> Ledger:
    say = log if callable(log) else print
    rng = random.Random(seed)
    server = None
    if s3_endpoint is None:
        server, s3_endpoint = start_moto()
    run_id = uuid.uuid4().hex[:8]
    settings = settings.model_copy(
        update={
            "s3_endpoint_url": s3_endpoint,
            "queue": f"soak-{run_id}",
            "visibility_timeout_s": 10,
            "metrics_port": 0,
            "max_attempts": 8,
        }
        | ({"model_bundle": bundle} if bundle else {})
    )
    db_port = urlsplit(settings.database_url).port or 5432
    proxy = TcpProxy(db_port)
    worker_settings = settings.model_copy(
        update={"database_url": with_port(settings.database_url, proxy.port)}
    )
    ledger = Ledger()
    bucket = f"soak-{run_id}"
    client = make_s3_client(settings)
    client.create_bucket(Bucket=bucket)
    refs: list[ObjectRef] = []
    for i, data in enumerate(catalogue_images(n, seed=seed)):
        key = f"soak/{i:06d} photo.jpg"
        if rng.random() < bad_fraction:
            data = data[: len(data) // 3] if rng.random() < 0.5 else b"\x00not an image"
            ledger.expected_failed.add(key)
        else:
            ledger.expected_ok.add(key)
        etag = client.put_object(Bucket=bucket, Key=key, Body=data)["ETag"].strip('"')
        refs.append(ObjectRef(bucket, key, etag=etag))
    ledger.uploaded = len(refs)
    events = refs + [r for r in refs if rng.random() < duplicate_fraction]
    rng.shuffle(events)
    publisher = JobPublisher(settings)
    ledger.events_sent = publisher.publish(events).published
    say(f"uploaded {ledger.uploaded} images to s3://{bucket}, sent {ledger.events_sent} events")

    upgrade(settings.database_url)  # a fresh database works too, as for `enrich bench`
    engine = make_engine(settings.database_url)
    model_version = BundleConfig.read(settings.model_bundle).version
    # With worker_processes > 1 each worker is a supervisor: a kill hits one of its processes, which the
    # supervisor replaces (as in a pod); otherwise the killed worker is replaced here.
    worker_settings = worker_settings.model_copy(update={"worker_processes": worker_processes})
    running = [WorkerProcess(worker_settings, quiet=True) for _ in range(workers)]
    started = time.monotonic()
    # The first kill and outage come at 25% and 50% of the rows, so even a fast run meets both faults;
    # later ones follow the clock.
    next_kill = next_outage = float("inf")
    last_done, last_progress = -1, started
    try:
        while time.monotonic() - started < timeout_s:
            with engine.connect() as conn:
                done = (
                    conn.scalar(
                        select(func.count(func.distinct(Enrichment.key))).where(Enrichment.bucket == bucket)
                    )
                    or 0
                )
            if done == len(refs):
                break
            now = time.monotonic()
            if done != last_done:
                last_done, last_progress = done, now
            elif now - last_progress > reconcile_after_s:
                # What `enrich ingest backfill --missing-only` does on a schedule in production: re-queue
                # the objects that have no row (a message lost between Redis's BRPOP and kombu's unacked
                # record when its worker was killed). The ledger names them.
                with Session(engine) as session:
                    missing = list(without_a_row(session, refs, model_version=model_version))
                publisher.publish(missing)
                ledger.reconciled += [ref.key for ref in missing]
                last_progress = now
                say(f"[{now - started:5.0f}s] no progress: reconcile re-queued {len(missing)} keys")
            if kill_every_s and (now >= next_kill or (ledger.kills == 0 and done >= len(refs) / 4)):
                victim = rng.randrange(len(running))
                if worker_processes > 1:
                    pids = running[victim].worker_pids()
                    if pids:  # else the supervisor is between a death and its restart: kill next time
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(rng.choice(pids), signal.SIGKILL)
                            ledger.kills += 1
                else:
                    running[victim].process.send_signal(signal.SIGKILL)
                    running[victim].process.wait()
                    running[victim] = WorkerProcess(worker_settings, quiet=True)
                    ledger.kills += 1
                next_kill = now + kill_every_s
                say(
                    f"[{now - started:5.0f}s] SIGKILL in worker {victim}; {done}/{len(refs)} images have rows"
                )
            if outage_every_s and (now >= next_outage or (ledger.db_outages == 0 and done >= len(refs) / 2)):
                proxy.down()
                time.sleep(rng.uniform(1, 4))
                proxy.up()
                ledger.db_outages += 1
                next_outage = time.monotonic() + outage_every_s
                say(f"[{now - started:5.0f}s] database outage; {done}/{len(refs)} images have rows")
            time.sleep(0.2)
        # Let in-flight duplicates land (or not) before the ledger is read.
        time.sleep(3)
    finally:
        stop_processes([worker.process for worker in running], grace_s=60)
        proxy.close()
        publisher.close()
        if server is not None:
            server.stop()
    with engine.connect() as conn:
        for key, status in conn.execute(
            select(Enrichment.key, Enrichment.status).where(Enrichment.bucket == bucket)
        ):
            ledger.rows_by_key.setdefault(key, []).append(status)
    engine.dispose()
    return ledger
