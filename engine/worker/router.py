"""Compiled ``routes.yaml``: first matching rule wins."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config.routes import Match, Route, RoutesConfig


@dataclass(frozen=True, slots=True)
class MessageKey:
    """What routing looks at, from the stored message's header columns."""

    channel: str
    type: str  # MSH-9.1
    event: str  # MSH-9.2
    structure: str  # MSH-9.3
    facility: str  # MSH-4.1
    version: str  # MSH-12


def _matches(patterns: list[str] | None, value: str, *, fold: bool = False) -> bool:
    if patterns is None:
        return True
    v = value.upper() if fold else value
    for pattern in patterns:
        p = pattern.upper() if fold else pattern
        if p in ("*", v) or (p.endswith("*") and v.startswith(p[:-1])):
            return True
    return False


def _type_matches(patterns: list[str] | None, type_: str, event: str) -> bool:
    if patterns is None:
        return True
    for p in patterns:
        if p == "*":
            return True
        t, _, e = p.upper().partition("^")
        if t in ("*", type_.upper()) and (e in ("*", "") or e == event.upper()):
            return True
    return False


def match(m: Match, key: MessageKey) -> bool:
    return (_matches(m.channel, key.channel)
            and _type_matches(m.type, key.type, key.event)
            and _matches(m.structure, key.structure, fold=True)
            and (_matches(m.facility, key.facility) or _matches(m.facility, key.facility.split("^", 1)[0]))
            and _matches(m.version, key.version))


class Router:
    def __init__(self, config: RoutesConfig) -> None:
        self.config = config
        # whether each route writes the record, by identity: Route.record walks its destinations
        # (pure Python, a generator), once per message otherwise
        self._records: dict[int, bool] = {id(r): r.record for r in config.routes}

    def writes_record(self, route: Route) -> bool:
        """``route.record``, for a route of this router's configuration (others are asked)."""
        known = self._records.get(id(route))
        return route.record if known is None else known

    @property
    def default(self) -> str:
        return self.config.default

    def route(self, key: MessageKey) -> Route | None:
        for r in self.config.routes:
            if match(r.match, key):
                return r
        return None
