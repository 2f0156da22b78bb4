"""The admin HTTP API: the central record as a read-only FHIR R4 server, and a health check.

``create_app(database_url)`` returns a FastAPI app serving

- ``GET /fhir/metadata`` — a CapabilityStatement (what can be read and searched);
- ``GET /fhir/{type}/{id}`` — one resource (``Patient``, ``Observation``, …);
- ``GET /fhir/{type}?…`` — a searchset Bundle (parameters in ``engine.record.fhir``);
- ``GET /healthz`` — ``{"status": "ok"}`` when the database answers, else 503;
- ``GET /metrics`` — Prometheus metrics, with gauges of the shared state (``engine.admin.state``).

Reading ``/fhir`` needs a bearer token, or, without a tokens file, a loopback client
(``engine.admin.access``). Responses are ``application/fhir+json``; errors are OperationOutcome
resources with 401 (no or unknown token), 404 (unknown type or id, unknown path) or 400 (bad
search). Repeating a search parameter is refused (400). Nothing about patients is logged.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.admin.access import ApiTokens
from engine.admin.state import StateCollector
from engine.observe import get_logger
from engine.record.fhir import PARAMS, RESOURCE_TYPES, SearchError, UnknownResourceType, read, search
from engine.store.db import make_engine

log = get_logger("engine.admin")
FHIR_JSON = "application/fhir+json"
SEARCH_TYPES = {"_id": "token", "_count": "number", "identifier": "token", "patient": "reference",
                "subject": "reference", "code": "token"}


def fhir_response(body: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body, ensure_ascii=False, separators=(",", ":")), status_code=status,
                    media_type=FHIR_JSON)


def outcome(status: int, code: str, diagnostics: str) -> Response:
    """An OperationOutcome with one error issue (``code`` from the FHIR issue-type value set)."""
    return fhir_response({"resourceType": "OperationOutcome",
                          "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]}, status)


def capability_statement() -> dict[str, Any]:
    resources = []
    for rt in RESOURCE_TYPES:
        params = [{"name": p, "type": SEARCH_TYPES[p]} for p in sorted(PARAMS[rt])]
        params.append({"name": "_count", "type": "number"})
        resources.append({"type": rt, "interaction": [{"code": "read"}, {"code": "search-type"}],
                          "searchParam": params})
    return {
        "resourceType": "CapabilityStatement", "status": "active", "date": datetime.now(UTC).date().isoformat(),
        "kind": "instance", "software": {"name": "hl7engine"},
        "implementation": {"description": "hl7engine central record (read-only)"},
        "fhirVersion": "4.0.1", "format": ["json"],
        "rest": [{"mode": "server", "resource": resources}],
    }


def create_app(database_url: str, tokens: ApiTokens | None = None,
               broker_depths: Callable[[], list[tuple[str, int]]] | None = None, queue_partitions: int = 0) -> FastAPI:
    """The app; ``tokens``: who may read ``/fhir`` (None: no tokens file, loopback clients only);
    ``broker_depths``: with RabbitMQ, how to read the queues' depths for /metrics (``engine.admin.state``);
    ``queue_partitions``: the embedded queue's partitions, each reported even when empty."""
    engine = make_engine(database_url, pool_size=4)
    access = tokens if tokens is not None else ApiTokens()
    state = CollectorRegistry(auto_describe=False)
    state.register(StateCollector(engine, broker_depths, partitions=queue_partitions))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(title="hl7engine admin", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        code = "not-found" if exc.status_code == 404 else "not-supported" if exc.status_code == 405 else "processing"
        return outcome(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _server_error(_request: Request, exc: Exception) -> Response:
        # the detail may hold data from the record: log nothing of it, answer a generic outcome
        return outcome(500, "exception", f"internal error ({type(exc).__name__})")

    @app.middleware("http")
    async def _access(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        if not path.startswith("/fhir") or path.rstrip("/") == "/fhir/metadata":
            return await call_next(request)
        host = request.client.host if request.client is not None else None
        who = access.client(request.headers.get("authorization"), host)
        kind = path.removeprefix("/fhir").strip("/").split("/", 1)[0][:64]
        if who is None:
            log.warning("record read refused", resource_type=kind, peer=host,
                        reason="token unknown" if request.headers.get("authorization") else "no token")
            refused = outcome(401, "login", "this API serves patient data: send Authorization: Bearer <token>; "
                                            "tokens are listed in HL7ENGINE_API_TOKENS_FILE (hl7engine token new "
                                            "NAME; docs/operations.md)")
            refused.headers["WWW-Authenticate"] = 'Bearer realm="hl7engine"'
            return refused
        response = await call_next(request)
        log.info("record read", client=who, resource_type=kind, status=response.status_code)
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus metrics of this process (with ``hl7engine run``: the listeners' and workers'),
        and the shared state: queue depths, messages needing attention, parked patients, owed
        deliveries."""
        return Response(generate_latest() + generate_latest(state), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> Response:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/fhir/metadata")
    def metadata() -> Response:
        return fhir_response(capability_statement())

    @app.get("/fhir/{resource_type}/{resource_id}")
    def read_resource(resource_type: str, resource_id: str) -> Response:
        if resource_type not in RESOURCE_TYPES:
            return _unknown_type(resource_type)
        with engine.connect() as conn:
            resource = read(conn, resource_type, resource_id)
        if resource is None:
            return outcome(404, "not-found", f"{resource_type}/{resource_id} is not in the record")
        return fhir_response(resource)

    @app.get("/fhir/{resource_type}")
    def search_resources(resource_type: str, request: Request) -> Response:
        if resource_type not in RESOURCE_TYPES:
            return _unknown_type(resource_type)
        params: dict[str, str] = {}
        for name, value in request.query_params.multi_items():
            if name in params:
                return outcome(400, "not-supported", f"search parameter {name!r} is repeated; give it once")
            params[name] = value
        base = str(request.base_url).rstrip("/") + "/fhir"
        try:
            with engine.connect() as conn:
                bundle = search(conn, resource_type, params, base_url=base)
        except UnknownResourceType as exc:
            return outcome(404, "not-supported", str(exc))
        except SearchError as exc:
            return outcome(400, "invalid", str(exc))
        return fhir_response(bundle)

    return app


def _unknown_type(resource_type: str) -> Response:
    known = ", ".join(RESOURCE_TYPES)
    return outcome(404, "not-supported", f"unknown resource type {resource_type[:64]!r}; the record serves {known}")

