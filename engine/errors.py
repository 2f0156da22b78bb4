"""The engine's exceptions. Everything the engine raises on purpose derives from EngineError."""

from __future__ import annotations

from dataclasses import dataclass


class EngineError(Exception):
    """Root of every error the engine raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One configuration problem, located in a file: ``file:line:col: key.path: message``."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(EngineError):
    """The configuration is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class HL7Error(EngineError):
    """An HL7 message cannot be accepted.

    ``code`` is from HL7 table 0357, ``reason`` is the engine's own short code (ERR-5), ``location``
    is an ERR-2 error location such as ``MSH^1^12``.
    """

    def __init__(self, code: str, reason: str, text: str, location: str = "") -> None:
        self.code = code
        self.reason = reason
        self.text = text
        self.location = location
        super().__init__(text)


class UnavailableError(EngineError):
    """A service the engine depends on (message store, broker) cannot be used right now.

    Transient: the engine answers AE and keeps retrying the connection in the background.
    """

    def __init__(self, service: str, detail: str) -> None:
        self.service = service
        self.detail = detail
        super().__init__(f"{service} unavailable: {detail}")


class UsageError(EngineError):
    """A command was called wrongly (bad address, missing file); the message says how to fix it."""


def short_reason(exc: BaseException) -> str:
    """An exception's first line (a driver's own, for a SQLAlchemy error: SQLAlchemy's text goes on
    with the statement and its parameters, which may hold patient data), at most 300 characters."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
