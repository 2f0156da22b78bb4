"""The ``hl7engine`` command."""

from __future__ import annotations

import json
import ssl
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from engine.errors import ConfigError, EngineError, UsageError

# markdown: a docstring's lines are joined into paragraphs (rich mode keeps the source's line breaks)
app = typer.Typer(add_completion=False, no_args_is_help=True, help="HL7 v2 interface engine.",
                  rich_markup_mode="markdown")
messages_app = typer.Typer(help="Find and inspect stored messages.", invoke_without_command=True)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(messages_app, name="messages")
record_app = typer.Typer(help="The central record.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(record_app, name="record")
acks_app = typer.Typer(help="Application ACKs (enhanced mode) owed to senders: list them, send them again.",
                       invoke_without_command=True)
app.add_typer(acks_app, name="app-acks")
outbound_app = typer.Typer(help="Messages forwarded to route destinations (mllp, file) and application ACKs: "
                           "list them, deliver them again.", invoke_without_command=True)
app.add_typer(outbound_app, name="outbound")
token_app = typer.Typer(help="Bearer tokens for the HTTP API (who may read the record).", no_args_is_help=True)
app.add_typer(token_app, name="token")

T = TypeVar("T")

ConfigDir = Annotated[
    Path, typer.Option("--config", "-c", help="configuration directory (channels/, mappings/, routes.yaml)",
                       file_okay=False, resolve_path=True)
]


def _settings() -> Any:
    from pydantic import ValidationError

    from engine.config.loader import describe
    from engine.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        for err in exc.errors():
            name = "HL7ENGINE_" + "_".join(str(p) for p in err["loc"]).upper()
            typer.echo(f"{name}: {describe(dict(err), Settings)}", err=True)
        raise typer.Exit(2) from None


def _setup_logging(settings: Any) -> None:
    from engine.observe import configure_logging

    configure_logging(settings.log_level, settings.log_format)


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def _load(config: Path) -> Any:
    from engine.config.project import load_project

    try:
        return load_project(config)
    except ConfigError as exc:
        for p in exc.problems:
            typer.echo(str(p), err=True)
        typer.echo(f"{len(exc.problems)} problem(s) in {config}; nothing started", err=True)
        raise typer.Exit(1) from None


@app.command()
def run(config: ConfigDir = Path(".")) -> None:
    """Everything on one machine: the listeners, HL7ENGINE_WORKERS worker processes (default 1) and
    the HTTP API (FHIR R4 read API, /metrics, /healthz) on HL7ENGINE_HTTP_PORT."""
    settings = _settings()
    _serve(config, settings, workers=settings.workers, api=True)


@app.command()
def listen(config: ConfigDir = Path(".")) -> None:
    """Run only the listeners (for scaling out: many listeners, many workers); /metrics on
    HL7ENGINE_HTTP_PORT."""
    _serve(config, _settings(), workers=0, api=False)


def _serve(config: Path, settings: Any, *, workers: int, api: bool) -> None:
    from engine import app as engine_app

    _setup_logging(settings)
    project = _load(config)
    if not any(c.config.enabled for c in project.channels):
        _fail(f"no enabled channel in {config / 'channels'}; add one (see docs/channels.md)")
    if settings.http_port:
        if api:
            tokens, tls = _api_access(settings)
            _start_api_thread(settings.resolved_database_url(config), settings.http_port, tokens, tls,
                              _broker_depths(settings), settings.queue_partitions)
        else:
            from prometheus_client import start_http_server

            try:
                start_http_server(settings.http_port)
            except OSError as exc:
                _fail(f"cannot serve metrics on port {settings.http_port}: {exc} (set HL7ENGINE_HTTP_PORT)")
    procs: list[Any] = []
    if workers:
        from engine.store import db
        from engine.worker.main import start_workers

        db.upgrade(settings.resolved_database_url(config))  # before the workers read it
        procs = start_workers(config, settings, workers)
    try:
        engine_app.run(engine_app.serve(project, settings), settings.loop)
    except OSError as exc:
        _fail(f"cannot start: {exc}")
    except EngineError as exc:
        _fail(f"cannot start: {exc}")
    finally:
        if procs:
            from engine.worker.main import stop_workers

            stop_workers(procs)


def _api_access(settings: Any) -> tuple[Any, dict[str, Any]]:
    """The API's tokens (from HL7ENGINE_API_TOKENS_FILE) and uvicorn's TLS options; exits with the
    problem when either is wrong."""
    from engine.admin.access import ApiTokens

    try:
        tokens = ApiTokens.load(settings.api_tokens_file)
    except ConfigError as exc:
        for p in exc.problems:
            typer.echo(str(p), err=True)
        _fail("the HTTP API was not started")
    cert, key = settings.http_tls_cert, settings.http_tls_key
    if (cert is None) != (key is None):
        _fail("HL7ENGINE_HTTP_TLS_CERT and HL7ENGINE_HTTP_TLS_KEY go together: set both or neither")
    tls: dict[str, Any] = {}
    if cert is not None and key is not None:
        for what, path in (("HL7ENGINE_HTTP_TLS_CERT", cert), ("HL7ENGINE_HTTP_TLS_KEY", key)):
            if not path.is_file():
                _fail(f"{what}: {path} is not a readable file")
        tls = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    return tokens, tls


def _broker_depths(settings: Any) -> Callable[[], list[tuple[str, int]]] | None:
    """With RabbitMQ, how /metrics reads the queues' depths; None with the embedded queue."""
    if not settings.broker_url:
        return None
    from engine.queue.rabbitmq import queue_depths

    url, name, partitions = settings.broker_url, settings.queue_name, settings.queue_partitions
    return lambda: queue_depths(url, name, partitions)


def _start_api_thread(database_url: str, port: int, tokens: Any, tls: dict[str, Any],
                      broker_depths: Callable[[], list[tuple[str, int]]] | None = None,
                      queue_partitions: int = 0) -> None:
    """The HTTP API in a thread of the listener process (light read traffic)."""
    import socket
    import threading

    import uvicorn

    from engine.admin.http import create_app

    try:  # fail now, with a clear message, rather than in the thread
        with socket.create_server(("0.0.0.0", port), reuse_port=False):
            pass
    except OSError as exc:
        _fail(f"cannot serve HTTP on port {port}: {exc} (set HL7ENGINE_HTTP_PORT)")
    server = uvicorn.Server(uvicorn.Config(create_app(database_url, tokens, broker_depths, queue_partitions),
                                           host="0.0.0.0", port=port, **tls, log_level="warning", access_log=False,
                                           loop="asyncio", timeout_graceful_shutdown=5))
    threading.Thread(target=server.run, name="http-api", daemon=True).start()  # signals stay with the listener


@app.command()
def work(
    config: ConfigDir = Path("."),
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, max=64,
                                         help="worker processes on this host")] = 2,
) -> None:
    """Consume the queue: route, map and write the central record (scale out: run on many hosts)."""
    from engine.worker.main import serve_workers

    settings = _settings()
    _setup_logging(settings)
    _load(config)
    if settings.http_port:  # the workers' metrics (engine/worker/metrics.py)
        from prometheus_client import start_http_server

        try:
            start_http_server(settings.http_port)
        except OSError as exc:  # e.g. a listener on the same host has the port: work on without metrics
            from engine.observe import get_logger

            get_logger("engine.worker").warning(
                "worker metrics not served", port=settings.http_port, error=str(exc)[:200],
                fix="give each process on a host its own HL7ENGINE_HTTP_PORT (0: none)")
    try:
        serve_workers(config, settings, workers)
    except EngineError as exc:
        _fail(f"cannot start workers: {exc}")


