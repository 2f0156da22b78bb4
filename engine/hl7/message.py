"""Fast read access to every field of an HL7 v2 message, splitting lazily.

``Message.parse(text)`` only cuts the text into segments; a segment is split into fields the first
time one of its fields is read, and repetitions, components and subcomponents are split on each
read. Values are the same as python-hl7's (``hl7.parse`` + ``unescape``) except for the deliberate
differences listed at the end; ``tests/test_message_access.py`` checks that on the whole corpus.

Parsing
    * ``text`` is already decoded. A leading byte-order mark and leading whitespace are skipped; the
      text must then start with ``MSH`` (else ``HL7Error("100", "NOT_HL7", ...)``, as
      ``engine.hl7.header.read_header``), and the MSH needs its field separator (MSH-1).
    * Segments end with CR, LF or CRLF (mixed too). Empty and whitespace-only lines are skipped.
      Every other line is a segment, kept in order: batch envelopes (FHS, BHS, BTS, FTS), a second
      MSH, Z-segments, lines with a bad segment ID. Nothing inside a segment is stripped.
    * A segment's name is its text up to the first field separator (the whole line when it has none).
    * Delimiters: MSH-1 is the field separator; MSH-2 holds component, repetition, escape and
      subcomponent characters in that order, any characters after the fourth (the v2.7 truncation
      character) are ignored. A missing one (MSH-2 shorter than four characters) takes the
      recommended default (``^ ~ \\ &``), as python-hl7 does; the receiver refuses such messages
      anyway (``header.read_delimiters``). Duplicated characters are not rejected: a level whose
      character was already used by a higher level simply has nothing left to split (as python-hl7).
    * ``Message.separators`` is MSH-1 + the first four characters of MSH-2 *as found* (shorter when
      MSH-2 is); ``Message.delimiters`` holds the characters in effect (defaults filled in).

Numbering (1-based, as in the standard)
    * Field n of a segment is the n-th value after the name; MSH-1 is the field separator itself and
      MSH-2 the encoding characters, so MSH-3 is the first field after MSH-2. FHS and BHS are
      numbered the same way. MSH-1 and MSH-2 (FHS/BHS too) are atomic: never split, never
      unescaped; only rep/comp/sub 1 (or 0) reach them.
    * ``field_count()`` is the highest field number present, trailing empty fields as sent included.

Reading
    * ``value(field, rep=1, comp=1, sub=1)``: the unescaped text; None when absent, out of range
      (any index below 0, or field 0), or empty (also when it is empty after unescaping, e.g.
      ``\\H\\``). ``""`` (HL7's explicit null) is returned unchanged as the two characters ``""``.
    * 0 at a level means "the whole of it": ``comp=0`` is the whole repetition, ``sub=0`` the whole
      component, ``rep=0`` the whole field (all repetitions). Levels below a 0 are ignored. A whole
      read keeps the delimiters between the parts (as sent, trailing ones too) and unescapes each
      part separately, so ``A\\S\\B^C`` reads ``A^B^C``; it is None when the text holds nothing
      but delimiters (``^^``) or is empty.
    * ``get(spec)`` / ``Message.get(path)``: ``"5"`` = ``value(5, 1, 0)`` (the whole first
      repetition), ``"5.1"`` = ``value(5, 1, 1, 0)`` (the whole first component, subcomponents
      kept), ``"5.1.2"`` = ``value(5, 1, 1, 2)``. ``"3[2]"`` picks the second repetition,
      ``"3[0]"`` the whole field. So a level not written is read whole, except the repetition,
      which defaults to the first. ``Message.get("PID-5.1")`` reads the first PID;
      ``"OBX[2]-5"`` the second OBX. A malformed spec raises ValueError (a programming error).
    * ``raw(field)``: the field exactly as sent (escapes kept), ``""`` when absent.
    * ``Segment.reps(field)``: the repetitions (empty ones inside the field kept, so indexes match);
      ``[]`` when the field is empty or absent.

Escapes (HL7 v2.x section 2.7), decoded in each leaf after splitting, as python-hl7 does
    * ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``: the field, component, subcomponent, repetition and escape
      characters in effect.
    * ``\\Xhh..\\``: each pair of hex digits becomes one character, ``chr(0xhh)`` (so a UTF-8 byte
      sequence comes out as Latin-1 characters, an odd last digit is a value of its own, ``\\X\\``
      is empty): python-hl7's rule, kept for equality although "decode the bytes in the message's
      charset" would be more correct for multi-byte text.
    * Formatting (2.7.6), as python-hl7 except that a line break is ``"\\n"``: ``\\.br\\``,
      ``\\.sp\\`` and ``\\.ce\\`` give ``"\\n"``; ``\\.fi\\`` and ``\\.nf\\`` give ``""``;
      ``\\.in\\`` and ``\\.ti\\`` four spaces; ``\\.sk\\`` one space. With a count (``\\.sp2\\``,
      ``\\.in+4\\``) the text is repeated count times (a negative count gives ``""``).
    * ``\\H\\`` and ``\\N\\`` (highlighting on/off) are dropped.
    * Anything else is kept exactly as sent, escape characters included: unknown or
      application-defined sequences (``\\Zxx\\``), the character-set switches ``\\Cxxyy\\`` and
      ``\\Mxxyyzz\\`` (not supported), ``\\X\\`` with a non-hex digit, a formatting command with a
      count that is not a number, an empty sequence (two escape characters in a row) and an escape
      character without a closing one. Sequences pair up left to right, as in python-hl7.

Deliberate differences from python-hl7 0.4.5 (asserted in tests/test_message_access.py)
    1. ``\\.br\\``, ``\\.sp\\`` and ``\\.ce\\`` give ``"\\n"``, python-hl7 gives ``"\\r"``: a value
       is text for the mappings and the record, where CR is HL7's segment terminator and not a line
       break anyone expects (``\\X0D\\`` still gives ``"\\r"``).
    2. ``\\H\\`` and ``\\N\\`` are dropped; python-hl7 puts ``"_"`` in the value, text the sender
       never sent.
    3. What python-hl7 cannot decode it drops (unknown, ``\\C..\\``, ``\\M..\\``, empty sequences;
       bad hex from the bad pair on; an unterminated sequence to the end of the value) or raises
       on (``\\.spX\\``); here such text is kept as sent, so no data is lost.
    4. python-hl7 strips whitespace from both ends of the whole message, so trailing blanks of the
       last segment's last field are lost; here they are kept.
    5. A segment with no field separator (a bare ``PID``): python-hl7 names it by its first letter
       (``segment[0][0]`` of a string); here it is named ``PID`` and has no fields.
    6. An MSH with nothing after MSH-2 (``MSH|^~\\&``): python-hl7 repeats the whole segment as
       MSH-3 onwards; here it has fields 1 and 2 only. When MSH has no field separator at all
       python-hl7 reads the segment terminator as one; here that is an HL7Error.
    7. python-hl7 cannot parse at all a message whose delimiters repeat (``MSH|&&&&``, an assertion
       fails) or whose MSH is just ``MSH|`` (IndexError); both are read here by the rules above.

Values are never logged; ``repr`` of these objects shows no content.
"""

