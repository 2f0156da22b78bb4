"""``messages --since/--until`` (and ``messages replay --since/--until``): a time window found without
an index on received_at, from the primary key (row ids follow receipt times but for the seconds a
message waits for its store transaction). Checked against a plain scan, with receipt times out of
order by seconds, on both backends."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from engine.store.query import MessageFilter, first_id_since, list_messages, replayable_ids
from engine.store.schema import messages
from tests.test_cli import in_process
from tests.test_worker import oru, store

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def stored(url: str, engine: Engine, n: int, *, seed: int = 3) -> list[tuple[int, datetime]]:
    """``n`` messages received two seconds apart from T0 (ids in that order), each time moved by up to
    ten seconds either way: receipt times out of order, as the store writer's transactions leave them."""
    store(url, [oru(f"W{i}", f"P{i}") for i in range(n)])
    rng = random.Random(seed)
    out = []
    with engine.begin() as conn:
        ids = [r.id for r in conn.execute(select(messages.c.id).order_by(messages.c.id))]
        for i, mid in enumerate(ids):
            at = T0 + timedelta(seconds=2 * i + rng.uniform(-10, 10))
            conn.execute(update(messages).where(messages.c.id == mid).values(received_at=at))
            out.append((mid, at))
    return out


def test_first_id_since_never_cuts_a_message_off(db_url: str, engine: Engine) -> None:
    rows = stored(db_url, engine, 300)
    with engine.connect() as conn:
        assert any(a[1] > b[1] for a, b in itertools.pairwise(rows))  # out of order indeed
        for second in (-50, 0, 2, 33, 300, 597, 800):
            at = T0 + timedelta(seconds=second)
            floor = first_id_since(conn, at)
            assert all(mid >= floor for mid, received in rows if received >= at), second
        # the floor is an hour earlier: it cuts off what was received an hour before, nothing later
        assert first_id_since(conn, T0 + timedelta(hours=2)) > rows[-1][0]
        assert first_id_since(conn, T0 + timedelta(minutes=30)) == rows[0][0]


def test_listing_a_window_matches_a_scan(db_url: str, engine: Engine) -> None:
    rows = stored(db_url, engine, 240)
    rng = random.Random(11)
    for _ in range(12):
        a = T0 + timedelta(seconds=rng.uniform(-20, 500))
        b = a + timedelta(seconds=rng.uniform(0, 120))
        got = [r["id"] for r in list_messages(engine, MessageFilter(since=a, until=b, limit=1000))]
        want = sorted((mid for mid, at in rows if a <= at < b), reverse=True)
        assert got == want
    since = T0 + timedelta(seconds=400)
    only_since = [r["id"] for r in list_messages(engine, MessageFilter(since=since, limit=1000))]
    assert only_since == sorted((mid for mid, at in rows if at >= since), reverse=True)
    until = T0 + timedelta(seconds=100)
    only_until = [r["id"] for r in list_messages(engine, MessageFilter(until=until, limit=1000))]
    assert only_until == sorted((mid for mid, at in rows if at < until), reverse=True)


def test_the_cli_takes_a_time_ago_or_a_time(db_url: str, engine: Engine, tmp_path: Path) -> None:
    import json

    rows = stored(db_url, engine, 30)
    env = {"HL7ENGINE_DATABASE_URL": db_url}

    def cli(*args: str) -> Any:
        return in_process("messages", *args, "--json", "--config", str(tmp_path), env=env)

    out = cli("--since", "2026-12-01T00:00:20", "--until", "2026-12-01T00:00:40+00:00")
    assert out.returncode == 0, out
    got = [json.loads(line)["id"] for line in out.stdout.splitlines()]
    want = sorted((mid for mid, at in rows
                   if T0 + timedelta(seconds=20) <= at < T0 + timedelta(seconds=40)), reverse=True)
    assert got == want and got
    assert cli("--since", "1h").stdout.strip() == ""  # all received in 2026-12-01
    bad = in_process("messages", "--since", "yesterday", "--config", str(tmp_path), env=env)
    assert bad.returncode == 2 and "--since: expected a time ago such as 2h" in bad.stderr


def test_replay_takes_a_window(db_url: str, engine: Engine, tmp_path: Path) -> None:
    rows = stored(db_url, engine, 20)
    with engine.begin() as conn:  # all failed at mapping
        conn.execute(update(messages).values(status="error", error_step="map", error="x"))
    at, until = T0 + timedelta(seconds=11), T0 + timedelta(seconds=27)
    want = [mid for mid, received in rows if at <= received < until]
    assert replayable_ids(engine, MessageFilter(since=at, until=until, limit=100)) == want
    out = in_process("messages", "replay", "--since", at.isoformat(), "--until", until.isoformat(), "--dry-run",
                     "--config", str(tmp_path), env={"HL7ENGINE_DATABASE_URL": db_url})
    assert out.returncode == 0 and f"would replay {len(want)} failed message(s)" in out.stdout, out


@pytest.mark.parametrize("option", ["--since", "--until"])
def test_a_window_alone_is_enough_to_select_what_to_replay(option: str, tmp_path: Path) -> None:
    out = in_process("messages", "replay", option, "not a time", "--config", str(tmp_path), env={})
    assert out.returncode == 2 and f"{option}: expected a time ago" in out.stderr