@app.command("workers")
def workers_list(
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
    config: ConfigDir = Path("."),
) -> None:
    """List the worker processes consuming RabbitMQ, on every host, and the partitions each consumes."""
    from engine.worker.members import LEASE, consumed_partitions, list_members

    members = _read_store(config, list_members)
    if as_json:
        for m in members:
            typer.echo(json.dumps({"id": m.id, "host": m.host, "pid": m.pid, "live": m.live,
                                   "heartbeat_age_s": round(m.heartbeat_age, 1), "partitions": m.partitions}))
        return
    if not members:
        typer.echo("no workers (workers on the embedded queue do not register; RabbitMQ workers do)")
        return
    typer.echo(f"{'MEMBER':<44} {'LIVE':<5} {'HEARTBEAT':>9}  PARTITIONS")
    for m in members:
        typer.echo(f"{m.id[:44]:<44} {'yes' if m.live else 'no':<5} {m.heartbeat_age:>7.1f} s  {m.partitions or '-'}")
    live = sum(1 for m in members if m.live)
    typer.echo(f"{live} live of {len(members)} (a member is live with a heartbeat in the last {LEASE:.0f} s); "
               f"partitions consumed: {len(consumed_partitions(members))}")


@app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
    config: ConfigDir = Path("."),
) -> None:
    """What needs attention now: the queue's depth, messages in error or held per channel, parked
    patients, forwards and application ACKs owed, RabbitMQ workers. Exit 0 when nothing needs anyone,
    1 when something does (errors, held messages, parked patients, expired deliveries, dead-lettered
    messages, partitions no worker consumes), 2 when the store or the broker does not answer."""
    from sqlalchemy.exc import SQLAlchemyError

    from engine.admin.state import read_store

    settings = _settings()
    depths = _broker_depths(settings)
    try:
        engine = _store_engine(config)
    except typer.Exit:  # no store file: it does not answer (exit 2, not "needs attention")
        raise typer.Exit(2) from None
    try:
        snap = read_store(engine, embedded_queue=depths is None)
    except SQLAlchemyError as exc:
        _fail(f"the message store does not answer ({type(exc).__name__}); is the database up, and migrated "
              f"(hl7engine db upgrade --config {config})?", 2)
    finally:
        engine.dispose()
    broker_error = ""
    queue = snap.queue
    if depths is not None:
        try:
            queue = depths()
        except Exception as exc:  # any failure of the broker read is reported, not raised
            broker_error = f"{type(exc).__name__}: {exc}"[:200]
    dead = sum(n for q, n in queue if q == "dead")
    waiting = sum(n for q, n in queue if q != "dead")
    unconsumed = snap.unconsumed(settings.queue_partitions)
    attention = (any(st in ("error", "held") for _, st, _ in snap.messages) or snap.parked > 0 or dead > 0
                 or any(st == "expired" for _, _, st, _ in snap.outbound) or bool(unconsumed))
    if as_json:
        typer.echo(json.dumps({
            "queue": {"kind": "rabbitmq" if depths is not None else "embedded", "waiting": waiting,
                      "dead_lettered": dead if depths is not None else None,
                      "partitions": {q: n for q, n in queue if q != "dead"},
                      "oldest_seconds": None if depths is not None else snap.queue_oldest,
                      "error": broker_error or None},
            "messages": [{"channel": c, "status": st, "count": n} for c, st, n in snap.messages],
            "parked_patients": snap.parked, "parked_oldest_seconds": snap.parked_oldest,
            "outbound": [{"kind": k, "target": t, "status": st, "count": n} for k, t, st, n in snap.outbound],
            "outbound_oldest_seconds": [{"kind": k, "target": t, "seconds": round(a, 1)}
                                        for k, t, a in snap.outbound_oldest],
            "workers": None if snap.live_workers is None else {"live": snap.live_workers,
                                                               "partitions_unconsumed": unconsumed},
            "needs_attention": attention}))
    else:
        if broker_error:
            typer.echo(f"queue: RabbitMQ does not answer: {broker_error}")
        elif depths is not None:
            typer.echo(f"queue (RabbitMQ): {waiting} waiting, {dead} dead-lettered; "
                       + ", ".join(f"{q} {n}" for q, n in queue if q != "dead"))
        else:
            oldest = f", oldest waiting {_span(snap.queue_oldest)}" if snap.queue_oldest is not None else ""
            typer.echo(f"queue (embedded): {waiting} waiting{oldest}"
                       + (f"; {', '.join(f'{q} {n}' for q, n in queue)}" if queue else ""))
        if snap.live_workers is not None:
            typer.echo(f"workers (RabbitMQ): {snap.live_workers} live; partitions nobody consumes: "
                       + (", ".join(f"p{p}" for p in unconsumed) if unconsumed else "none"))
        by_channel: dict[str, list[str]] = {}
        for c, st, n in snap.messages:
            by_channel.setdefault(c, []).append(f"{st} {n}")
        typer.echo("messages needing attention or in flight:" + ("" if by_channel else " none"))
        for c, parts in sorted(by_channel.items()):
            typer.echo(f"  {c}: {', '.join(parts)}")
        typer.echo(f"parked patients: {snap.parked}"
                   + (f" (the longest for {_span(snap.parked_oldest)})" if snap.parked_oldest is not None else ""))
        owed: dict[tuple[str, str], list[str]] = {}
        for k, t, st, n in snap.outbound:
            owed.setdefault((k, t), []).append(f"{st} {n}")
        ages = {(k, t): a for k, t, a in snap.outbound_oldest}
        typer.echo("deliveries owed:" + ("" if owed else " none"))
        for (k, t), parts in sorted(owed.items()):
            age = f" (oldest pending owed for {_span(ages[(k, t)])})" if (k, t) in ages else ""
            typer.echo(f"  {k} {t}: {', '.join(parts)}{age}")
        if attention:
            typer.echo("needs attention: `hl7engine messages --status error`, then `messages replay ID` or "
                       "`messages skip ID`; `hl7engine outbound --status expired` (docs/operations.md)")
    if broker_error:
        raise typer.Exit(2)
    if attention:
        raise typer.Exit(1)