from __future__ import annotations

import re
from functools import lru_cache

from engine.errors import HL7Error
from engine.hl7.header import Delimiters

__all__ = ["Message", "Repetition", "Segment"]

_HEADERS = frozenset(("MSH", "FHS", "BHS"))
_HEX = frozenset("0123456789abcdefABCDEF")
_COUNT = re.compile(r"[+-]?[0-9]+")
_FORMAT = {".br": "\n", ".sp": "\n", ".ce": "\n", ".fi": "", ".nf": "", ".in": "    ", ".ti": "    ", ".sk": " "}
_SPEC = re.compile(r"\s*(\d+)(?:\[(\d+)\])?(?:\.(\d+)(?:\.(\d+))?)?\s*")
_PATH = re.compile(r"\s*([A-Za-z0-9]+)(?:\[(\d+)\])?-(.+)")
_LEADING = " \t\r\n\x00"


class _Syntax:
    """The delimiters in effect and the escape table built from them (shared by all segments)."""

    __slots__ = ("blank", "comp", "esc", "field", "rep", "sub", "table")

    def __init__(self, field: str, comp: str, rep: str, esc: str, sub: str) -> None:
        self.field = field
        self.comp = comp
        self.rep = rep
        self.esc = esc
        self.sub = sub
        self.blank = rep + comp + sub
        self.table = {"F": field, "S": comp, "T": sub, "R": rep, "E": esc, "H": "", "N": "", **_FORMAT}

    def unescape(self, s: str) -> str:
        esc = self.esc
        i = s.find(esc)
        if i < 0:
            return s
        out: list[str] = []
        pos = 0
        table = self.table
        while i >= 0:
            j = s.find(esc, i + 1)
            if j < 0:
                break  # no closing escape character: the rest is kept as sent
            seq = s[i + 1:j]
            got = table.get(seq)
            if got is None:
                got = _special(seq)
            if got is not None:
                out.append(s[pos:i])
                out.append(got)
                pos = j + 1
            i = s.find(esc, j + 1)
        out.append(s[pos:])
        return "".join(out)

    def comp_text(self, raw: str) -> str:
        if self.esc not in raw:
            return raw
        return self.sub.join([self.unescape(x) for x in raw.split(self.sub)])

    def rep_text(self, raw: str) -> str:
        if self.esc not in raw:
            return raw
        return self.comp.join([self.comp_text(x) for x in raw.split(self.comp)])

    def field_text(self, raw: str) -> str:
        if self.esc not in raw:
            return raw
        return self.rep.join([self.rep_text(x) for x in raw.split(self.rep)])

    def pick(self, raw: str, rep: int, comp: int, sub: int) -> str | None:
        """The value at rep/comp/sub of a (non-atomic) field's raw text."""
        if rep != 1 or self.rep in raw:
            if rep == 0:
                return (self.field_text(raw) or None) if raw.strip(self.blank) else None
            parts = raw.split(self.rep)
            if not 0 < rep <= len(parts):
                return None
            raw = parts[rep - 1]
        if comp != 1 or self.comp in raw:
            if comp == 0:
                return (self.rep_text(raw) or None) if raw.strip(self.blank) else None
            parts = raw.split(self.comp)
            if not 0 < comp <= len(parts):
                return None
            raw = parts[comp - 1]
        if sub != 1 or self.sub in raw:
            if sub == 0:
                return (self.comp_text(raw) or None) if raw.strip(self.blank) else None
            parts = raw.split(self.sub)
            if not 0 < sub <= len(parts):
                return None
            raw = parts[sub - 1]
        if self.esc in raw:
            raw = self.unescape(raw)
        return raw or None


