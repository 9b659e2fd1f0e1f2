"""`enrich`: run, worker, ingest (webhook | sqs | backfill), query, db, train, evaluate."""

from __future__ import annotations

import logging
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from schema.results import ObjectRef, Status
from schema.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from schema.repository import EnrichmentQuery
    from schema.tables import Enrichment

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
ingest_app = typer.Typer(help="Turn bucket events into jobs on the Redis queue.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
app.add_typer(db_app, name="db")
# Piped output (CI logs, `| less`) gets a wide table instead of 80 folded columns.
console = Console(width=None if sys.stdout.isatty() else 200)


# `--status` values: a status of the table, or "failed" for any failure. A typo ("okay") is refused
# instead of matching no row and printing an empty table.
FAILURE_STATUSES: tuple[str, ...] = ("failed", *(s.value for s in Status if s is not Status.OK))
QUERY_STATUSES: tuple[str, ...] = (Status.OK.value, *FAILURE_STATUSES)


def _one_of(choices: tuple[str, ...]) -> Callable[[str | None], str | None]:
    """An option callback that refuses any value outside `choices`, naming them."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def _settings(**overrides: object) -> Settings:
    try:
        settings = Settings()
        changes = {name: value for name, value in overrides.items() if value is not None}
        return settings.model_validate({**settings.model_dump(), **changes}) if changes else settings
    except ValidationError as error:
        # A misconfigured deployment should read one line per bad variable, not a pydantic traceback.
        Console(stderr=True).print(f"[red]invalid settings[/red]:\n{_settings_problems(error)}")
        raise typer.Exit(2) from None


def _settings_problems(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        where = "_".join(str(part) for part in problem["loc"]).upper()
        message = problem["msg"].removeprefix("Value error, ")
        # Our own messages name their variable; pydantic's (a type error) do not.
        named = not where or message.startswith(f"ENRICH_{where}")
        lines.append(f"  {message}" if named else f"  ENRICH_{where}: {message}")
    return "\n".join(lines)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- db -------------------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply Alembic migrations to ENRICH_DATABASE_URL."""
    from schema.migrate import current_revision, upgrade

    settings = _settings()
    upgrade(settings.database_url, revision)
    console.print(f"database at revision {current_revision(settings.database_url)}")


# -- run ------------------------------------------------------------------------------------------------


@app.command()
def run(
    source: Annotated[str, typer.Argument(help="A local folder or an s3://bucket/prefix")],
    batch_size: Annotated[int | None, typer.Option(help="Images per forward pass")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N")] = None,
    bundle: Annotated[Path | None, typer.Option(help="Model bundle folder")] = None,
    output: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.table,
    limit: Annotated[int, typer.Option(min=0, help="Rows to print (0: none)")] = 50,
) -> None:
    """Enrich every image under SOURCE in process (no broker) into the configured database, then print."""
    from schema.migrate import upgrade
    from worker.local_run import plan, run_local
    from worker.pipeline import Outcome
    from worker.runtime import use_model_threads

    settings = _settings(batch_size=batch_size, device=device, model_bundle=bundle)
    use_model_threads(settings, alone=True)
    try:
        # Before the database: a mistyped folder must not leave an empty database file behind.
        store, refs = plan(settings, source)
    except (FileNotFoundError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="SOURCE") from None
    if not refs:
        console.print(f"[yellow]no images under {source}[/yellow]")
        raise typer.Exit(1)
    upgrade(settings.database_url)
    counts: dict[str, int] = {}
    with Progress(
        TextColumn("[bold]enrich[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("images", total=len(refs))

        def on_done(outcome: Outcome) -> None:
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
            if outcome.unrecordable is not None:
                # No row will ever say so: the key (repr, as it may not print) and why go to the terminal.
                progress.console.print(
                    f"[red]not recorded[/red] {escape(repr(outcome.ref.key))}: {escape(outcome.unrecordable)}"
                )
            progress.advance(task)

        run_local(settings, store=store, refs=refs, on_done=on_done)
    Console(stderr=True).print(
        f"{len(refs)} images -> {_safe_url(settings.database_url)}: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    )
    if limit == 0:
        return
    bucket = refs[0].bucket
    prefix = source.split("/", 3)[3] if source.startswith("s3://") and source.count("/") >= 3 else None
    _print_rows(settings, output=output, limit=limit, bucket=bucket, key_prefix=prefix)


# -- worker ---------------------------------------------------------------------------------------------


class S3Server(StrEnum):
    moto = "moto"
    nanio = "nanio"


class Pool(StrEnum):
    threads = "threads"
    solo = "solo"


@app.command()
def worker(
    batch_size: Annotated[int | None, typer.Option(help="Images per forward pass")] = None,
    max_wait_ms: Annotated[int | None, typer.Option(help="Longest wait to fill a batch")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Tasks held at once (default 2 x batch)")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N")] = None,
    processes: Annotated[
        int | None, typer.Option(help="Worker processes sharing the device, supervised by this one")
    ] = None,
    pool: Annotated[
        Pool, typer.Option(help="threads (default) or solo; never prefork: CUDA and fork")
    ] = Pool.threads,
    loglevel: str = "info",
) -> None:
    """Consume enrichment tasks from the Redis queue in micro-batches and write rows."""
    _logging(loglevel)
    settings = _settings(
        batch_size=batch_size,
        max_wait_ms=max_wait_ms,
        worker_concurrency=concurrency,
        device=device,
        worker_processes=processes,
    )
    if settings.worker_processes > 1:
        from worker.supervisor import WorkerSupervisor

        command = [
            sys.executable,
            "-m",
            "enrich.cli",
            "worker",
            f"--pool={pool.value}",
            f"--loglevel={loglevel}",
        ]
        raise typer.Exit(WorkerSupervisor(settings, command).run())

    from worker import liveness
    from worker.runtime import WorkerRuntime, use_model_threads
    from worker.tasks import make_worker_app

    use_model_threads(settings)
    runtime = WorkerRuntime.build(settings)
    liveness.watch_stalls(runtime.batcher.stalled_s, runtime.metrics.stalled)
    liveness.serve(settings.metrics_port, runtime.metrics.registry, settings.stall_limit_s)
    runtime.metrics.ready.set(1)
    celery_app = make_worker_app(settings, runtime)
    try:
        celery_app.worker_main(
            [
                "worker",
                f"--pool={pool.value}",
                f"--concurrency={settings.effective_concurrency if pool is Pool.threads else 1}",
                f"--queues={settings.queue}",
                f"--loglevel={loglevel}",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        runtime.close()


# -- ingest ---------------------------------------------------------------------------------------------


@ingest_app.command("webhook")
def ingest_webhook(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Serve POST /events for S3/MinIO event notifications (and /healthz, /metrics)."""
    import uvicorn

    from ingest.publisher import JobPublisher
    from ingest.webhook import make_webhook_app

    settings = _settings(webhook_host=host, webhook_port=port)
    publisher = JobPublisher(settings)
    # No access log: a bucket sends one POST per upload, and formatting a log line for each cost 7 % of the
    # process's CPU; outcomes are counted in /metrics and failures logged with their reason.
    uvicorn.run(
        make_webhook_app(settings, publisher),
        host=settings.webhook_host,
        port=settings.webhook_port,
        access_log=False,
    )


@ingest_app.command("sqs")
def ingest_sqs(
    queue_url: Annotated[
        str | None, typer.Option(help="SQS queue URL (default ENRICH_SQS_QUEUE_URL)")
    ] = None,
    wait_seconds: Annotated[int, typer.Option(help="Long-poll wait")] = 20,
    exit_when_idle: Annotated[int | None, typer.Option(help="Stop after N empty polls in a row")] = None,
) -> None:
    """Long-poll the SQS queue the bucket notifies and queue each new object."""
    from ingest.publisher import JobPublisher
    from ingest.sqs import poll_sqs
    from schema.s3 import make_sqs_client

    _logging("info")
    settings = _settings(sqs_queue_url=queue_url)
    if not settings.sqs_queue_url:
        raise typer.BadParameter("set --queue-url or ENRICH_SQS_QUEUE_URL")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stats = poll_sqs(
        client=make_sqs_client(settings),
        queue_url=settings.sqs_queue_url,
        publisher=JobPublisher(settings),
        stop=stop,
        wait_seconds=wait_seconds,
        max_empty_polls=exit_when_idle,
    )
    console.print(
        f"{stats.messages} messages, {stats.queued} objects queued, {len(stats.malformed)} malformed, "
        f"{len(stats.ignored)} records ignored, {len(stats.failed)} left for redelivery"
    )


@ingest_app.command("backfill")
def ingest_backfill(
    url: Annotated[str, typer.Argument(help="s3://bucket/prefix")],
    all_keys: Annotated[bool, typer.Option(help="Queue every key, not only image suffixes")] = False,
    missing_only: Annotated[
        bool,
        typer.Option(help="Queue only objects without a row for the bundle's model version (reconcile)"),
    ] = False,
    older_than: Annotated[
        str | None,
        typer.Option(help="Only objects last written before this long ago (15m, 2h): their events are done"),
    ] = None,
    unless_queued: Annotated[
        int | None,
        typer.Option(help="Do nothing while more than this many jobs wait on the queue (a backlog draining)"),
    ] = None,
) -> None:
    """Queue the existing objects under a prefix (first load, re-processing after a model upgrade, or
    with --missing-only a periodic reconciliation)."""
    from ingest.backfill import list_objects, queue_objects, waiting_jobs

    settings = _settings()
    # A reconciliation while a large backlog drains would queue every waiting object a second time: the
    # list KEDA scales on would double at each run. The messages it exists to find can wait for the drain.
    if unless_queued is not None and (waiting := waiting_jobs(settings)) > unless_queued:
        console.print(f"skipped: {waiting} jobs wait on '{settings.queue}' (more than {unless_queued})")
        return
    bucket, prefix = _s3_url(url)
    before = _parse_time(older_than, "--older-than") if older_than else None
    refs = list_objects(settings, bucket, prefix, images_only=not all_keys, modified_before=before)
    report = queue_objects(settings, refs, missing_only=missing_only)
    console.print(f"queued {report.published} objects from {url} on '{settings.queue}'")
    for reason in report.rejected:
        console.print(f"[yellow]rejected[/yellow] {escape(reason)}")


@app.command()
def retry(
    status: Annotated[
        str,
        typer.Option(
            help="Which failures: failed (all), failed_fetch, failed_infer, ...",
            callback=_one_of(FAILURE_STATUSES),
        ),
    ] = "failed",
    bucket: Annotated[str | None, typer.Option()] = None,
    prefix: Annotated[str | None, typer.Option(help="Key prefix")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many jobs")] = 100_000,
) -> None:
    """Queue the dead-lettered jobs again (the latest row of each image is a failure). Each new outcome
    replaces its failed row; `attempts` counts the tries."""
    from ingest.publisher import JobPublisher
    from schema.repository import EnrichmentQuery

    settings = _settings()
    found = _query_rows(
        settings, EnrichmentQuery(status=status, bucket=bucket, key_prefix=prefix, limit=limit)
    )
    # A folder enriched by `enrich run` has its absolute path as the bucket (no S3 bucket name holds a
    # '/'): a worker could not fetch it, so it is named for a local re-run instead of queued.
    folders = sorted({row.bucket for row in found if "/" in row.bucket})
    refs = [_stored_ref(row) for row in found if "/" not in row.bucket]
    publisher = JobPublisher(settings)
    try:
        report = publisher.publish(refs)
    finally:
        publisher.close()
    console.print(f"queued {report.published} failed jobs on '{settings.queue}'")
    for reason in report.rejected:
        console.print(f"[yellow]rejected[/yellow] {escape(reason)}")
    for folder in folders:
        console.print(
            f"[yellow]not queued[/yellow] failures in the local folder {folder}: `enrich run {folder}`"
        )


def _stored_ref(row: Enrichment) -> ObjectRef:
    """The job again, with everything of its identity the row holds: the sequencer too, or the retried
    version would lose its place among the key's versions (and an older version become the latest row)."""
    return ObjectRef(
        row.bucket,
        row.key,
        version_id=row.version_id,
        etag=row.etag,
        size=row.size,
        sequencer=row.sequencer,  # stored padded; ObjectRef.sort_sequencer leaves a padded one as it is
    )


@app.command()
def soak(
    n: Annotated[int, typer.Option(help="Images to upload")] = 2000,
    workers: Annotated[int, typer.Option(help="Worker processes")] = 2,
    bad_fraction: Annotated[float, typer.Option(help="Share of corrupt images")] = 0.05,
    duplicate_fraction: Annotated[float, typer.Option(help="Share of events sent twice")] = 0.1,
    kill_every: Annotated[float, typer.Option(help="Seconds between worker SIGKILLs (0: none)")] = 15.0,
    outage_every: Annotated[float, typer.Option(help="Seconds between database outages (0: none)")] = 20.0,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds")] = 1800.0,
    seed: int = 0,
    s3_endpoint: Annotated[
        str | None, typer.Option(help="Use this S3 API server instead of a moto one")
    ] = None,
    bundle: Annotated[Path | None, typer.Option(help="Model bundle for the workers")] = None,
    reconcile_after: Annotated[
        float, typer.Option(help="Seconds without progress before missing keys are re-queued")
    ] = 90.0,
    worker_processes: Annotated[
        int, typer.Option(help="Processes per worker (>1: supervised; a kill hits one of them)")
    ] = 1,
) -> None:
    """Push N images through ingest -> Redis -> workers -> Postgres with faults injected; print the ledger."""
    from enrich.soak import run_soak

    settings = _settings()
    if not settings.database_url.startswith("postgresql"):
        raise typer.BadParameter("the soak needs ENRICH_DATABASE_URL to point at Postgres")
    ledger = run_soak(
        settings,
        n=n,
        workers=workers,
        bad_fraction=bad_fraction,
        duplicate_fraction=duplicate_fraction,
        kill_every_s=kill_every,
        outage_every_s=outage_every,
        timeout_s=timeout,
        seed=seed,
        s3_endpoint=s3_endpoint,
        bundle=bundle,
        reconcile_after_s=reconcile_after,
        worker_processes=worker_processes,
        log=console.print,
    )
    for line in ledger.lines():
        console.print(line)
    if not ledger.exact:
        raise typer.Exit(1)


@app.command()
def bench(
    images: Annotated[
        list[str] | None, typer.Option(help="small, fullres or a folder of JPEGs (repeatable)")
    ] = None,
    n: Annotated[int | None, typer.Option(help="Images per set (default: 4096 on GPU, 256 on CPU)")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option()] = None,
    bundle: Annotated[Path | None, typer.Option()] = None,
    end_to_end: Annotated[bool, typer.Option(help="Also run (c), (d) and the naive baseline")] = True,
    naive: Annotated[int | None, typer.Option(help="Images for the naive baseline (0: skip)")] = None,
    s3_endpoint: Annotated[
        str | None, typer.Option(help="An S3 API server to use instead of --s3-server")
    ] = None,
    s3_server: Annotated[
        S3Server, typer.Option(help="The S3 API server to start here: moto (one process) or nanio (several)")
    ] = S3Server.moto,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Append each set's results as Markdown to this file, and as JSON lines to its .jsonl "
            "sibling, as soon as the set finishes"
        ),
    ] = None,
    worker_processes: Annotated[
        int, typer.Option(help="Worker processes sharing the device in (c) and (d)")
    ] = 1,
    latency_rate: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="Images/s that (d) offers (default: half of (c)'s rate); fixed, to compare two builds "
            "at the same load",
        ),
    ] = None,
) -> None:
    """Measure model and decode ceilings, end-to-end throughput, latency and memory; print the figures."""
    from enrich.bench import markdown_section, run_bench
    from enrich.stack import catalogue_images
    from worker.runtime import load_model

    settings = _settings(batch_size=batch_size, device=device, model_bundle=bundle)
    if end_to_end and not settings.database_url.startswith("postgresql"):
        raise typer.BadParameter("the end-to-end run needs ENRICH_DATABASE_URL to point at Postgres")
    model = load_model(settings)
    on_gpu = str(getattr(model, "device", "cpu")).startswith("cuda")
    count = n or (4096 if on_gpu else 256)
    command = "enrich " + " ".join(sys.argv[1:])
    # A SIGTERM (`timeout` in scripts/device-bench) unwinds through run_bench's finally blocks, which stop
    # the worker and the S3 server; the sets already finished are on disk by then.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    for index, source in enumerate(images or ["small", "fullres"]):
        blobs = catalogue_images(count, source)
        console.print(f"[bold]{source}[/bold]: {count} images, batch {settings.batch_size}")
        report = run_bench(
            settings,
            model,
            blobs,
            label=source,
            s3_endpoint=s3_endpoint,
            end_to_end=end_to_end,
            naive_images=naive if naive is not None else min(count, 128),
            latency_images=min(count, 512),
            say=console.print,
            worker_processes=worker_processes,
            s3_server=s3_server.value,
            latency_rate=latency_rate,
        )
        # Each set as soon as it is measured, flushed: a run killed during the next set keeps this one.
        section = markdown_section([report], command, header=index == 0)
        console.print(section)
        if out is not None:
            import json

            with out.open("a") as handle:
                handle.write(section + "\n")
            with out.with_suffix(".jsonl").open("a") as handle:
                handle.write(json.dumps({"command": command, **report.to_json()}) + "\n")
        if not report.valid:
            console.print(
                f"[bold red]INVALID figures in {source}:[/bold red] "
                + escape("; ".join(f"{figure}: {why}" for figure, why in report.invalid.items()))
            )


# -- query ----------------------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _parse_time(value: str | None, option: str) -> datetime | None:
    """An ISO time (UTC unless it says otherwise) or a duration before now: 30s, 15m, 2h, 7d, 1w."""
    if value is None:
        return None
    if match := _RELATIVE.match(value.strip()):
        return datetime.now(UTC) - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither an ISO time (2026-11-01, 2026-11-01T12:00) nor a duration "
            "(30s, 15m, 2h, 7d, 1w)",
            param_hint=option,
        ) from None
    # In UTC, as the table holds it: SQLite keeps the wall time alone, so another offset would shift it.
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@app.command()
def query(
    where: Annotated[
        list[str] | None,
        typer.Option("--where", "-w", help="FIELD=VALUE, e.g. articleType=Tshirts (repeatable)"),
    ] = None,
    min_confidence: Annotated[
        float | None, typer.Option(help="Minimum confidence of the --where fields (all fields if none)")
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(help="ok, failed (any failure), failed_decode, ...", callback=_one_of(QUERY_STATUSES)),
    ] = None,
    since: Annotated[str | None, typer.Option(help="ISO time or relative: 30m, 2h, 7d, 1w")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time or relative")] = None,
    bucket: Annotated[str | None, typer.Option()] = None,
    prefix: Annotated[str | None, typer.Option(help="Key prefix")] = None,
    model_version: Annotated[str | None, typer.Option()] = None,
    all_versions: Annotated[
        bool, typer.Option(help="Every (image, model version) row, not only the latest")
    ] = False,
    output: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.table,
    limit: Annotated[int, typer.Option(min=1)] = 100,
) -> None:
    """Filter the enriched table and print it as a table, CSV or JSON lines."""
    equals: dict[str, str] = {}
    for clause in where or []:
        name, sep, value = clause.partition("=")
        if not sep:
            raise typer.BadParameter(f"--where needs FIELD=VALUE, got {clause!r}")
        equals[name.strip()] = value.strip()
    _print_rows(
        _settings(),
        output=output,
        limit=limit,
        equals=equals,
        min_confidence=min_confidence,
        status=status,
        since=_parse_time(since, "--since"),
        until=_parse_time(until, "--until"),
        bucket=bucket,
        key_prefix=prefix,
        model_version=model_version,
        all_versions=all_versions,
    )


@app.command()
def status(
    since: Annotated[str, typer.Option(help="Count the rows written since: ISO time or 30m, 2h, 7d")] = "1h",
    output: Annotated[OutputFormat, typer.Option("--format", help="table or json")] = OutputFormat.table,
) -> None:
    """Where the work stands: jobs waiting and held on the queue, rows written lately, rows by model
    version and status."""
    from enrich.status import queue_status, table_status, to_json, to_rich

    if output is OutputFormat.csv:
        raise typer.BadParameter("status prints a table or json", param_hint="--format")
    settings = _settings()
    after = _parse_time(since, "--since")
    assert after is not None  # given a value, it parses one or raises
    with _session(settings) as session:
        table = table_status(session, after)
    queue = queue_status(settings)
    if output is OutputFormat.json:
        sys.stdout.write(to_json(queue, table))
    else:
        console.print(to_rich(queue, table))


@contextmanager
def _session(settings: Settings) -> Iterator[Session]:
    """One short-lived engine per command: the CLI runs its queries and exits."""
    from schema.db import make_engine, make_session_factory

    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _query_rows(settings: Settings, query: EnrichmentQuery) -> list[Enrichment]:
    from schema.repository import query_enrichments

    try:
        with _session(settings) as session:
            return query_enrichments(session=session, query=query)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def _print_rows(settings: Settings, *, output: OutputFormat, limit: int, **filters: object) -> None:
    from enrich.output import to_csv, to_json_lines, to_table
    from schema.repository import EnrichmentQuery

    try:
        enrichment_query = EnrichmentQuery(limit=limit, **filters)  # type: ignore[arg-type]
    except TypeError as error:
        raise typer.BadParameter(str(error)) from None
    rows = _query_rows(settings, enrichment_query)
    if output is OutputFormat.json:
        sys.stdout.write(to_json_lines(rows))
    elif output is OutputFormat.csv:
        sys.stdout.write(to_csv(rows))
    else:
        console.print(to_table(rows, title=f"{len(rows)} rows"))


def _register_training() -> None:
    try:
        from training.cli import evaluate_command, train_command
    except ImportError:  # training not importable (partial install): the rest of the CLI still works
        return
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)


_register_training()


def _s3_url(url: str) -> tuple[str, str]:
    from schema.s3 import parse_s3_url

    try:
        return parse_s3_url(url)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="URL") from None


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # an unparsable URL holds no password we could find either
        return url


def _known_failure(error: Exception) -> str | None:
    """One line for a failure of the surroundings (a database, bucket or broker that is down, missing or
    misnamed) that the user fixes by configuration; None for anything else, which keeps its traceback."""
    import redis
    from botocore.exceptions import BotoCoreError, ClientError
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import ArgumentError, DBAPIError

    from schema.migrate import NewerDatabase

    if isinstance(error, NewerDatabase):
        return f"database: {error}"
    if isinstance(error, DBAPIError):
        cause = str(error.orig).strip().splitlines()[0] if error.orig is not None else str(error)
        if getattr(error.orig, "sqlstate", None) == "42P01" or "no such table" in cause:
            return f"database: {cause}: run `enrich db upgrade` first"
        return f"database: {cause}"
    if isinstance(error, ArgumentError):
        return f"ENRICH_DATABASE_URL: {error}"
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        return f"S3 {details.get('Code', '?')}: {details.get('Message') or error}"
    if isinstance(error, BotoCoreError):
        return f"S3: {error}"
    if isinstance(error, redis.RedisError | BrokerError):
        return f"broker: {error}"
    return None


def main() -> None:
    """The `enrich` command: the surroundings' failures end in one line and exit status 2."""
    try:
        app()
    except Exception as error:
        message = _known_failure(error)
        if message is None:
            raise
        Console(stderr=True).print(f"[red]error[/red]: {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