def _span(seconds: float | None) -> str:
    """A duration for people: 45s, 12m 5s, 3h 20m, 2d 4h."""
    s = int(seconds or 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


@app.command()
def api(config: ConfigDir = Path(".")) -> None:
    """Serve the HTTP API alone: FHIR R4 read API under /fhir, /metrics, /healthz (HL7ENGINE_HTTP_PORT)."""
    import uvicorn

    from engine.admin.http import create_app
    from engine.store import db

    settings = _settings()
    _setup_logging(settings)
    tokens, tls = _api_access(settings)
    url = settings.resolved_database_url(config)
    db.upgrade(url)
    # a client keeping its connection open must not hold a SIGTERM off for ever
    uvicorn.run(create_app(url, tokens, _broker_depths(settings), settings.queue_partitions), host="0.0.0.0",
                port=settings.http_port or 8080, log_level="warning",
                access_log=False, timeout_graceful_shutdown=5, **tls)


@app.command("test")
def test_mappings(
    paths: Annotated[list[Path] | None,
                     typer.Argument(help="fixture tests or folders (default: mappings/tests)")] = None,
    config: ConfigDir = Path("."),
) -> None:
    """Run the mappings' fixture tests (a message in, the expected facts out); exit 1 on any failure."""
    from engine.mapping.testing import format_results, run_tests

    results = run_tests(config, [p.resolve() for p in paths] if paths else None)
    typer.echo(format_results(results))
    if not results or any(not r.passed for r in results):
        raise typer.Exit(1)


@app.command()
def check(config: ConfigDir = Path(".")) -> None:
    """Validate channels/, mappings/ and routes.yaml; print every problem as file:line:col."""
    from engine.config.project import load_project

    try:
        project = load_project(config)
    except ConfigError as exc:
        for p in exc.problems:
            typer.echo(str(p))
        typer.echo(f"{len(exc.problems)} problem(s)")
        raise typer.Exit(1) from None
    enabled = sum(1 for c in project.channels if c.config.enabled)
    ports = ", ".join(f"{c.name}:{c.config.listen.port}" for c in project.channels if c.config.enabled)
    mappings = len(project.mappings.names) if project.mappings is not None else 0
    forwards = len(project.routes.forwards())
    typer.echo(f"ok: {len(project.channels)} channel(s), {enabled} enabled ({ports or 'none'}); "
               f"{len(project.routes.routes)} route(s), default {project.routes.default}"
               + (f", {forwards} forward destination(s)" if forwards else "") + f"; {mappings} mapping(s)")


@app.command()
def diff(
    old: Annotated[Path, typer.Argument(file_okay=False, resolve_path=True, help="the configuration in use "
                                        "(e.g. a checkout of the deployed version)")],
    new: Annotated[Path, typer.Argument(file_okay=False, resolve_path=True, help="the changed configuration "
                                        "(default: --config)")] = Path("."),
    config: ConfigDir = Path("."),
) -> None:
    """Show what a configuration change does, one line per key (channels by name with their effective
    settings, routes by name and their order, mappings and tables by file); exit 0 when there is
    no difference, 1 when there are some, 2 when either directory has problems (listed as check
    lists them)."""
    from engine.config.diff import diff_projects
    from engine.config.project import load_project

    target = new if new != Path(".").resolve() else config
    projects = []
    for root in (old, target):
        try:
            projects.append(load_project(root))
        except ConfigError as exc:
            for p in exc.problems:
                typer.echo(str(p), err=True)
            typer.echo(f"{root}: {len(exc.problems)} problem(s); fix them first (hl7engine check --config {root})",
                       err=True)
            raise typer.Exit(2) from None
    found = diff_projects(projects[0], projects[1])
    for change in found:
        typer.echo(str(change))
    typer.echo(f"{len(found)} difference(s)" if found else "no differences", err=True)
    raise typer.Exit(1 if found else 0)


@app.command()
def send(
    address: Annotated[str, typer.Argument(help="HOST:PORT of an MLLP listener")],
    files: Annotated[list[Path], typer.Argument(help="files holding one or many messages", exists=True,
                                                 dir_okay=False)],
    tls: Annotated[bool, typer.Option(help="use TLS")] = False,
    ca: Annotated[Path | None, typer.Option(help="CA file to verify the server (with --tls)")] = None,
    cert: Annotated[Path | None, typer.Option(help="client certificate (mutual TLS)")] = None,
    key: Annotated[Path | None, typer.Option(help="client key (mutual TLS)")] = None,
    cr: Annotated[bool, typer.Option("--cr", help="turn LF and CRLF segment ends into CR before sending")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each ACK")] = 30.0,
    config: ConfigDir = Path("."),
) -> None:
    """Send messages over MLLP; print each ACK's MSA code and text. Exit 1 unless all were AA/CA."""
    from engine.mllp.client import MLLPClient, read_acks, split_messages, to_cr

    host, _, port_s = address.rpartition(":")
    if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        _fail(f"expected HOST:PORT with a port from 1 to 65535, got {address!r}", 2)
    ctx: ssl.SSLContext | None = None
    if tls:
        for option, path in (("--ca", ca), ("--cert", cert), ("--key", key)):
            if path is not None and not path.is_file():
                _fail(f"{option}: file {str(path)!r} not found", 2)
        try:
            ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
            if ca is None:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if cert:
                ctx.load_cert_chain(str(cert), str(key) if key else None)
        except (ssl.SSLError, OSError) as exc:
            _fail(f"cannot load the TLS files: {exc}", 2)
    failures = 0
    total = 0
    try:
        with MLLPClient(host, int(port_s), timeout=timeout, tls=ctx) as client:
            for path in files:
                pieces = split_messages(path.read_bytes())
                for i, piece in enumerate(pieces, 1):
                    total += 1
                    label = f"{path.name}#{i}" if len(pieces) > 1 else path.name
                    answer = client.send(to_cr(piece) if cr else piece, timeout)
                    if answer is None:
                        typer.echo(f"{label}: no ACK within {timeout:g}s")
                        failures += 1
                        continue
                    acks = read_acks(answer)
                    if answer.lstrip().startswith((b"FHS", b"BHS")):
                        typer.echo(f"{label}: batch answered, {len(acks)} message(s) not accepted")
                    elif not acks:
                        typer.echo(f"{label}: answer without MSA segment")
                        failures += 1
                    for ack in acks:
                        ok = ack.code in ("AA", "CA")
                        failures += 0 if ok else 1
                        text = f" {ack.text}" if ack.text else ""
                        typer.echo(f"{label}: {ack.code} {ack.control_id}{text}")
    except (OSError, ConnectionError) as exc:
        _fail(f"cannot send to {address}: {exc}", 2)
    if failures:
        typer.echo(f"{failures} of {total} not accepted", err=True)
        raise typer.Exit(1)


def _store_engine(config: Path) -> Any:
    from engine.store import db

    settings = _settings()
    url = settings.resolved_database_url(config)
    if db.is_sqlite(url):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            _fail(f"no message store at {path}; has the engine run with --config {config}?")
    return db.make_engine(url, pool_size=1)


SINCE_HELP = "received at or after: a time ago (30m, 2h, 1d) or a time (2026-12-06T08:00, UTC unless it has an offset)"
UNTIL_HELP = "received before: a time ago (30m, 2h, 1d) or a time (2026-12-06T09:00, UTC unless it has an offset)"


def _when(option: str, text: str | None) -> datetime | None:
    """A moment given as a time ago (``2h``) or an ISO time (naive: UTC); ValueError naming the option."""
    if text is None:
        return None
    from engine.config.models import parse_duration

    now = datetime.now(UTC)
    try:
        return now - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{option}: expected a time ago such as 2h or a time such as 2026-12-06T08:00, "
                         f"got {text!r}") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def _listed(rows: list[dict[str, Any]], as_json: bool, none: str) -> bool:
    """Print ``rows`` as JSON lines (``as_json``), or ``none`` when there are none; False: print a table."""
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, ensure_ascii=False))
        return True
    if not rows:
        typer.echo(none)
        return True
    return False


