"""Running a compiled mapping on one message: ``Mapping.apply(msg, ctx) -> MappedMessage``.

Everything that can be decided when the mapping is loaded is decided then (``engine.mapping.
compiler``): paths are parsed, expressions are closures, each path knows whether it reads the rule's
own segment, a parent, or another segment. Per message this module only walks the segments once per
rule, creates one small scope per fact, and calls the compiled closures.

How a segment name in a path is resolved inside a rule (see docs/mappings.md):

1. the rule's own segment (``for_each``), or one of its parents (``under``, nearest preceding);
2. a segment in the current segment's group: the segments after it up to the next segment that
   starts a group (every ``for_each`` and ``under`` segment of the mapping, and ``groups:``) —
   that is how an NTE after an OBX belongs to that OBX;
3. for a single value, else the first segment of that name in the message (MSH, PID, PV1 ...).
   A path over all segments (``NTE[*]-3``) in a ``for_each`` rule stays within the group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.hl7.message import Message, Segment
from engine.mapping.convert import Conv, ConversionError, Table, TextRep, Unmapped, new_from, zone
from engine.mapping.errors import MappingError
from engine.mapping.paths import ALL, Path
from engine.record.facts import MappedMessage

# -- context --------------------------------------------------------------------------------------

@dataclass(slots=True)
class MapContext:
    """What a mapping needs to know besides the message.

    ``timezone`` is the channel's (times without an offset are read in it); ``tables`` are the
    lookup tables (``MappingSet.tables``); ``control_id`` and ``sending_facility`` are the
    message's MSH-10 and MSH-4 as the receiving side read them (read from MSH when empty).
    ``warnings`` receives one line per value that could not be converted and was skipped because
    the field says ``invalid: skip`` (field path and rule, never the value): log them.
    """

    channel: str
    timezone: str = "UTC"
    tables: Mapping[str, Table] = field(default_factory=dict)
    control_id: str = ""
    sending_facility: str = ""
    message_type: str = ""  # MSH-9 as "ORU^R01"
    warnings: list[str] = field(default_factory=list)  # filled by apply: values skipped (invalid: skip)


CONTEXT_VARIABLES = ("channel", "timezone", "control_id", "sending_facility", "message_type")


def clean(v: str | None) -> str | None:
    """A read value: surrounding blanks dropped; empty and HL7's explicit null ``""`` are None."""
    if not v:
        return None
    v = v.strip()
    return v if v and v != '""' else None


# -- per message and per fact state ---------------------------------------------------------------

class Run:
    """One message being mapped."""

    __slots__ = ("_next_start", "by_name", "cache_key", "ctx", "cv", "keys", "mapping", "seen", "segs", "used")

    def __init__(self, mapping: Mapping_, msg: Message, ctx: MapContext) -> None:
        self.mapping = mapping
        self.ctx = ctx
        segs = msg.segments
        self.segs = segs
        by_name: dict[str, list[Segment]] = {}
        for s in segs:
            lst = by_name.get(s.name)
            if lst is None:
                by_name[s.name] = [s]
            else:
                lst.append(s)
        self.by_name = by_name
        self.used = bytearray(len(segs))
        self.keys: dict[tuple[str, int], str] = {}
        self.seen: dict[str, dict[str, int]] = {}
        self._next_start: list[int] | None = None
        self.cv = mapping.conv(ctx)
        # converted values are cached across messages by their text; the key also holds the
        # delimiters (the same text splits differently under others) and the conversion context
        self.cache_key = (id(self.cv), getattr(msg, "separators", ""))

    def group_end(self, index: int) -> int:
        """Index of the first segment after ``index`` that starts a group (or len(segs))."""
        ns = self._next_start
        if ns is None:
            starts = self.mapping.group_starts
            n = len(self.segs)
            ns = [n] * (n + 1)
            nxt = n
            for i in range(n - 1, -1, -1):
                ns[i] = nxt
                if self.segs[i].name in starts:
                    nxt = i
            self._next_start = ns
        return ns[index]

    def find(self, name: str, item: Segment | None, nth: int | None) -> Segment | None:
        """The segment a single-value path names (rules 2 and 3 in the module docstring)."""
        if item is not None:
            i = item.index
            end = self.group_end(i)
            segs = self.segs
            k = 0
            for j in range(i + 1, end):
                if segs[j].name == name:
                    k += 1
                    if nth is None or k == nth:
                        return segs[j]
            if nth is not None and nth > 1:
                return None
        lst = self.by_name.get(name)
        if not lst:
            return None
        n = (nth or 1) - 1
        return lst[n] if n < len(lst) else None

    def find_all(self, name: str, item: Segment | None) -> list[Segment]:
        if item is not None:
            i = item.index
            end = self.group_end(i)
            return [s for s in self.segs[i + 1:end] if s.name == name]
        return self.by_name.get(name, [])

    def iterate(self, name: str, under: tuple[str, ...]) -> Iterator[tuple[Segment, dict[str, Segment | None]]]:
        """Each ``name`` segment with its parents: for ``under`` = (OBR, SPM), the nearest preceding
        OBR that comes after the nearest preceding SPM, and that SPM."""
        if not under:
            for s in self.by_name.get(name, ()):
                yield s, {}
            return
        last: dict[str, Segment | None] = dict.fromkeys(under)
        pos = {n: k for k, n in enumerate(under)}
        for s in self.segs:
            nm = s.name
            k = pos.get(nm)
            if k is not None:
                last[nm] = s
                for inner in under[:k]:
                    last[inner] = None
            elif nm == name:
                yield s, dict(last)


