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
    destinations: [record]       # the central record (later: an outbound MLLP peer, a file)
default: filter
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator


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
    model_config = ConfigDict(extra="forbid")
    type: Literal["record"] = "record"


def _destination(value: object) -> object:
    """``record`` is short for ``{type: record}``."""
    if isinstance(value, str):
        return {"type": value}
    return value


# One kind today; an outbound MLLP peer and a file are planned (a discriminated union on ``type``).
Destination = Annotated[RecordDestination, BeforeValidator(_destination)]


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    match: Match = Field(default_factory=Match)
    mapping: str = Field(description="a mapping name: mappings/<name>.yaml")
    destinations: list[Destination] = Field(default_factory=lambda: [RecordDestination()], min_length=1)


class RoutesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    routes: list[Route] = Field(default_factory=list)
    default: Literal["filter", "error"] = "error"


def routes_file(root: Path) -> Path | None:
    for name in ("routes.yaml", "routes.yml"):
        if (root / name).is_file():
            return root / name
    return None