def _read_store(config: Path, read: Callable[[Any], T]) -> T:
    """``read(engine)`` on the store; a store without tables is a clear error, not a traceback."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    engine = _store_engine(config)
    try:
        return read(engine)
    except (OperationalError, ProgrammingError):
        _fail(f"the database has no tables yet; run `hl7engine db upgrade --config {config}` or start the engine")
    finally:
        engine.dispose()


@messages_app.callback()
def messages(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="received, queued, processing, processed, filtered, "
                                                    "error, held, replayed or duplicate")] = None,
    channel: Annotated[str | None, typer.Option(help="channel name")] = None,
    control_id: Annotated[str | None, typer.Option("--control-id", help="MSH-10")] = None,
    patient: Annotated[str | None, typer.Option(
        help="a patient identifier (PID-3, PID-2, PID-4, MRG-1), e.g. 4711 or 4711^MINSKLAB for one "
             "assigning authority")] = None,
    order: Annotated[str | None, typer.Option(
        help="an order number: accession (filler, OBR-3/ORC-3), placer (OBR-2/ORC-2) or specimen ID "
             "(SPM-2); value or value^namespace")] = None,
    step: Annotated[str | None, typer.Option(
        help="the step that failed: receive, store, enqueue, parse, validate, route, map, record, order")] = None,
    since: Annotated[str | None, typer.Option(help=SINCE_HELP)] = None,
    until: Annotated[str | None, typer.Option(help=UNTIL_HELP)] = None,
    limit: Annotated[int, typer.Option(help="most recent N")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
    config: ConfigDir = Path("."),
) -> None:
    """List stored messages, newest first. --patient and --order find the messages a worker has taken
    (and, after `hl7engine messages reindex`, the others)."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = config
        return
    from engine.store.query import MessageFilter, list_messages

    try:
        wanted = MessageFilter(status, channel, control_id, patient=patient, order=order, step=step, limit=limit,
                               since=_when("--since", since), until=_when("--until", until))
        rows = _read_store(config, lambda engine: list_messages(engine, wanted))
    except ValueError as exc:
        _fail(str(exc), 2)
    if _listed(rows, as_json, "no messages"):
        return
    typer.echo(f"{'ID':>8}  {'RECEIVED':<23}  {'CHANNEL':<12} {'TYPE':<9} {'CONTROL ID':<22} {'STATUS':<10} "
               f"{'ACK':<3}  ERROR")
    for r in rows:
        typer.echo(f"{r['id']:>8}  {r['received_at'][:23]:<23}  {r['channel'][:12]:<12} {(r['type'] or '')[:9]:<9} "
                   f"{(r['control_id'] or '')[:22]:<22} {r['status']:<10} {r['ack_code'] or '':<3}  "
                   f"{(r['error'] or '')[:80]}")


