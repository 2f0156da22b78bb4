"""Patient merge links (ADT^A40) and the groups that reads and writes follow.

A merged-away patient keeps its row, its identifiers and the facts written for it; a link says it
was *replaced by* another. The **survivor** of a patient is the end of its chain of links (itself
when it was never replaced); its **group** is the survivor and every patient replaced into it,
directly or through a chain. Writes go to the survivor and find existing facts across the group;
reads of any member return the whole group's facts.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, select

from engine.record.models import rec_patient_links

MAX_CHAIN = 64  # a guard: links are written so that they cannot form a cycle


def survivors(conn: Connection, patient_ids: Iterable[int]) -> dict[int, int]:
    """Map each patient id to its survivor (the end of its replaced-by chain)."""
    result = {pid: pid for pid in patient_ids}
    pending = set(result.values())
    for _ in range(MAX_CHAIN):
        if not pending:
            break
        rows = conn.execute(select(rec_patient_links.c.patient_id, rec_patient_links.c.replaced_by_id)
                            .where(rec_patient_links.c.patient_id.in_(sorted(pending)))).all()
        step = {int(r.patient_id): int(r.replaced_by_id) for r in rows}
        for pid, current in result.items():
            if current in step:
                result[pid] = step[current]
        pending = set(step.values())
    return result


def survivor(conn: Connection, patient_id: int) -> int:
    return survivors(conn, [patient_id])[patient_id]


def group_of(conn: Connection, patient_id: int) -> list[int]:
    """The survivor of ``patient_id`` and every patient replaced into it (sorted, survivor included)."""
    root = survivor(conn, patient_id)
    members = {root}
    frontier = {root}
    for _ in range(MAX_CHAIN):
        if not frontier:
            break
        rows = conn.execute(select(rec_patient_links.c.patient_id)
                            .where(rec_patient_links.c.replaced_by_id.in_(sorted(frontier)))).all()
        frontier = {int(r.patient_id) for r in rows} - members
        members |= frontier
    return sorted(members)
