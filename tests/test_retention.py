"""Retention: finished messages older than the period leave the message store (with their history,
search keys and delivered outbound rows); what someone may still act on stays; the record is kept,
and a resend of a removed message changes nothing in it. On both store backends."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, func, insert, select

from engine.mllp.client import MLLPClient
from engine.store.retention import Pruner, purge
from engine.store.schema import message_events, message_keys, messages, outbound, parked_patients, queue_entries
from tests.conftest import Backend, store_url
from tests.test_ack_processed import msa
from tests.test_cli import in_process
from tests.test_e2e import lab, project, record_counts

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def add(engine: Engine, uid: str, status: str, days_ago: float, *, accepted: bool = True,
        duplicate_of: int | None = None, outbound_status: str | None = None) -> int:
    at = NOW - timedelta(days=days_ago)
    with engine.begin() as conn:
        mid = conn.execute(insert(messages).values(
            uid=uid, channel="lab", received_at=at, size=3, sha256=hashlib.sha256(uid.encode()).hexdigest(),
            accepted=accepted, status=status, raw=b"MSH", control_id=uid, duplicate_of=duplicate_of,
            updated_at=at)).inserted_primary_key[0]
        conn.execute(insert(message_events).values(message_id=mid, at=at, status=status, step=None, detail=None))
        conn.execute(insert(message_keys).values(message_id=mid, kind="patient", value=f"P-{uid}", authority=""))
        if outbound_status is not None:
            conn.execute(insert(outbound).values(
                message_id=mid, kind="mllp", channel="lab", target="lis", destination="lis:2575", control_id=uid,
                code="", payload=b"MSH", status=outbound_status, attempts=0, created_at=at, due_at=at,
                next_attempt_at=at))
    return int(mid)


def left(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return {r.uid: r.status for r in conn.execute(select(messages.c.uid, messages.c.status))}


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_finished_messages_older_than_the_period_go_the_rest_stays(engine: Engine) -> None:
    add(engine, "old-processed", "processed", 100, outbound_status="sent")
    add(engine, "old-filtered", "filtered", 100)
    add(engine, "old-refused", "error", 100, accepted=False)
    add(engine, "old-failed", "error", 100, outbound_status="pending")
    add(engine, "old-held", "held", 100)
    add(engine, "old-queued", "queued", 100)
    add(engine, "old-pending-forward", "processed", 95, outbound_status="pending")
    add(engine, "new-processed", "processed", 10)
    with engine.begin() as conn:
        conn.execute(insert(parked_patients).values(patient_key="LAB|P1^", message_uid="old-failed", parked_at=NOW))

    seen = purge(engine, timedelta(days=90), dry_run=True, now=NOW)
    assert (seen.messages, seen.by_status) == (4, {"processed": 2, "filtered": 1, "error": 1})
    assert len(left(engine)) == 8  # a dry run removes nothing

    done = purge(engine, timedelta(days=90), now=NOW)
    assert (done.messages, done.events, done.keys, done.outbound) == (4, 4, 4, 1)
    assert sorted(left(engine)) == ["new-processed", "old-failed", "old-held", "old-queued"]
    with engine.connect() as conn:
        # the pending forward stays (it has its own bytes) and is still delivered
        assert [(r.control_id, r.status) for r in conn.execute(select(outbound))] == [
            ("old-failed", "pending"), ("old-pending-forward", "pending")]
    assert count(engine, message_events) == 4 and count(engine, message_keys) == 4
    assert purge(engine, timedelta(days=90), now=NOW).messages == 0  # nothing more to do
    if engine.dialect.name == "sqlite":  # the purge turned foreign-key checks off for itself only
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_queue_entries_go_with_their_message_and_a_backlog_stays(engine: Engine) -> None:
    add(engine, "old-processed", "processed", 100)
    add(engine, "old-queued", "queued", 100)
    with engine.begin() as conn:
        conn.execute(insert(queue_entries), [
            {"message_uid": uid, "partition": 0, "enqueued_at": NOW, "available_at": NOW, "attempts": 0}
            for uid in ("old-processed", "old-queued")])
    assert purge(engine, timedelta(days=90), now=NOW).messages == 1
    with engine.connect() as conn:
        assert [r.message_uid for r in conn.execute(select(queue_entries.c.message_uid))] == ["old-queued"]
    assert left(engine) == {"old-queued": "queued"}


def test_failed_messages_only_when_asked_and_never_one_that_parks_its_patient(engine: Engine) -> None:
    add(engine, "old-failed", "error", 100)
    add(engine, "old-skipped", "error", 100)  # an operator skipped it: it parks nobody any more
    with engine.begin() as conn:
        conn.execute(insert(parked_patients).values(patient_key="LAB|P1^", message_uid="old-failed", parked_at=NOW))
    assert purge(engine, timedelta(days=90), now=NOW).messages == 0
    done = purge(engine, timedelta(days=90), include_errors=True, now=NOW)
    assert done.by_status == {"error": 1}
    assert left(engine) == {"old-failed": "error"}


def test_an_original_stays_while_a_newer_duplicate_points_at_it(engine: Engine) -> None:
    first = add(engine, "orig", "processed", 100)
    add(engine, "dup-new", "duplicate", 10, duplicate_of=first)
    other = add(engine, "orig2", "processed", 100)
    add(engine, "dup-old", "duplicate", 99, duplicate_of=other)
    seen = purge(engine, timedelta(days=90), now=NOW, batch=1, dry_run=True)
    assert (seen.messages, seen.kept_for_duplicates) == (2, 1)
    done = purge(engine, timedelta(days=90), now=NOW, batch=1)
    assert (done.messages, done.kept_for_duplicates) == (2, 1)
    assert sorted(left(engine)) == ["dup-new", "orig"]
    done = purge(engine, timedelta(days=5), now=NOW)  # now the duplicate is old too: both go
    assert left(engine) == {} and done.messages == 2


def test_the_pruner_runs_the_same_purge(db_url: str, engine: Engine) -> None:
    add(engine, "old", "processed", 100)
    add(engine, "new", "processed", 0)
    pruner = Pruner(db_url, timedelta(days=90).total_seconds())
    try:
        assert pruner.run_once().messages == 1
    finally:
        pruner.close()
    assert sorted(left(engine)) == ["new"]


def test_purge_from_the_command_line(db_url: str, engine: Engine, tmp_path: Path) -> None:
    add(engine, "old", "processed", 400)
    env = {"HL7ENGINE_DATABASE_URL": db_url}

    def cli(*args: str, **more: str) -> Any:
        return in_process("messages", "purge", *args, "--config", str(tmp_path), env={**env, **more})

    missing = cli()
    assert missing.returncode == 2 and "--older-than: give the retention period" in missing.stderr
    empty = cli(HL7ENGINE_RETAIN_MESSAGES="")  # docker-compose's "${X:-}": unset, not an error
    assert empty.returncode == 2 and "--older-than: give the retention period" in empty.stderr
    assert cli("--older-than", "soon").returncode == 2
    out = cli("--older-than", "365d", "--dry-run")
    assert out.returncode == 0 and out.stdout.startswith("would remove 1 message(s) received before "), out
    assert "(1 processed)" in out.stdout and left(engine) == {"old": "processed"}
    out = cli(HL7ENGINE_RETAIN_MESSAGES="365d")
    assert out.returncode == 0 and out.stdout.startswith("removed 1 message(s)") and left(engine) == {}, out
    bad = cli(HL7ENGINE_RETAIN_MESSAGES="a year")
    assert bad.returncode == 2 and "HL7ENGINE_RETAIN_MESSAGES: expected a duration such as 30s" in bad.stderr


def test_a_resend_of_a_removed_message_changes_nothing_in_the_record(backend: Backend, engine_factory: Any,
                                                                     tmp_path: Path) -> None:
    project(tmp_path)
    eng = engine_factory(backend, HL7ENGINE_WORKERS="1")
    url = store_url(eng)
    data = lab("RT1", "20261207080000", "BY-31", "ROE^JANE", "F", "4.2").encode()

    def settled(n: int) -> list[Any]:
        engine = create_engine(url)
        try:
            deadline = time.time() + 60
            while True:
                with engine.connect() as conn:
                    rows = conn.execute(select(messages.c.status)).all()
                if (len(rows) >= n and all(r.status in ("processed", "duplicate") for r in rows)) \
                        or time.time() > deadline:
                    return rows
                time.sleep(0.1)
        finally:
            engine.dispose()

    with MLLPClient("127.0.0.1", eng.port, timeout=30) as client:
        assert msa(client.send(data))[1] == "AA"
        settled(1)
        before = record_counts(url)
        assert before["rec_observations"] == 1
        out = in_process("messages", "purge", "--older-than", "0s", "--config", str(tmp_path), env=eng.env)
        assert out.stdout.startswith("removed 1 message(s)"), out
        assert msa(client.send(data))[1] == "AA"  # not known any more: stored and processed again
    assert [r.status for r in settled(1)] == ["processed"]
    assert record_counts(url) == before  # the record's business keys make it a no-op