@messages_app.command("show")
def messages_show(
    ctx: typer.Context,
    message_id: Annotated[int, typer.Argument(help="message ID (from hl7engine messages)")],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
    config: Annotated[Path | None, typer.Option("--config", "-c", file_okay=False, resolve_path=True)] = None,
) -> None:
    """Show one message: metadata, its patient and order keys, its history, raw text (segments one per
    line) and the ACK sent."""
    from engine.store.query import get_message, summary

    cfg = config or (ctx.obj if isinstance(ctx.obj, Path) else Path(".").resolve())
    row = _read_store(cfg, lambda engine: get_message(engine, message_id))
    if row is None:
        _fail(f"no message with ID {message_id}")
    codec = row.get("charset") or "utf-8"
    raw = row["raw"].decode(codec, "replace")
    ack = row["ack"].decode(codec, "replace") if row["ack"] else None
    info = summary({k: row[k] for k in (
        "id", "channel", "received_at", "message_type", "trigger_event", "control_id", "sending_application",
        "sending_facility", "status", "ack_code", "error_step", "error", "size", "duplicate_of")})
    info.update({"uid": row["uid"], "peer": row["peer"], "version": row["version"], "charset": codec,
                 "sha256": row["sha256"], "partition": row["partition"], "batch_uid": row["batch_uid"]})
    for kind in ("patient", "order"):
        found = [f"{v}^{a}" if a else v for k, v, a in row["keys"] if k == kind]
        info[f"{kind}_keys"] = ", ".join(found) if found else None
    acked = row["acked_at"].isoformat(timespec="milliseconds") if row.get("acked_at") else None
    history = [{"at": info["received_at"], "status": "received", "step": "receive",
                "detail": f"answered {row['ack_code']}" + (f" at {acked}" if acked else "") if row["ack_code"]
                else None}, *row["events"], *(_outbound_event(a) for a in row["application_acks"]),
               *(_outbound_event(f) for f in row["forwards"])]
    history.sort(key=lambda e: e["at"])
    if as_json:
        typer.echo(json.dumps({**info, "history": history, "application_acks": row["application_acks"],
                               "forwards": row["forwards"], "raw": raw, "ack": ack}, ensure_ascii=False))
        return
    for k, v in info.items():
        if v is not None:
            typer.echo(f"{k + ':':<22}{v}")
    typer.echo("\n--- history ---")
    for e in history:
        typer.echo(f"{e['at'][:23]}  {e['status']:<10} {e['step'] or '':<9} {e['detail'] or ''}".rstrip())
    typer.echo("\n--- message ---")
    typer.echo("\n".join(s for s in raw.replace("\r\n", "\r").replace("\n", "\r").split("\r")))
    if ack:
        typer.echo("--- ACK sent ---")
        typer.echo("\n".join(s for s in ack.split("\r") if s))


def _outbound_event(a: dict[str, Any]) -> dict[str, Any]:
    """An application ACK (enhanced mode), or a forward to a route destination, as a line of the
    message's history."""
    if a["kind"] == "app_ack":
        where = f"{a['code']} {a['control_id']} to {a['destination']}"
    else:
        where = f"to {a['destination_name']} ({a['kind']} {a['destination']})"
    if a["status"] == "sent":
        detail = f"{where}: sent at {a['sent_at']}, answered {a['answer']}"
    elif a["status"] == "pending":
        tried = f", attempt {a['attempts']} failed: {a['last_error']}" if a["attempts"] else ""
        detail = f"{where}: pending, next attempt {a['next_attempt_at']}{tried}"
    else:
        detail = f"{where}: {a['status']} after {a['attempts']} attempt(s): {a['last_error']}"
    return {"at": a["created_at"], "status": "app_ack" if a["kind"] == "app_ack" else "forward", "step": "deliver",
            "detail": detail}


@messages_app.command("reindex")
def messages_reindex(config: ConfigDir = Path(".")) -> None:
    """Index, for --patient and --order, the messages no worker has indexed: refused ones, and those
    stored before this engine version. Safe to run at any time, and again."""
    from engine.store.keys import reindex

    read, written = _read_store(config, reindex)
    typer.echo(f"read {read} message(s) without keys, wrote {written} patient and order key(s)"
               + (" (the others hold no patient identifier or order number)" if read and written == 0 else ""))


