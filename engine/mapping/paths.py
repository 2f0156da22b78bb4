"""HL7 field paths as written in mappings: ``PID-3``, ``PID-5.1``, ``PID-3[2].4.1``, ``OBX-5[*]``,
``NTE[*]-3``, and plain segment names (``OBR``).

A path is parsed once, when the mapping is loaded; at run time only the numbers are used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.mapping.segments import SEGMENTS

ALL = 0  # "[*]": every segment / every repetition

PATH_RE = re.compile(
    r"(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<segrep>\*|\d+)\])?"
    r"-(?P<field>\d+)(?:\[(?P<rep>\*|\d+)\])?"
    r"(?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?"
)
SEGMENT_RE = re.compile(r"[A-Z][A-Z0-9]{2}")


@dataclass(frozen=True, slots=True)
class Path:
    """``seg[segrep]-field[rep].comp.sub``; ``segrep``/``rep`` are 1-based, ``ALL`` (0) for ``[*]``,
    None when not written (the first). ``comp`` None means the whole field (a composite value)."""

    seg: str
    field: int
    segrep: int | None = None
    rep: int | None = None
    comp: int | None = None
    sub: int | None = None
    text: str = ""

    @property
    def many(self) -> bool:
        """True when the path designates several values (``[*]`` on the segment or the field)."""
        return ALL in (self.segrep, self.rep)

    def __str__(self) -> str:
        return self.text


class PathError(ValueError):
    pass


def _num(text: str | None) -> int | None:
    if text is None:
        return None
    if text == "*":
        return ALL
    n = int(text)
    if n < 1:
        raise PathError("numbers in a path start at 1")
    return n


def parse_path(text: str) -> Path:
    """Parse a complete path; raises PathError with a message for the engineer."""
    m = PATH_RE.fullmatch(text.strip())
    if not m:
        raise PathError(f"{text!r} is not a field path (expected e.g. PID-3, PID-5.1, OBX-5[*], PID-3[2].4.1)")
    field = int(m["field"])
    if field < 1:
        raise PathError("field numbers start at 1")
    comp, sub = _num(m["comp"]), _num(m["sub"])
    return Path(m["seg"], field, _num(m["segrep"]), _num(m["rep"]), comp, sub, text.strip())


def check_segment(name: str) -> str | None:
    """A problem with a segment name, or None. Z-segments are always accepted."""
    if not SEGMENT_RE.fullmatch(name):
        return f"{name!r} is not a segment name (three capital letters or digits, e.g. OBX)"
    if name.startswith("Z") or name in SEGMENTS:
        return None
    return f"unknown segment {name} (not defined in HL7 v2.3 to v2.8; local segments start with Z)"


def check_path(path: Path) -> str | None:
    """A problem with a path that cannot exist in any HL7 v2.3 to v2.8 message, or None."""
    problem = check_segment(path.seg)
    if problem or path.seg.startswith("Z"):
        return problem
    fields = SEGMENTS[path.seg]
    if path.field > len(fields):
        return f"{path.seg} has {len(fields)} fields; {path.text} cannot exist"
    if path.seg == "MSH" and path.field in (1, 2) and (path.comp or path.rep):
        return f"{path.text}: MSH-1 and MSH-2 are the delimiters and have no components or repetitions"
    comps = fields[path.field - 1]
    if path.comp is not None and comps and path.comp > comps:
        return (f"{path.seg}-{path.field} has {comps} component{'s' if comps > 1 else ''}; "
                f"{path.text} cannot exist")
    return None