def _special(seq: str) -> str | None:
    """Hex data and counted formatting commands; None for a sequence kept as sent."""
    if seq[:1] == "X":
        digits = seq[1:]
        if not _HEX.issuperset(digits):
            return None
        return "".join([chr(int(digits[k:k + 2], 16)) for k in range(0, len(digits), 2)])
    if seq[:1] == ".":
        base = _FORMAT.get(seq[:3])
        if base is not None and _COUNT.fullmatch(seq, 3):
            return base * int(seq[3:])
    return None


@lru_cache(maxsize=1024)
def _spec(spec: str) -> tuple[int, int, int, int]:
    m = _SPEC.fullmatch(spec)
    if m is None:
        raise ValueError(f"not a field spec: {spec!r} (expected e.g. 5, 5.1, 3[2].4.1)")
    f, r, c, s = m.groups()
    return int(f), int(r) if r is not None else 1, int(c) if c is not None else 0, int(s) if s is not None else 0


@lru_cache(maxsize=1024)
def _path(path: str) -> tuple[str, int, str]:
    m = _PATH.fullmatch(path)
    if m is None:
        raise ValueError(f"not a field path: {path!r} (expected e.g. PID-5.1, OBX[2]-5)")
    _spec(m[3])  # validate now
    return m[1], int(m[2]) if m[2] is not None else 1, m[3]


class Repetition:
    """One repetition of a field. ``raw`` is its text as sent."""

    __slots__ = ("_atomic", "_syntax", "raw")

    def __init__(self, raw: str, syntax: _Syntax, atomic: bool = False) -> None:
        self.raw = raw
        self._syntax = syntax
        self._atomic = atomic

    def __repr__(self) -> str:
        return f"<Repetition of {len(self.raw)} characters>"

    def component(self, comp: int, sub: int = 1) -> str | None:
        """Unescaped component ``comp`` (subcomponent ``sub``); 0 reads the level whole, None when
        absent or empty (the same rules as ``Segment.value``)."""
        if self._atomic:
            return (self.raw or None) if comp in (0, 1) and sub in (0, 1) else None
        return self._syntax.pick(self.raw, 1, comp, sub)

    def components(self) -> list[str]:
        """Unescaped first subcomponent of every component, trailing empty ones kept as ``""``."""
        if self._atomic:
            return [self.raw]
        s = self._syntax
        return [s.unescape(c.split(s.sub, 1)[0]) for c in self.raw.split(s.comp)]

    def subcomponents(self, comp: int) -> list[str]:
        """Unescaped subcomponents of component ``comp`` (``[]`` when out of range)."""
        if self._atomic:
            return [self.raw] if comp == 1 else []
        s = self._syntax
        parts = self.raw.split(s.comp)
        if not 0 < comp <= len(parts):
            return []
        return [s.unescape(x) for x in parts[comp - 1].split(s.sub)]

    def text(self) -> str:
        """The whole repetition, each part unescaped, delimiters kept (``""`` when empty)."""
        return self.raw if self._atomic else self._syntax.rep_text(self.raw)


