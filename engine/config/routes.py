"""``routes.yaml``: which mapping and which destinations each message goes to.

Rules are tried in the order written; the first whose every ``match`` key matches wins. A message
no rule matches goes to ``default``: ``filter`` (status filtered, nothing written) or ``error``
(status error, the patient's stream parks until the message is replayed or skipped).

```yaml
routes:
  - name: lab-results
    match:
      channel: lab               # one name or a list
      type: ORU^R01              # MSH-9 type^event; "ORU^*" any event; a list for several
      structure: ORU_R01         # MSH-9.3, when the sender fills it
      facility: [WLAB, CITYLAB]  # MSH-4.1
      version: ["2.3", "2.5*"]   # MSH-12; a trailing * matches a prefix
    mapping: oru_r01             # mappings/oru_r01.yaml
    destinations:                # default: [record]
      - record                   # the central record (needs the mapping)
      - type: mllp               # forward the message, as received, to a downstream MLLP listener
        name: lis-archive
        to: archive.example.org:2575
      - type: file               # write the message, as received, to a file of its own
        name: audit-drop
        directory: /var/spool/hl7/out
default: filter
```

A route without the ``record`` destination forwards messages without mapping them (no ``mapping``).
Forwards are written to the ``outbound`` table in the transaction that marks the message processed,
and delivered from there by the listener process (engine.outbound.deliver), in order per destination.
"""

from __future__ import annotations

import string
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from engine.config.models import Duration, MLLPPeerConfig


def _as_list(value: object) -> object:
    if isinstance(value, str):
        return [value]
    return value


Patterns = Annotated[list[str], BeforeValidator(_as_list)]


class Match(BaseModel):
    """Every key given must match (and); within a key's list, any one (or). Absent: any value."""

    model_config = ConfigDict(extra="forbid")

    channel: Patterns | None = None
    type: Patterns | None = Field(default=None, description="MSH-9 as type^event, e.g. ORU^R01 or ADT^*")
    structure: Patterns | None = None
    facility: Patterns | None = None
    version: Patterns | None = None

    @field_validator("type")
    @classmethod
    def _type_shape(cls, value: list[str] | None) -> list[str] | None:
        for v in value or []:
            if "^" not in v and v != "*":
                raise ValueError(f"expected type^event such as ORU^R01 or ADT^*, got {v!r}")
        return value


