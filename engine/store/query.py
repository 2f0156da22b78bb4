"""Read the message store: listing and showing messages for operators."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Select, func, select

from engine.outbound.query import FORWARD_KINDS, OutboundFilter, list_outbound
from engine.store.keys import keys_for, parse_query
from engine.store.schema import STATUSES, message_events, message_keys, messages

LIST_COLUMNS = (
    messages.c.id, messages.c.channel, messages.c.received_at, messages.c.message_type, messages.c.trigger_event,
    messages.c.control_id, messages.c.sending_application, messages.c.sending_facility, messages.c.status,
    messages.c.ack_code, messages.c.error_step, messages.c.error, messages.c.size, messages.c.duplicate_of,
)


@dataclass(frozen=True, slots=True)
class MessageFilter:
    status: str | None = None
    channel: str | None = None
    control_id: str | None = None
    patient: str | None = None  # a patient identifier, optionally ``value^authority``
    order: str | None = None  # an order number (placer, filler/accession, specimen), ``value^namespace``
    step: str | None = None  # the step that failed: receive, store, enqueue, parse, validate, route, map, ...
    limit: int = 100
    before_id: int | None = None
    since: datetime | None = None  # received at or after (aware)
    until: datetime | None = None  # received before (aware)


def list_messages(engine: Engine, f: MessageFilter) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        q = _timed(conn, _filtered(select(*LIST_COLUMNS), f), f).order_by(messages.c.id.desc()).limit(f.limit)
        return [summary(dict(r._mapping)) for r in conn.execute(q)]


def replayable_ids(engine: Engine, f: MessageFilter) -> list[int]:
    """Messages that failed in processing (status error, accepted at receipt) matching ``f``, oldest
    first, at most ``f.limit``: what a bulk replay takes."""
    with engine.connect() as conn:
        q = (_timed(conn, _filtered(select(messages.c.id), replace(f, status="error")), f)
             .where(messages.c.accepted.is_(True)).order_by(messages.c.id).limit(f.limit))
        return [int(r[0]) for r in conn.execute(q)]


# A message's row id is taken when its store transaction runs, within seconds of its receipt (the
# ACK timeout, and a refused message's record is written as it comes): ids follow receipt times but
# for those seconds. A time window is searched from the first id received an hour before it, so no
# index on received_at has to be kept on the receiving path.
ID_MARGIN = timedelta(hours=1)


def first_id_since(conn: Connection, at: datetime) -> int:
    """The smallest row id that may hold a message received at ``at`` or later (a binary search on
    the primary key: some twenty lookups, whatever the size of the store)."""
    bounds = conn.execute(select(func.min(messages.c.id), func.max(messages.c.id))).one()
    if bounds[0] is None:
        return 0
    target = at - ID_MARGIN
    lo, hi = int(bounds[0]), int(bounds[1]) + 1  # the answer is in [lo, hi]; hi: none received since
    while lo < hi:
        mid = (lo + hi) // 2
        row = conn.execute(select(messages.c.id, messages.c.received_at).where(messages.c.id >= mid)
                           .order_by(messages.c.id).limit(1)).first()
        if row is None or row.received_at >= target:
            hi = mid
        else:
            lo = int(row.id) + 1
    return lo


def _timed(conn: Connection, q: Select[Any], f: MessageFilter) -> Select[Any]:
    if f.since is not None:
        q = q.where(messages.c.received_at >= f.since, messages.c.id >= first_id_since(conn, f.since))
    if f.until is not None:
        # ids from the first received an hour after ``until`` on were all received after it
        q = q.where(messages.c.received_at < f.until, messages.c.id < first_id_since(conn, f.until + 2 * ID_MARGIN))
    return q


def _filtered(q: Select[Any], f: MessageFilter) -> Select[Any]:
    if f.status is not None and f.status not in STATUSES:
        raise ValueError(f"unknown status {f.status!r}; expected one of {', '.join(STATUSES)}")
    if f.status:
        q = q.where(messages.c.status == f.status)
        if f.status not in ("queued", "processed"):  # lets the planner use the partial index
            q = q.where(messages.c.status.notin_(["queued", "processed"]))
    if f.channel:
        q = q.where(messages.c.channel == f.channel)
    if f.control_id:
        q = q.where(messages.c.control_id == f.control_id)
    if f.step:
        q = q.where(messages.c.error_step == f.step)
    for kind, text in (("patient", f.patient), ("order", f.order)):
        if text:
            value, authority = parse_query(text)
            keyed = select(message_keys.c.message_id).where(message_keys.c.value == value,
                                                            message_keys.c.kind == kind)
            if authority is not None:
                keyed = keyed.where(message_keys.c.authority == authority)
            q = q.where(messages.c.id.in_(keyed))
    if f.before_id:
        q = q.where(messages.c.id < f.before_id)
    return q


def summary(row: dict[str, Any]) -> dict[str, Any]:
    msg_type = row.pop("message_type") or ""
    trigger = row.pop("trigger_event") or ""
    received: datetime = row["received_at"]
    return {
        "id": row["id"],
        "channel": row["channel"],
        "received_at": received.isoformat(timespec="milliseconds"),
        "type": f"{msg_type}^{trigger}" if trigger else msg_type,
        "control_id": row["control_id"],
        "sending_application": row["sending_application"],
        "sending_facility": row["sending_facility"],
        "status": row["status"],
        "ack_code": row["ack_code"],
        "error": f"{row['error_step']}: {row['error']}" if row["error"] else None,
        "size": row["size"],
        "duplicate_of": row["duplicate_of"],
    }


def get_message(engine: Engine, message_id: int) -> dict[str, Any] | None:
    """One stored message, with its search keys under ``keys`` (kind, value, authority) and its
    history under ``events`` (what workers and operators did to it, oldest first)."""
    with engine.connect() as conn:
        row = conn.execute(select(messages).where(messages.c.id == message_id)).first()
        if row is None:
            return None
        events = [{"at": e.at.isoformat(timespec="milliseconds"), "status": e.status, "step": e.step,
                   "detail": e.detail}
                  for e in conn.execute(select(message_events.c.at, message_events.c.status, message_events.c.step,
                                               message_events.c.detail)
                                        .where(message_events.c.message_id == message_id)
                                        .order_by(message_events.c.id))]
        found = {**row._mapping, "keys": keys_for(conn, [message_id]).get(message_id, []), "events": events}
    app_acks = list_outbound(engine, OutboundFilter(message_id=message_id, limit=1000, kinds=("app_ack",)))
    forwards = list_outbound(engine, OutboundFilter(message_id=message_id, limit=1000, kinds=FORWARD_KINDS))
    return {**found, "application_acks": app_acks[::-1], "forwards": forwards[::-1]}