class Scope:
    """One fact being built: its segment, the segment's parents, and the fields computed so far."""

    __slots__ = ("anc", "item", "run", "vals")

    def __init__(self, run: Run, item: Segment | None, anc: dict[str, Segment | None]) -> None:
        self.run = run
        self.item = item
        self.anc = anc
        self.vals: dict[str, Any] = {}


Getter = Callable[[Scope], Any]


# -- path access, chosen once per path when the mapping is compiled --------------------------------

ITEM, PARENT, OTHER = "item", "parent", "other"


def _segments_getter(path: Path, kind: str) -> Callable[[Scope], list[Segment]]:
    """The segments a path reads (one, or several for ``SEG[*]``), marking them used."""
    name = path.seg
    if kind == ITEM:
        return lambda sc: [sc.item] if sc.item is not None else []
    if kind == PARENT:
        def parent(sc: Scope) -> list[Segment]:
            seg = sc.anc.get(name)
            if seg is None:
                return []
            sc.run.used[seg.index] = 1
            return [seg]
        return parent
    if path.segrep == ALL:
        def every(sc: Scope) -> list[Segment]:
            found = sc.run.find_all(name, sc.item)
            used = sc.run.used
            for s in found:
                used[s.index] = 1
            return found
        return every
    nth = path.segrep

    def one(sc: Scope) -> list[Segment]:
        seg = sc.run.find(name, sc.item, nth)
        if seg is None:
            return []
        sc.run.used[seg.index] = 1
        return [seg]
    return one


def text_getter(path: Path, kind: str) -> Getter:
    """A path in an expression: a string (or None); a list of strings for ``[*]`` paths."""
    f, comp, sub = path.field, path.comp or 1, path.sub or 1
    rep = path.rep or 1
    if not path.many:
        if kind == ITEM:
            def item_value(sc: Scope) -> str | None:
                seg = sc.item
                return clean(seg.value(f, rep, comp, sub)) if seg is not None else None
            return item_value
        segs_of = _segments_getter(path, kind)

        def single(sc: Scope) -> str | None:
            segs = segs_of(sc)
            return clean(segs[0].value(f, rep, comp, sub)) if segs else None
        return single
    segs_all = _segments_getter(path, kind)
    every_rep = path.rep == ALL

    def many(sc: Scope) -> list[str]:
        out: list[str] = []
        for seg in segs_all(sc):
            if every_rep:
                for r in seg.reps(f):
                    v = clean(r.component(comp, sub))
                    if v is not None:
                        out.append(v)
            else:
                v = clean(seg.value(f, rep, comp, sub))
                if v is not None:
                    out.append(v)
        return out
    return many


