"""Driver-level bulk inserts for the receiving hot path.

SQLAlchemy Core compiles and type-processes every row of an ``executemany``; on the ACK path that
costs more than the database work. Here the INSERT text is built once per dialect from the same
Table definitions and rows are passed as tuples already in the driver's types.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import ARRAY, ColumnElement, Connection, Dialect, Table, any_, bindparam
from sqlalchemy.exc import DBAPIError, StatementError


@lru_cache(maxsize=32)
def insert_sql(table: Table, columns: tuple[str, ...], paramstyle: str) -> str:
    mark = "?" if paramstyle == "qmark" else "%s"
    cols = ", ".join(f'"{c}"' for c in columns)
    return f'INSERT INTO "{table.name}" ({cols}) VALUES ({", ".join([mark] * len(columns))})'


def time_adapter(dialect: Dialect) -> Callable[[datetime | None], Any]:
    """How a UTC datetime is passed to the driver: SQLite keeps SQLAlchemy's text form."""
    if dialect.name == "sqlite":
        return sqlite_time
    return lambda dt: dt


def sqlite_time(dt: datetime | None) -> str | None:
    """SQLAlchemy's SQLite text form of a UTC datetime: ``YYYY-MM-DD HH:MM:SS.ffffff``."""
    if dt is None:
        return None
    u = dt.astimezone(UTC) if dt.tzinfo is not UTC else dt
    # floor, not int(): before 1970 int() of a timestamp with microseconds is the next second
    return f"{_second_text(math.floor(u.timestamp()))}.{u.microsecond:06d}"


@lru_cache(maxsize=4)
def _second_text(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%d %H:%M:%S")


@lru_cache(maxsize=512)
def multirow_insert_sql(table: Table, columns: tuple[str, ...], paramstyle: str, n: int) -> str:
    mark = "?" if paramstyle == "qmark" else "%s"
    cols = ", ".join(f'"{c}"' for c in columns)
    row = "(" + ", ".join([mark] * len(columns)) + ")"
    return f'INSERT INTO "{table.name}" ({cols}) VALUES {", ".join([row] * n)}'


MAX_ROWS_PER_STATEMENT = 128


def insert_rows(cursor: Any, paramstyle: str, table: Table, columns: tuple[str, ...],
                rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert ``rows`` on a DBAPI cursor.

    SQLite: multi-row INSERT statements, one driver call (one release of the GIL) per 128 rows.
    Server databases (psycopg): ``executemany`` of one statement, which psycopg prepares once and
    sends pipelined, one round trip for all rows (measured 40% faster than a multi-row INSERT whose
    text changes with the row count).
    """
    if not rows:
        return
    if paramstyle != "qmark":
        cursor.executemany(insert_sql(table, columns, paramstyle), rows)
        return
    for sql, params in multirow_statements(table, columns, paramstyle, rows):
        cursor.execute(sql, params)


def multirow_statements(table: Table, columns: tuple[str, ...], paramstyle: str,
                        rows: Sequence[tuple[Any, ...]]) -> Iterator[tuple[str, list[Any]]]:
    """The multi-row INSERT statements (up to 128 rows each) for ``rows``, with their parameters."""
    for start in range(0, len(rows), MAX_ROWS_PER_STATEMENT):
        chunk = rows[start:start + MAX_ROWS_PER_STATEMENT]
        yield multirow_insert_sql(table, columns, paramstyle, len(chunk)), [v for row in chunk for v in row]


def in_list(paramstyle: str, n: int) -> str:
    mark = "?" if paramstyle == "qmark" else "%s"
    return ", ".join([mark] * n)


def one_of(conn: Connection, column: ColumnElement[Any], values: Sequence[Any]) -> ColumnElement[bool]:
    """``column IN (values)``; on PostgreSQL ``column = ANY(%s)`` with the values as one array. An IN
    list's text changes with the count of values, so psycopg converted each such statement anew and
    never prepared it, and PostgreSQL parsed and planned one parameter per value; the array's
    statement is the same whatever the count."""
    if conn.dialect.name == "postgresql":
        return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
    return column.in_(values)


def driver_error(conn: Connection, sql: str, exc: Exception) -> StatementError:
    """A driver's error from a statement run on ``conn``'s driver connection directly (a COPY, a read
    in binary format), as SQLAlchemy would have raised it (``IntegrityError``, ``OperationalError``
    ...): the worker tells transient failures, which it retries, by SQLAlchemy's classes."""
    driver = conn.connection.driver_connection
    return DBAPIError.instance(sql, None, exc, conn.dialect.loaded_dbapi.Error,
                               connection_invalidated=bool(getattr(driver, "closed", False)))
