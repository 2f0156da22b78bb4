"""Route destinations beyond the record: a processed message forwarded, as received, to a downstream
MLLP listener (``type: mllp``) or written to a file of its own (``type: file``).

The worker writes one ``outbound`` row per forward destination of the message's route, in the
transaction that marks the message processed, so a message is forwarded if and only if it was
processed; ``engine.outbound.deliver`` sends the rows afterwards, in order per destination, at least
once. The bytes are the message's own (``messages.raw``), and a file's name is fixed here, so every
attempt, and a replay, writes the same file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from engine.config.routes import FileDestination, Forward, MLLPDestination, RoutesConfig, filename_fields

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_PART = 64  # characters of one field's value in a file name
MAX_NAME = 300  # characters of a whole file name (outbound.destination)


def safe(value: str) -> str:
    """A field's value as part of a file name: letters, digits, ``. _ -`` only, never ``.``/``..``."""
    out = _UNSAFE.sub("_", value)[:MAX_PART]
    return "_" + out[1:] if not out or out.startswith(".") else out


def filename(template: str | list[tuple[str, str, str]], fields: Mapping[str, Any]) -> str:
    """The file name ``template`` (or its parts, from ``filename_fields``) gives for a message's
    ``fields`` (see FILENAME_FIELDS)."""
    out = []
    for literal, field, spec in filename_fields(template) if isinstance(template, str) else template:
        out.append(literal)
        if not field:
            continue
        value = fields.get(field)
        if field == "received":
            at = value if isinstance(value, datetime) else datetime.now(UTC)
            at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
            out.append(safe(at.strftime(spec or "%Y%m%dT%H%M%S")))
        else:
            out.append(safe("" if value is None else str(value)))
    return "".join(out)[:MAX_NAME]


class Forwards:
    """The forward destinations of every route (``routes.yaml``), for the worker."""

    def __init__(self, routes: RoutesConfig) -> None:
        self.by_route: dict[str, list[Forward]] = {r.name: r.forwards for r in routes.routes if r.forwards}
        self._templates = {d.name: filename_fields(d.filename) for fs in self.by_route.values() for d in fs
                           if isinstance(d, FileDestination)}

    def __bool__(self) -> bool:
        return bool(self.by_route)

    def rows(self, route: str, row: Any, now: datetime) -> list[dict[str, Any]]:
        """``outbound`` rows for message ``row`` (a ``messages`` row) processed through ``route``."""
        out: list[dict[str, Any]] = []
        for d in self.by_route.get(route, ()):
            if isinstance(d, MLLPDestination):
                where = d.to
            else:
                where = filename(self._templates[d.name], {
                    "channel": row.channel, "message_id": row.id, "uid": row.uid, "control_id": row.control_id,
                    "type": row.message_type, "event": row.trigger_event,
                    "facility": (row.sending_facility or "").split("^", 1)[0], "received": row.received_at})
            out.append({"message_id": row.id, "kind": d.type, "channel": row.channel, "target": d.name,
                        "destination": where, "control_id": (row.control_id or "")[:64], "code": "",
                        "payload": row.raw, "status": "pending", "attempts": 0, "created_at": now,
                        "due_at": now, "next_attempt_at": now})
        return out