class RecordDestination(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["record"] = "record"

    @property
    def name(self) -> str:
        return "record"


DESTINATION_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class MLLPDestination(MLLPPeerConfig):
    """Forward the message, as received (same bytes), to a downstream system's MLLP listener."""

    type: Literal["mllp"]
    name: str = Field(pattern=DESTINATION_NAME, description="names the destination's ordered stream "
                      "(hl7engine outbound --destination NAME)")
    to: str = Field(description="the downstream system's MLLP listener, host:port")
    wait_for_ack: bool = Field(default=True, description="wait for the peer's ACK (AA or CA) to each message; "
                               "false for a peer that never answers: a message then counts as delivered once "
                               "written to the connection")

    @property
    def waits_for_ack(self) -> bool:
        return self.wait_for_ack


# what a file destination's file name may hold; every value is made safe for a file name
FILENAME_FIELDS = {
    "channel": "the channel that received the message",
    "message_id": "the message's id in the message store",
    "uid": "the message's uid in the message store",
    "control_id": "MSH-10",
    "type": "MSH-9.1, e.g. ORU",
    "event": "MSH-9.2, e.g. R01",
    "facility": "MSH-4.1",
    "received": "when it was received (UTC); a strftime format may follow, e.g. {received:%Y-%m-%d}",
}
DEFAULT_FILENAME = "{channel}/{received:%Y-%m-%d}/{message_id}-{control_id}.hl7"


def filename_fields(template: str) -> list[tuple[str, str, str]]:
    """``(literal text, field, format spec)`` parts of a file name template; ValueError when it is not
    one (unknown field, conversion, a format spec on anything but ``received``, a path leaving the
    directory)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{exc} in {template!r} (write {{{{ and }}}} for a literal brace)") from None
    out = []
    for literal, field, spec, conversion in parts:
        if field is not None:
            if field not in FILENAME_FIELDS:
                raise ValueError(f"unknown field {{{field}}}; expected one of "
                                 + ", ".join(f"{{{k}}}" for k in FILENAME_FIELDS))
            if conversion:
                raise ValueError(f"{{{field}!{conversion}}}: conversions are not supported")
            if spec and field != "received":
                raise ValueError(f"{{{field}:{spec}}}: only {{received}} takes a format")
            if field == "received" and spec and "%" not in spec:
                raise ValueError(f"{{received:{spec}}}: expected a strftime format such as %Y-%m-%d")
        out.append((literal, field or "", spec or ""))
    sample = "".join(lit + (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).strftime(spec or "%Y%m%dT%H%M%S")
                            if field == "received" else ("x" if field else "")) for lit, field, spec in out)
    path = PurePosixPath(sample)
    if ("\\" in sample or sample.endswith("/") or path.is_absolute() or any(p in ("..", ".") for p in path.parts)
            or not path.name):
        raise ValueError(f"{template!r}: expected a relative file name inside the directory "
                         "(no leading /, no . or .. parts, not ending in /)")
    if not {"message_id", "uid", "control_id"} & {field for _, field, _ in out}:
        raise ValueError(f"{template!r}: every message would be written to the same file; include {{message_id}} "
                         "(or {uid}, {control_id})")
    return out


class FileDestination(BaseModel):
    """Write the message, as received (same bytes), to a file of its own in ``directory``: written to a
    temporary name, flushed to disk, then renamed, so a reader never sees half a file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["file"]
    name: str = Field(pattern=DESTINATION_NAME, description="names the destination's ordered stream")
    directory: Path = Field(description="where files go; relative to the configuration directory")
    filename: str = Field(default=DEFAULT_FILENAME, description="file name under directory, with fields: "
                          + ", ".join(f"{{{k}}}" for k in FILENAME_FIELDS))
    give_up_after: Duration = Field(default=86400.0, gt=0, description="stop retrying a file that cannot be "
                                    "written this long after it was due (status expired)")

    @field_validator("filename")
    @classmethod
    def _filename(cls, v: str) -> str:
        filename_fields(v)
        return v


def _destination(value: object) -> object:
    """``record`` is short for ``{type: record}``."""
    if isinstance(value, str):
        return {"type": value}
    return value


Destination = Annotated[RecordDestination | MLLPDestination | FileDestination, Field(discriminator="type"),
                        BeforeValidator(_destination)]
Forward = MLLPDestination | FileDestination


def _record_only() -> list[RecordDestination | MLLPDestination | FileDestination]:
    return [RecordDestination()]


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    match: Match = Field(default_factory=Match)
    mapping: str | None = Field(default=None, description="a mapping name: mappings/<name>.yaml; needed by the "
                                "record destination")
    destinations: list[Destination] = Field(default_factory=_record_only, min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Route:
        names: set[str] = set()
        for d in self.destinations:
            if d.name in names:
                raise ValueError(f"destination {d.name!r} is listed twice in this route"
                                 + ("" if d.type == "record" else "; give each its own name"))
            names.add(d.name)
        if self.record and self.mapping is None:
            raise ValueError("the record destination needs a mapping: add `mapping: NAME` (mappings/NAME.yaml), "
                             "or list only mllp/file destinations to forward messages unmapped")
        if not self.record and self.mapping is not None:
            raise ValueError(f"mapping {self.mapping!r} is used only by the record destination: add `record` to "
                             "destinations, or remove the mapping")
        return self

    @property
    def record(self) -> bool:
        return any(d.type == "record" for d in self.destinations)

    @property
    def forwards(self) -> list[Forward]:
        return [d for d in self.destinations if not isinstance(d, RecordDestination)]


class RoutesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    routes: list[Route] = Field(default_factory=list)
    default: Literal["filter", "error"] = "error"

    def forwards(self) -> dict[str, Forward]:
        """Every mllp and file destination, by name (routes may share one: the same stream)."""
        return {d.name: d for r in self.routes for d in r.forwards}


def routes_file(root: Path) -> Path | None:
    for name in ("routes.yaml", "routes.yml"):
        if (root / name).is_file():
            return root / name
    return None