@messages_app.command("replay")
def messages_replay(
    message_id: Annotated[int | None, typer.Argument(
        help="the message's id (hl7engine messages --status error); leave out to replay every failed "
             "message matching the options")] = None,
    channel: Annotated[str | None, typer.Option(help="only failed messages of this channel")] = None,
    step: Annotated[str | None, typer.Option(help="only those that failed at this step, e.g. map")] = None,
    patient: Annotated[str | None, typer.Option(help="only those of this patient identifier")] = None,
    order: Annotated[str | None, typer.Option(help="only those of this order number")] = None,
    since: Annotated[str | None, typer.Option(help=SINCE_HELP)] = None,
    until: Annotated[str | None, typer.Option(help=UNTIL_HELP)] = None,
    every: Annotated[bool, typer.Option("--all", help="every failed message (needed when no other option "
                                                      "narrows them)")] = False,
    limit: Annotated[int, typer.Option(help="at most N messages, oldest first")] = 10_000,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list what would be replayed")] = False,
    config: ConfigDir = Path("."),
) -> None:
    """Queue a failed message again, then the messages of its patient held behind it, in order.
    Without an ID: every message that failed in processing and matches the options, oldest first
    (after fixing a mapping: --step map --channel lab)."""
    if message_id is not None:
        if channel or step or patient or order or since or until or every:
            _fail("give a message ID or options that select messages, not both", 2)
        _release(config, message_id, skip=False)
        return
    if not (channel or step or patient or order or since or until or every):
        _fail("which messages? give a message ID, or --channel, --step, --patient, --order, --since, --until, "
              "or --all", 2)
    from engine.store.query import MessageFilter, replayable_ids
    from engine.worker.replay import Requeue, release

    try:
        wanted = MessageFilter(channel=channel, step=step, patient=patient, order=order, limit=limit,
                               since=_when("--since", since), until=_when("--until", until))
    except ValueError as exc:
        _fail(str(exc), 2)
    ids = _read_store(config, lambda engine: replayable_ids(engine, wanted))
    if dry_run or not ids:
        verb = "would replay" if dry_run else "replayed"
        typer.echo(f"{verb} {len(ids)} failed message(s)" + (f": {_id_list(ids)}" if ids else ""))
        return
    engine = _store_engine(config)
    settings = _settings()
    requeue = Requeue(settings)  # one broker connection for them all
    replayed: list[int] = []
    queued = 0
    problems: list[str] = []
    try:
        for mid in ids:
            try:
                done = release(engine, settings, mid, skip=False, requeue=requeue)
            except EngineError as exc:  # changed meanwhile (replayed by someone else, ...), or the broker failed
                problems.append(f"{mid}: {exc}")
                continue
            replayed.append(mid)
            queued += len(done.queued)
    finally:
        requeue.close()
        engine.dispose()
    typer.echo(f"replayed {len(replayed)} failed message(s); {queued} message(s) queued again "
               f"(held ones included)" + (f": {_id_list(replayed)}" if replayed else ""))
    for line in problems:
        typer.echo(f"not replayed: {line}", err=True)
    if problems:
        raise typer.Exit(1)


def _id_list(ids: list[int], show: int = 20) -> str:
    text = ", ".join(str(i) for i in ids[:show])
    return text + (f" ... ({len(ids) - show} more)" if len(ids) > show else "")


@messages_app.command("skip")
def messages_skip(
    message_id: Annotated[int, typer.Argument(help="the message's id (hl7engine messages --status error)")],
    config: ConfigDir = Path("."),
) -> None:
    """Leave a failed message failed and release the messages of its patient held behind it."""
    _release(config, message_id, skip=True)


@messages_app.command("purge")
def messages_purge(
    older_than: Annotated[str, typer.Option("--older-than", help="received at least this long ago "
                                            "(e.g. 90d); default: HL7ENGINE_RETAIN_MESSAGES")] = "",
    include_errors: Annotated[bool, typer.Option("--include-errors", help="also messages that failed in "
                                                 "processing and park no patient (skipped, or without a patient)")
                              ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only count them")] = False,
    config: ConfigDir = Path("."),
) -> None:
    """Remove finished messages (processed, filtered, duplicate, refused at receipt) older than the
    retention period from the message store, with their history, search keys and delivered outbound
    rows. The central record is kept. `run`/`listen` do this hourly when HL7ENGINE_RETAIN_MESSAGES
    is set."""
    from datetime import timedelta

    from engine.config.models import parse_duration
    from engine.store import db
    from engine.store.retention import purge

    settings = _settings()
    if not older_than and settings.retain_messages is None:
        _fail("--older-than: give the retention period, e.g. --older-than 90d (or set HL7ENGINE_RETAIN_MESSAGES)", 2)
    try:
        seconds = parse_duration(older_than) if older_than else float(settings.retain_messages)
    except ValueError as exc:
        _fail(f"--older-than: {exc}", 2)
    _store_engine(config).dispose()  # says so when there is no store
    url = settings.resolved_database_url(config)
    engine = db.make_engine(url, pool_size=1, writer=db.is_sqlite(url), repeatable=True)
    try:
        done = purge(engine, timedelta(seconds=seconds), include_errors=include_errors, dry_run=dry_run)
    finally:
        engine.dispose()
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(done.by_status.items())) or "none"
    cutoff = done.cutoff.isoformat(timespec="seconds") if done.cutoff else "?"
    if dry_run:
        typer.echo(f"would remove {done.messages} message(s) received before {cutoff} ({statuses})")
    else:
        typer.echo(f"removed {done.messages} message(s) received before {cutoff} ({statuses}), "
                   f"{done.events} history line(s), {done.outbound} delivered outbound row(s)")
    if done.kept_for_duplicates:
        typer.echo(f"kept {done.kept_for_duplicates} old message(s) that newer duplicates point at")