def reps_getter(path: Path, kind: str, all_reps: bool = False) -> Callable[[Scope], list[Any]]:
    """A path as the input of a conversion: the repetitions it designates (a component path gives
    its text as a one-component value). ``all_reps`` reads every repetition even without ``[*]``."""
    f = path.field
    segs_of = _segments_getter(path, kind)
    if path.comp is not None:
        texts = text_getter(path, kind)

        def comp_values(sc: Scope) -> list[Any]:
            v = texts(sc)
            if v is None:
                return []
            return [TextRep(x) for x in v] if isinstance(v, list) else [TextRep(v)]
        return comp_values
    every = path.rep == ALL or (all_reps and path.rep is None)
    nth = (path.rep or 1) - 1
    if kind == ITEM:
        if every:
            return lambda sc: sc.item.reps(f) if sc.item is not None else []

        def item_rep(sc: Scope) -> list[Any]:
            seg = sc.item
            if seg is None:
                return []
            rs = seg.reps(f)
            return rs[nth:nth + 1] if nth else rs[:1]
        return item_rep

    def reps(sc: Scope) -> list[Any]:
        out: list[Any] = []
        for seg in segs_of(sc):
            rs = seg.reps(f)
            if every:
                out.extend(rs)
            elif nth < len(rs):
                out.append(rs[nth])
        return out
    return reps


# -- compiled rules -------------------------------------------------------------------------------

@dataclass(slots=True)
class CField:
    name: str
    compute: Getter  # the converted value, or None; may raise ConversionError / Unmapped
    where: str  # file:line of the field in the mapping
    source: str  # what it reads, for messages: "OBX-5"
    many: bool = False
    required: bool = False
    min_len: int = 0
    skip_invalid: bool = False
    allowed: frozenset[str] | None = None  # Literal fields (gender)


@dataclass(slots=True)
class CRule:
    kind: str
    name: str
    model: type[Any]
    attr: str  # MappedMessage attribute
    single: bool  # patient
    for_each: str | None
    under: tuple[str, ...]
    when: Getter | None
    key: Getter | None
    fields: list[CField]
    where: str
    required: bool = False
    on_duplicate_key: str = "number"
    plan: tuple[tuple[str, Getter, CField], ...] = ()

    def __post_init__(self) -> None:
        self.plan = tuple((f.name, f.compute, f) for f in self.fields)


def _raise(rule: CRule, label: str, f: CField | None, reason: str) -> MappingError:
    where = f"{label}.{f.name} ({f.where})" if f is not None else f"{label} ({rule.where})"
    return MappingError(where, reason)


