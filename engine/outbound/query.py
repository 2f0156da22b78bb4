"""Operators' view of the application ACKs: list them, send some again."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select, update

from engine.store.schema import OUTBOUND_STATUSES, outbound


@dataclass(frozen=True, slots=True)
class AckFilter:
    status: str | None = None
    channel: str | None = None
    message_id: int | None = None
    limit: int = 100

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in OUTBOUND_STATUSES:
            raise ValueError(f"--status: expected one of {', '.join(OUTBOUND_STATUSES)}, got {self.status!r}")


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat(timespec="milliseconds")


def list_acks(engine: Engine, f: AckFilter) -> list[dict[str, Any]]:
    """Application ACKs, newest first."""
    o = outbound
    q = select(o.c.id, o.c.message_id, o.c.channel, o.c.code, o.c.control_id, o.c.destination, o.c.status,
               o.c.attempts, o.c.created_at, o.c.next_attempt_at, o.c.sent_at, o.c.answer, o.c.last_error)
    if f.status is not None:
        q = q.where(o.c.status == f.status)
    if f.channel is not None:
        q = q.where(o.c.channel == f.channel)
    if f.message_id is not None:
        q = q.where(o.c.message_id == f.message_id)
    with engine.connect() as conn:
        rows = conn.execute(q.order_by(o.c.id.desc()).limit(f.limit)).all()
    return [{"id": r.id, "message_id": r.message_id, "channel": r.channel, "code": r.code, "control_id": r.control_id,
             "destination": r.destination, "status": r.status, "attempts": r.attempts,
             "created_at": _iso(r.created_at),
             "next_attempt_at": _iso(r.next_attempt_at) if r.status == "pending" else None,
             "sent_at": _iso(r.sent_at), "answer": r.answer, "last_error": r.last_error} for r in rows]


def resend(engine: Engine, ids: list[int], *, status: str | None = None, channel: str | None = None,
           dry_run: bool = False) -> list[int]:
    """Make application ACKs due again (status pending, next attempt now, ``give_up_after``
    counted from now): the ``ids`` given (any status), or every one with ``status`` (expired or
    refused), optionally of one ``channel``. Returns the ids, oldest first."""
    o = outbound
    q = select(o.c.id)
    if ids:
        q = q.where(o.c.id.in_(ids))
    elif status in ("expired", "refused"):
        q = q.where(o.c.status == status)
    else:
        raise ValueError("give application ACK ids, or --status expired or --status refused")
    if channel is not None:
        q = q.where(o.c.channel == channel)
    with engine.begin() as conn:
        found = [r.id for r in conn.execute(q.order_by(o.c.id)).all()]
        if ids and len(found) < len(set(ids)):
            missing = sorted(set(ids) - set(found))
            raise ValueError(f"no application ACK with id {', '.join(map(str, missing))}")
        if found and not dry_run:
            now = datetime.now(UTC)
            conn.execute(update(o).where(o.c.id.in_(found)).values(status="pending", due_at=now, next_attempt_at=now))
    return found