@messages_app.command("requeue")
def messages_requeue(
    older_than: Annotated[str, typer.Option("--older-than", help="waiting since at least this long "
                                            "(e.g. 30m, 2h, 1d)")] = "1h",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only count them")] = False,
    config: ConfigDir = Path("."),
) -> None:
    """Queue again the messages still waiting (queued/replayed) whose queue entry was lost: after
    the broker lost its data or a queue was deleted. A message queued twice is processed once."""
    from datetime import timedelta

    from engine.config.models import parse_duration
    from engine.worker.replay import requeue_stuck

    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        _fail(f"--older-than: {exc}")
    engine = _store_engine(config)
    try:
        ids = requeue_stuck(engine, _settings(), older_than=timedelta(seconds=seconds), dry_run=dry_run)
    except EngineError as exc:
        _fail(str(exc))
    finally:
        engine.dispose()
    verb = "would queue again" if dry_run else "queued again"
    typer.echo(f"{verb} {len(ids)} message(s) waiting for more than {older_than}"
               + (f" (ids {ids[0]}..{ids[-1]})" if ids else ""))


def _release(config: Path, message_id: int, *, skip: bool) -> None:
    from engine.worker.replay import release

    engine = _store_engine(config)
    try:
        done = release(engine, _settings(), message_id, skip=skip)
    except EngineError as exc:
        _fail(str(exc))
    finally:
        engine.dispose()
    what = "skipped" if skip else "replayed"
    typer.echo(f"{what} message {message_id}; {len(done.queued)} message(s) queued again")


@acks_app.callback()
def app_acks(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="pending, sent, refused or expired")] = None,
    channel: Annotated[str | None, typer.Option(help="channel name")] = None,
    message: Annotated[int | None, typer.Option(help="the message's id")] = None,
    limit: Annotated[int, typer.Option(help="most recent N")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
    config: ConfigDir = Path("."),
) -> None:
    """List application ACKs, newest first: what each answers, where it goes and whether it got there."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = config
        return
    from engine.outbound.query import OutboundFilter, list_outbound

    try:
        wanted = OutboundFilter(status, channel, message, limit, kinds=("app_ack",))
    except ValueError as exc:
        _fail(str(exc), 2)
    rows = _read_store(config, lambda engine: list_outbound(engine, wanted))
    if _listed(rows, as_json, "no application ACKs"):
        return
    typer.echo(f"{'ID':>7}  {'MESSAGE':>8}  {'CHANNEL':<12} {'ACK':<3} {'CONTROL ID':<20} {'STATUS':<8} {'TRIES':>5}  "
               "DESTINATION / LAST ERROR")
    for r in rows:
        note = r["last_error"] if r["status"] != "sent" and r["last_error"] else r["destination"]
        typer.echo(f"{r['id']:>7}  {r['message_id']:>8}  {r['channel'][:12]:<12} {r['code']:<3} "
                   f"{r['control_id'][:20]:<20} {r['status']:<8} {r['attempts']:>5}  {note}")


@acks_app.command("resend")
def app_acks_resend(
    ctx: typer.Context,
    ids: Annotated[list[int] | None, typer.Argument(help="application ACK ids (hl7engine app-acks)")] = None,
    status: Annotated[str | None, typer.Option(help="instead of ids: every one that is expired, or refused")] = None,
    channel: Annotated[str | None, typer.Option(help="only this channel's")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list them")] = False,
    config: Annotated[Path | None, typer.Option("--config", "-c", file_okay=False, resolve_path=True)] = None,
) -> None:
    """Send application ACKs again, at once: for example after the sender's listener was down for
    longer than give_up_after (--status expired). The listener process delivers them."""
    from engine.outbound.query import resend

    _outbound_change(ctx, config, lambda engine: resend(engine, ids or [], status=status, channel=channel,
                                                        dry_run=dry_run),
                     "would send again" if dry_run else "will send again", "application ACK(s)")


@outbound_app.callback()
def outbound_list(
    ctx: typer.Context,
    destination: Annotated[str | None, typer.Option(help="a route destination's name (routes.yaml)")] = None,
    kind: Annotated[list[str] | None, typer.Option(help="mllp, file or app_ack (repeatable; default: all)")] = None,
    status: Annotated[str | None, typer.Option(help="pending, sent, refused or expired")] = None,
    channel: Annotated[str | None, typer.Option(help="the message's channel")] = None,
    message: Annotated[int | None, typer.Option(help="the message's id")] = None,
    limit: Annotated[int, typer.Option(help="most recent N")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
    config: ConfigDir = Path("."),
) -> None:
    """List what the engine delivers to other systems, newest first: messages forwarded to route
    destinations and application ACKs; where each goes and whether it got there."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = config
        return
    from engine.outbound.query import KINDS, OutboundFilter, list_outbound

    try:
        wanted = OutboundFilter(status, channel, message, limit, tuple(kind) if kind else KINDS, destination)
    except ValueError as exc:
        _fail(str(exc), 2)
    rows = _read_store(config, lambda engine: list_outbound(engine, wanted))
    if _listed(rows, as_json, "nothing outbound"):
        return
    typer.echo(f"{'ID':>7}  {'MESSAGE':>8}  {'KIND':<7} {'TO':<16} {'CONTROL ID':<20} {'STATUS':<8} {'TRIES':>5}  "
               "WHERE / LAST ERROR")
    for r in rows:
        to = r.get("destination_name") or f"{r['channel']} sender"
        note = r["last_error"] if r["status"] != "sent" and r["last_error"] else r["destination"]
        typer.echo(f"{r['id']:>7}  {r['message_id']:>8}  {r['kind']:<7} {to[:16]:<16} {r['control_id'][:20]:<20} "
                   f"{r['status']:<8} {r['attempts']:>5}  {note}")


