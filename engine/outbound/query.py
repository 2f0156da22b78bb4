"""Operators' view of ``outbound``: application ACKs and messages forwarded to route destinations;
list them, deliver some again."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Select, select, update

from engine.outbound.appack import KIND as APP_ACK
from engine.store.schema import OUTBOUND_STATUSES, outbound

KINDS = (APP_ACK, "mllp", "file")
FORWARD_KINDS = ("mllp", "file")


@dataclass(frozen=True, slots=True)
class OutboundFilter:
    status: str | None = None
    channel: str | None = None
    message_id: int | None = None
    limit: int = 100
    kinds: tuple[str, ...] = KINDS
    destination: str | None = None  # a route destination's name

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in OUTBOUND_STATUSES:
            raise ValueError(f"--status: expected one of {', '.join(OUTBOUND_STATUSES)}, got {self.status!r}")
        for kind in self.kinds:
            if kind not in KINDS:
                raise ValueError(f"--kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat(timespec="milliseconds")


def list_outbound(engine: Engine, f: OutboundFilter) -> list[dict[str, Any]]:
    """Rows of ``outbound``, newest first."""
    o = outbound
    q = select(o.c.id, o.c.message_id, o.c.kind, o.c.target, o.c.channel, o.c.code, o.c.control_id, o.c.destination,
               o.c.status, o.c.attempts, o.c.created_at, o.c.next_attempt_at, o.c.sent_at, o.c.answer, o.c.last_error
               ).where(o.c.kind.in_(f.kinds))
    if f.status is not None:
        q = q.where(o.c.status == f.status)
    if f.channel is not None:
        q = q.where(o.c.channel == f.channel)
    if f.message_id is not None:
        q = q.where(o.c.message_id == f.message_id)
    if f.destination is not None:
        q = q.where(o.c.kind.in_(FORWARD_KINDS), o.c.target == f.destination)
    with engine.connect() as conn:
        rows = conn.execute(q.order_by(o.c.id.desc()).limit(f.limit)).all()
    return [{"id": r.id, "message_id": r.message_id, "kind": r.kind, "channel": r.channel,
             # a route destination's name; application ACKs go to their channel's sender
             **({} if r.kind == APP_ACK else {"destination_name": r.target}),
             **({"code": r.code} if r.kind == APP_ACK else {}), "control_id": r.control_id,
             "destination": r.destination, "status": r.status, "attempts": r.attempts,
             "created_at": _iso(r.created_at),
             "next_attempt_at": _iso(r.next_attempt_at) if r.status == "pending" else None,
             "sent_at": _iso(r.sent_at), "answer": r.answer, "last_error": r.last_error} for r in rows]


def resend(engine: Engine, ids: list[int], *, status: str | None = None, channel: str | None = None,
           kinds: tuple[str, ...] = (APP_ACK,), destination: str | None = None,
           dry_run: bool = False) -> list[int]:
    """Make rows due again (status pending, next attempt now, ``give_up_after`` counted from now):
    the ``ids`` given (any status), or every one with ``status`` (expired or refused), optionally of
    one ``channel`` or ``destination``; only rows of ``kinds``. Returns the ids, oldest first."""
    o = outbound
    what = "application ACK" if kinds == (APP_ACK,) else "outbound message"
    q = select(o.c.id).where(o.c.kind.in_(kinds))
    if ids:
        q = q.where(o.c.id.in_(ids))
    elif status in ("expired", "refused"):
        q = q.where(o.c.status == status)
    else:
        raise ValueError(f"give {what} ids, or --status expired or --status refused")
    if channel is not None:
        q = q.where(o.c.channel == channel)
    if destination is not None:
        q = q.where(o.c.kind.in_(FORWARD_KINDS), o.c.target == destination)
    now = datetime.now(UTC)
    return _change(engine, q, ids, what, {"status": "pending", "due_at": now, "next_attempt_at": now}, dry_run)


def cancel(engine: Engine, ids: list[int], *, destination: str | None = None, channel: str | None = None,
           kinds: tuple[str, ...] = KINDS, dry_run: bool = False) -> list[int]:
    """Give up on rows that were not delivered (pending, expired or refused) for good: status
    cancelled, never sent again (``resend`` can still revive one). The ``ids`` given, or every such
    row of ``destination`` (a route destination's name, e.g. one removed from routes.yaml) or of
    ``channel``. A row being delivered right now may still arrive once. Returns the ids, oldest first."""
    o = outbound
    q = select(o.c.id).where(o.c.kind.in_(kinds), o.c.status.in_(("pending", "expired", "refused")))
    if ids:
        q = q.where(o.c.id.in_(ids))
    elif destination is None and channel is None:
        raise ValueError("give ids, or --destination NAME or --channel NAME")
    if destination is not None:
        q = q.where(o.c.kind.in_(FORWARD_KINDS), o.c.target == destination)
    if channel is not None:
        q = q.where(o.c.channel == channel)
    return _change(engine, q, ids, "undelivered outbound message",
                   {"status": "cancelled", "last_error": "cancelled by an operator"}, dry_run)


def _change(engine: Engine, q: Select[Any], ids: list[int], what: str, values: dict[str, Any],
            dry_run: bool) -> list[int]:
    """The rows ``q`` selects (every id of ``ids`` must be among them) set to ``values``; their ids,
    oldest first."""
    with engine.begin() as conn:
        found = [r.id for r in conn.execute(q.order_by(outbound.c.id)).all()]
        if ids and len(found) < len(set(ids)):
            missing = sorted(set(ids) - set(found))
            raise ValueError(f"no {what} with id {', '.join(map(str, missing))}")
        if found and not dry_run:
            conn.execute(update(outbound).where(outbound.c.id.in_(found)).values(**values))
    return found