class Segment:
    """One segment. ``text`` is the line as sent (without its terminator)."""

    __slots__ = ("_fields", "_syntax", "index", "name", "text")

    def __init__(self, name: str, index: int, text: str, syntax: _Syntax) -> None:
        self.name = name
        self.index = index
        self.text = text
        self._syntax = syntax
        self._fields: list[str] | None = None

    def __repr__(self) -> str:
        return f"<Segment {self.name} #{self.index}>"

    def _split(self) -> list[str]:
        t = self.text
        fs = self._syntax.field
        fields = [self.name, fs, *t[4:].split(fs)] if self.name in _HEADERS and len(t) > 3 else t.split(fs)
        self._fields = fields
        return fields

    def _atomic(self, field: int) -> bool:
        return field <= 2 and self.name in _HEADERS and len(self.text) > 3

    def field_count(self) -> int:
        """Highest field number present (MSH-1 counts; trailing empty fields as sent count)."""
        return len(self._fields or self._split()) - 1

    def raw(self, field: int) -> str:
        """Field ``field`` exactly as sent (escapes kept); ``""`` when absent."""
        fields = self._fields or self._split()
        return fields[field] if 0 < field < len(fields) else ""

    def reps(self, field: int) -> list[Repetition]:
        """The repetitions of a field (empty ones inside kept); ``[]`` when empty or absent."""
        raw = self.raw(field)
        if not raw:
            return []
        s = self._syntax
        if self._atomic(field):
            return [Repetition(raw, s, True)]
        return [Repetition(r, s) for r in raw.split(s.rep)]

    def value(self, field: int, rep: int = 1, comp: int = 1, sub: int = 1) -> str | None:
        """The unescaped value; 0 reads a level whole; None when absent, out of range or empty."""
        fields = self._fields or self._split()
        if not 0 < field < len(fields):
            return None
        raw = fields[field]
        if not raw:
            return None
        if field <= 2 and self._atomic(field):
            return raw if rep in (0, 1) and comp in (0, 1) and sub in (0, 1) else None
        return self._syntax.pick(raw, rep, comp, sub)

    def get(self, spec: str) -> str | None:
        """``"5"`` (whole first repetition), ``"5.1"`` (whole component), ``"3[2].4.1"``; see module doc."""
        f, r, c, s = _spec(spec)
        return self.value(f, r, c, s)


class Message:
    """A parsed message: its segments in order, split further only when read."""

    __slots__ = ("_by_name", "delimiters", "segments", "separators")

    def __init__(self, segments: list[Segment], separators: str, delimiters: Delimiters) -> None:
        self.segments = segments
        self.separators = separators
        self.delimiters = delimiters
        by_name: dict[str, list[Segment]] = {}
        for seg in segments:
            lst = by_name.get(seg.name)
            if lst is None:
                by_name[seg.name] = [seg]
            else:
                lst.append(seg)
        self._by_name = by_name

    def __repr__(self) -> str:
        return f"<Message of {len(self.segments)} segments>"

    @classmethod
    def parse(cls, text: str) -> Message:
        if text.startswith("\ufeff"):
            text = text[1:]
        text = text.lstrip(_LEADING)
        if not text.startswith("MSH"):
            raise HL7Error("100", "NOT_HL7", "message does not start with an MSH segment", "MSH^1")
        if "\n" in text:
            text = text.replace("\r\n", "\r").replace("\n", "\r")
        lines = text.split("\r")
        first = lines[0]
        if len(first) < 4:
            raise HL7Error("100", "NOT_HL7", "MSH segment has no field separator", "MSH^1^1")
        fs = first[3]
        end = first.find(fs, 4)
        enc = first[4:end] if end >= 0 else first[4:]
        n = len(enc)
        syntax = _Syntax(fs, enc[0] if n > 0 else "^", enc[1] if n > 1 else "~", enc[2] if n > 2 else "\\",
                         enc[3] if n > 3 else "&")
        segments = [Segment("MSH", 0, first, syntax)]
        for line in lines[1:]:
            if not line or line.isspace():
                continue
            k = line.find(fs)
            name = line if k < 0 else line[:k]
            segments.append(Segment(name, len(segments), line, syntax))
        delimiters = Delimiters(fs, syntax.comp, syntax.rep, syntax.esc, syntax.sub, enc)
        return cls(segments, fs + enc[:4], delimiters)

    def first(self, name: str) -> Segment | None:
        lst = self._by_name.get(name)
        return lst[0] if lst else None

    def all(self, name: str) -> list[Segment]:
        return list(self._by_name.get(name, ()))

    def get(self, path: str) -> str | None:
        """``"PID-5.1"``, ``"MSH-9.2"``, ``"PID-3[2].4.1"`` on the first segment of that name
        (``"OBX[2]-5"`` on the second); the spec after ``-`` as in ``Segment.get``."""
        name, nth, spec = _path(path)
        lst = self._by_name.get(name)
        if not lst or nth < 1 or nth > len(lst):
            return None
        return lst[nth - 1].get(spec)