class Mapping_:
    """A compiled mapping (``Mapping`` is exported under that name from ``engine.mapping``)."""

    def __init__(self, name: str, file: str, rules: list[CRule], *, description: str = "",
                 messages: Sequence[str] = (), group_starts: frozenset[str] = frozenset(),
                 ignore: frozenset[str] = frozenset(), message_time: CField | None = None,
                 tables: Mapping[str, Table] | None = None,
                 checks: Sequence[tuple[Getter, str, str]] = ()) -> None:
        self.name = name
        self.file = file
        self.rules = rules
        self.description = description
        self.messages = tuple(messages)
        self.group_starts = group_starts
        self.ignore = ignore
        self.message_time = message_time
        self.tables: Mapping[str, Table] = tables or {}
        self._convs: dict[tuple[str, int], Conv] = {}
        self.checks = tuple(checks)

    def __repr__(self) -> str:
        return f"Mapping({self.name!r}, {self.file!r}, {len(self.rules)} rules)"

    def conv(self, ctx: MapContext) -> Conv:
        """The conversion context for a channel timezone and table set (kept: it caches units and
        coding system URIs across messages)."""
        tables = ctx.tables or self.tables
        key = (ctx.timezone or "UTC", id(tables))
        found = self._convs.get(key)
        if found is None or found.tables is not tables:
            found = Conv(zone(key[0]), tables, tables.get("coding_systems"), tables.get("units"))
            if len(self._convs) > 64:
                self._convs.clear()
            self._convs[key] = found
        return found

    def apply(self, msg: Message, ctx: MapContext) -> MappedMessage:
        """Map one message to facts; raises MappingError (permanent) when it cannot."""
        run = Run(self, msg, ctx)
        for check, where, message in self.checks:
            got = check(Scope(run, None, {}))
            if not (got is None or got is False or got in ("", [])):
                raise MappingError(where, message)
        lists: dict[str, list[Any]] = {}
        patient: Any = None
        for rule in self.rules:
            out = lists.setdefault(rule.attr, [])
            produced = 0
            if rule.for_each is None:
                fact = self._fact(rule, Scope(run, None, {}), len(out))
                if fact is not None:
                    produced = 1
                    if rule.single:
                        if patient is not None:
                            raise _raise(rule, rule.attr, None, "a second patient in one message")
                        patient = fact
                    else:
                        out.append(fact)
            else:
                used = run.used
                for seg, anc in run.iterate(rule.for_each, rule.under):
                    used[seg.index] = 1
                    fact = self._fact(rule, Scope(run, seg, anc), len(out))
                    if fact is None:
                        continue
                    produced += 1
                    if rule.single:
                        if patient is not None:
                            raise _raise(rule, rule.attr, None,
                                         f"more than one {rule.for_each} gives a patient; one message is about "
                                         "one patient")
                        patient = fact
                    else:
                        out.append(fact)
            if rule.required and not produced:
                seg_text = f" (no {rule.for_each} segment matched)" if rule.for_each else ""
                raise _raise(rule, rule.attr, None, f"rule {rule.name} is required and produced nothing{seg_text}")
        message_time = None
        if self.message_time is not None:
            message_time = self._field(self.message_time, Scope(run, None, {}), None, "message_time")
        values: dict[str, Any] = {k: v for k, v in lists.items() if k != "patient"}
        values.update(patient=patient, message_time=message_time, unused_segments=self._unused(run))
        return new_from(MappedMessage, values)

    def _unused(self, run: Run) -> list[str]:
        out: list[str] = []
        used = run.used
        ignore = self.ignore
        for i, s in enumerate(run.segs):
            if not used[i] and s.name not in ignore and s.name not in out:
                out.append(s.name)
        return out

    def _field(self, f: CField, sc: Scope, rule: CRule | None, label: str) -> Any:
        try:
            return f.compute(sc)
        except (ConversionError, Unmapped) as exc:
            return self._invalid(f, sc, label, exc)

    def _invalid(self, f: CField, sc: Scope, label: str, exc: Exception) -> Any:
        if f.skip_invalid:
            sc.run.ctx.warnings.append(f"{label}.{f.name} ({f.where}): {f.source}: {exc}; skipped")
            return None
        raise MappingError(f"{label}.{f.name} ({f.where})", f"{f.source}: {exc}") from None

    def _fact(self, rule: CRule, sc: Scope, index: int) -> Any:
        if rule.when is not None:
            try:
                ok = rule.when(sc)
            except (ConversionError, Unmapped) as exc:
                label = rule.attr if rule.single else f"{rule.attr}[{index}]"
                raise _raise(rule, label, None, f"when: {exc}") from None
            if ok is None or ok is False or ok in ("", []):
                return None
        vals = sc.vals
        for name, compute, f in rule.plan:
            try:
                v = compute(sc)
            except (ConversionError, Unmapped) as exc:
                v = self._invalid(f, sc, rule.attr if rule.single else f"{rule.attr}[{index}]", exc)
            if v is None or (type(v) is list and not v):
                if f.required or f.min_len:
                    label = rule.attr if rule.single else f"{rule.attr}[{index}]"
                    if f.required:
                        raise _raise(rule, label, f, f"required value is empty ({f.source})")
                    raise _raise(rule, label, f, f"needs at least {f.min_len} value; nothing found in {f.source}")
                continue  # the model's default (None, or an empty list)
            if f.allowed is not None and v not in f.allowed:
                label = rule.attr if rule.single else f"{rule.attr}[{index}]"
                raise _raise(rule, label, f, f"{f.source} gives a value that is not one of "
                                             f"{', '.join(sorted(f.allowed))} (use a table)")
            vals[name] = v
        label = rule.attr if rule.single else f"{rule.attr}[{index}]"
        if rule.key is not None:
            try:
                k = rule.key(sc)
            except (ConversionError, Unmapped) as exc:
                raise _raise(rule, label, None, f"key: {exc}") from None
            key = k if isinstance(k, str) else "" if k is None else str(k)
            if not key.strip("|^ "):
                raise _raise(rule, label, None, "key is empty: the business key needs a value (see its key:)")
            seen = sc.run.seen.setdefault(rule.kind, {})
            n = seen.get(key, 0) + 1
            seen[key] = n
            if n > 1:
                if rule.on_duplicate_key == "fail":
                    raise _raise(rule, label, None, "two facts in this message have the same key")
                if rule.on_duplicate_key == "number":
                    key = f"{key}#{n}"
            vals["key"] = key
            idx = sc.item.index if sc.item is not None else -1
            sc.run.keys[(rule.kind, idx)] = key
        return new_from(rule.model, vals)