@outbound_app.command("resend")
def outbound_resend(
    ctx: typer.Context,
    ids: Annotated[list[int] | None, typer.Argument(help="ids from hl7engine outbound")] = None,
    status: Annotated[str | None, typer.Option(help="instead of ids: every one that is expired, or refused")] = None,
    destination: Annotated[str | None, typer.Option(help="only this route destination's")] = None,
    channel: Annotated[str | None, typer.Option(help="only messages of this channel")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list them")] = False,
    config: Annotated[Path | None, typer.Option("--config", "-c", file_okay=False, resolve_path=True)] = None,
) -> None:
    """Deliver forwarded messages (and application ACKs) again, at once: for example after a
    downstream system was down for longer than give_up_after (--status expired). The listener
    process delivers them, in order per destination."""
    from engine.outbound.query import KINDS, resend

    _outbound_change(ctx, config, lambda engine: resend(engine, ids or [], status=status, channel=channel,
                                                        kinds=KINDS, destination=destination, dry_run=dry_run),
                     "would deliver again" if dry_run else "will deliver again", "outbound message(s)")


@outbound_app.command("cancel")
def outbound_cancel(
    ctx: typer.Context,
    ids: Annotated[list[int] | None, typer.Argument(help="ids from hl7engine outbound")] = None,
    destination: Annotated[str | None, typer.Option(help="instead of ids: every undelivered one of this route "
                                                    "destination (e.g. one removed from routes.yaml)")] = None,
    channel: Annotated[str | None, typer.Option(help="only messages of this channel")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list them")] = False,
    config: Annotated[Path | None, typer.Option("--config", "-c", file_okay=False, resolve_path=True)] = None,
) -> None:
    """Give up for good on outbound messages not delivered (pending, expired or refused): status
    cancelled, never sent again; `resend` still can. For a downstream system taken out of service.
    The destination's later messages then go on."""
    from engine.outbound.query import cancel

    _outbound_change(ctx, config, lambda engine: cancel(engine, ids or [], destination=destination,
                                                        channel=channel, dry_run=dry_run),
                     "would cancel" if dry_run else "cancelled", "outbound message(s)")


def _outbound_change(ctx: typer.Context, config: Path | None, change: Callable[[Any], list[int]], verb: str,
                     what: str) -> None:
    """Run a change of ``outbound`` rows (resend, cancel) on the store and say what it did."""
    cfg = config or (ctx.obj if isinstance(ctx.obj, Path) else Path(".").resolve())
    try:
        found = _read_store(cfg, change)
    except ValueError as exc:
        _fail(str(exc), 2)
    typer.echo(f"{verb} {len(found)} {what}" + (f" (ids {found[0]}..{found[-1]})" if found else ""))


@token_app.command("new")
def token_new(
    name: Annotated[str, typer.Argument(help="who the token is for, e.g. clinic-portal (shown in the access log)")],
    file: Annotated[Path | None, typer.Option("--file", "-f", help="append its line to this tokens file "
                                              "(HL7ENGINE_API_TOKENS_FILE)")] = None,
) -> None:
    """Make a new API token: prints the token (once: only its SHA-256 is kept) and its tokens-file line."""
    from engine.admin.access import ApiTokens, new_token

    try:
        token, line = new_token(name)
    except ValueError as exc:
        _fail(f"NAME: {exc}")
    if file is not None:
        if file.exists():
            try:
                known = ApiTokens.load(file)
            except ConfigError as exc:
                for p in exc.problems:
                    typer.echo(str(p), err=True)
                _fail(f"{file} has problems; nothing added")
            if name in known.by_hash.values():
                _fail(f"{file} already has a token named {name!r}; choose another name or remove that line")
        with file.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
        file.chmod(0o600)
        typer.echo(f"added {name!r} to {file}; restart the API (or `run`) to use it", err=True)
    else:
        typer.echo(f"tokens-file line: {line}", err=True)
    typer.echo(token)


@record_app.command("export")
def record_export(
    identifier: Annotated[str | None, typer.Option("--identifier", "-i",
                                                   help="a patient identifier: system|value or a bare value")] = None,
    config: ConfigDir = Path("."),
) -> None:
    """Print a FHIR R4 Bundle (JSON) of one patient's record, or of every patient's."""
    from engine.record.export import export_bundle

    engine = _store_engine(config)
    with engine.connect() as conn:
        bundle = export_bundle(conn, identifier)
    if identifier is not None and not bundle.get("entry"):
        _fail(f"no patient with identifier {identifier!r}")
    typer.echo(json.dumps(bundle, ensure_ascii=False, indent=2))


@db_app.command("upgrade")
def db_upgrade(config: ConfigDir = Path("."), revision: str = "head") -> None:
    """Apply database migrations (also done when the engine starts)."""
    from engine.store import db

    url = _settings().resolved_database_url(config)
    db.upgrade(url, revision)
    typer.echo(f"database at revision {db.current_revision(url)}")


@db_app.command("current")
def db_current(config: ConfigDir = Path(".")) -> None:
    """Print the database's migration revision."""
    from engine.store import db

    url = _settings().resolved_database_url(config)
    if db.is_sqlite(url) and not Path(url.removeprefix("sqlite:///")).exists():
        typer.echo("no message store yet")
        return
    typer.echo(db.current_revision(url) or "empty")


def main() -> None:
    try:
        app()
    except UsageError as exc:
        typer.echo(str(exc), err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
