"""Turn a validated mapping file into closures (``engine.mapping.engine.Mapping_``), reporting every
semantic problem with its position: unknown fact kinds and fields, paths that cannot exist, unknown
tables, bad expressions, conversions that do not fit the fact field, required fields without a rule.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from annotated_types import MinLen
from pydantic import BaseModel

from engine.config.loader import dotted, position
from engine.errors import Problem
from engine.mapping import convert as cv
from engine.mapping.convert import ALIASES, CONVERSIONS, Table, TextRep, Unmapped
from engine.mapping.engine import (
    CONTEXT_VARIABLES,
    ITEM,
    OTHER,
    PARENT,
    CField,
    CRule,
    Getter,
    Mapping_,
    Scope,
    reps_getter,
    text_getter,
)
from engine.mapping.expr import Binder, ExprError, Fn, Node, compile_node, empty, parse, text_of
from engine.mapping.model import FieldSpec, MappingFile, RuleSpec
from engine.mapping.paths import Path, PathError, check_path, check_segment, parse_path
from engine.mapping.template import TemplateProblem, compile_template, literal_paths
from engine.record import facts as F
from engine.record.facts import FACT_KINDS as _FACT_KINDS

ATTR = {"patient": "patient", "encounter": "encounters", "report": "reports", "observation": "observations",
        "specimen": "specimens", "allergy": "allergies", "immunization": "immunizations",
        "condition": "conditions", "procedure": "procedures", "merge": "merges"}

# the conversion used when a field gives none (by the fact field's type)
INFER: dict[type, str] = {
    str: "string", F.Instant: "datetime", bool: "boolean", Decimal: "number", F.CodeableConcept: "codeable",
    F.Coding: "coding", F.Identifier: "identifier", F.HumanName: "name", F.Address: "address",
    F.Quantity: "quantity", F.Value: "value", F.ReferenceRange: "reference_range",
}
Loc = tuple[int | str, ...]
FACT_KINDS = typing.cast(dict[str, type[BaseModel]], _FACT_KINDS)


@dataclass(slots=True)
class Target:
    """What a fact field accepts."""

    many: bool
    types: tuple[type, ...]
    required: bool
    min_len: int = 0
    allowed: frozenset[str] | None = None


def target_of(model: type[BaseModel], name: str) -> Target | None:
    info = model.model_fields.get(name)
    if info is None:
        return None
    ann: Any = info.annotation
    many = False
    allowed: frozenset[str] | None = None
    args = [a for a in typing.get_args(ann) if a is not type(None)] if _is_union(ann) else [ann]
    types_: list[type] = []
    for arg in args:
        a = arg
        origin = typing.get_origin(a)
        if origin is list:
            many = True
            a = typing.get_args(a)[0]
            origin = typing.get_origin(a)
        if origin is typing.Literal:
            allowed = frozenset(str(x) for x in typing.get_args(a))
            types_.append(str)
        elif isinstance(a, type):
            types_.append(a)
    min_len = next((m.min_length for m in info.metadata if isinstance(m, MinLen)), 0)
    return Target(many, tuple(types_), info.is_required(), min_len, allowed)


def _is_union(ann: Any) -> bool:
    return typing.get_origin(ann) in (typing.Union, types.UnionType)


def _plain(v: Any) -> Any:
    """A fact field's value as expressions see it (``code`` -> its first code, ...)."""
    if isinstance(v, F.CodeableConcept):
        return v.codings[0].code if v.codings else v.text
    if isinstance(v, F.Identifier):
        return v.value
    if isinstance(v, F.Coding):
        return v.code
    if isinstance(v, F.Instant):
        return v.text
    if isinstance(v, F.Quantity):
        return v.value
    if isinstance(v, F.HumanName):
        return v.family
    return v


class Compiler:
    def __init__(self, spec: MappingFile, root: Any, shown: str, name: str, tables: Mapping[str, Table]) -> None:
        self.spec = spec
        self.root = root
        self.shown = shown
        self.name = name
        self.tables = tables
        self.problems: list[Problem] = []
        names = {r.for_each for r in spec.rules if r.for_each}
        for r in spec.rules:
            names.update(_under(r))
        names.update(spec.groups)
        self.group_starts = frozenset(names)
        self.kinds_before: set[str] = set()

    # -- reporting --------------------------------------------------------------------------------

    def problem(self, loc: Loc, message: str, col_offset: int = 0) -> None:
        line, col = position(self.root, loc)
        self.problems.append(Problem(self.shown, line, col + col_offset, dotted(loc), message))

    def where(self, loc: Loc) -> str:
        line, _ = position(self.root, loc)
        return f"{self.shown}:{line}"

    # -- the whole file ---------------------------------------------------------------------------

    def compile(self) -> Mapping_ | None:
        spec = self.spec
        for i, seg in enumerate(spec.groups):
            self._segment(("groups", i), seg)
        for i, seg in enumerate(spec.ignore_segments):
            self._segment(("ignore_segments", i), seg)
        for i, mt in enumerate(spec.messages):
            if not re.fullmatch(r"[A-Z0-9]{3}(\^[A-Z0-9]{3}(\^[A-Z0-9_]+)?)?", mt):
                self.problem(("messages", i), f"{mt!r} is not a message type such as ORU^R01")
        checks: list[tuple[Getter, str, str]] = []
        for i, check in enumerate(spec.checks):
            cctx = RuleCtx(None, (), "message", F.MappedMessage, self)
            fn = self.expr(cctx, check.fail_when, ("checks", i, "fail_when"))
            if fn is not None:
                checks.append((fn, f"checks[{i}] ({self.where(('checks', i))})", check.message))
        rules = []
        for i, rule in enumerate(spec.rules):
            compiled = self.rule(rule, ("rules", i))
            if compiled is not None:
                rules.append(compiled)
            self.kinds_before.add(rule.fact)
        message_time = None
        if spec.message_time is not None:
            ctx = RuleCtx(None, (), "message", F.MappedMessage, self)
            target = Target(False, (F.Instant,), False)
            message_time = self.field(ctx, "message_time", spec.message_time, target, ("message_time",))
        if self.problems:
            return None
        return Mapping_(self.name, self.shown, rules, description=spec.description, messages=spec.messages,
                        group_starts=self.group_starts, ignore=frozenset(spec.ignore_segments),
                        message_time=message_time, tables=self.tables, checks=checks)

    def _segment(self, loc: Loc, name: str) -> bool:
        problem = check_segment(name)
        if problem:
            self.problem(loc, problem)
            return False
        return True

    # -- rules ------------------------------------------------------------------------------------

    def rule(self, rule: RuleSpec, loc: Loc) -> CRule | None:
        model = FACT_KINDS.get(rule.fact)
        if model is None:
            self.problem((*loc, "fact"), f"unknown fact kind {rule.fact!r}; expected one of {', '.join(FACT_KINDS)}")
            return None
        under = _under(rule)
        ok = True
        if rule.for_each is not None:
            ok = self._segment((*loc, "for_each"), rule.for_each)
        elif under:
            self.problem((*loc, "under"), "under: needs for_each: (the segment whose parents these are)")
            ok = False
        for k, u in enumerate(under):
            where = (*loc, "under", k) if isinstance(rule.under, list) else (*loc, "under")
            if self._segment(where, u) and u == rule.for_each:
                self.problem(where, f"{u} cannot be under itself")
                ok = False
        if len(set(under)) != len(under):
            self.problem((*loc, "under"), "a segment is named twice")
        ctx = RuleCtx(rule.for_each, under, rule.fact, model, self)
        fields: list[CField] = []
        has_key = "key" in model.model_fields
        for fname, value in rule.fields.items():
            floc = (*loc, "fields", fname)
            if fname == "key" and has_key:
                self.problem(floc, "the key is given by the rule's key:, not as a field")
                continue
            target = target_of(model, fname)
            if target is None:
                allowed = ", ".join(f for f in model.model_fields if f != "key")
                self.problem(floc, f"{rule.fact} has no field {fname!r}; its fields are {allowed}")
                continue
            compiled = self.field(ctx, fname, value, target, floc)
            if compiled is not None:
                fields.append(compiled)
                ctx.available.add(fname)
        for fname, info in model.model_fields.items():
            if fname != "key" and info.is_required() and fname not in rule.fields:
                self.problem((*loc, "fields"), f"{rule.fact} needs {fname}: add a rule for it")
        when = self.expr(ctx, rule.when, (*loc, "when")) if rule.when is not None else None
        key = None
        if has_key:
            if rule.key is None:
                self.problem(loc, f"a {rule.fact} rule needs key: (the business key that finds the fact on a "
                                  "resend or replay)")
            else:
                ctx.available.update(rule.fields)
                key = self.expr(ctx, rule.key, (*loc, "key"))
        elif rule.key is not None:
            self.problem((*loc, "key"), f"{rule.fact} facts have no key (they are found by their identifiers)")
        if rule.fact == "patient" and rule.for_each not in (None, "PID"):
            self.problem((*loc, "for_each"), "a message has one patient: use no for_each (the first PID)")
        if not ok:
            return None
        return CRule(rule.fact, rule.name or rule.fact, model, ATTR[rule.fact], rule.fact == "patient",
                     rule.for_each, under, when, key, fields, self.where(loc), rule.required,
                     rule.on_duplicate_key)

    # -- expressions ------------------------------------------------------------------------------

    def expr(self, ctx: RuleCtx, text: str, loc: Loc) -> Getter | None:
        try:
            node = parse(text)
            return compile_node(node, RuleBinder(ctx, loc))
        except ExprError as exc:
            self.problem(loc, f"expression: {exc} (at character {exc.column})", 0)
            return None

    # -- fields -----------------------------------------------------------------------------------

    def field(self, ctx: RuleCtx, name: str, value: Any, target: Target, loc: Loc) -> CField | None:
        if isinstance(value, list):
            if not target.many:
                self.problem(loc, f"{name} holds one value; a list of sources is only for list fields")
                return None
            parts = []
            for i, item in enumerate(value):
                got = self.field(ctx, name, item, target, (*loc, i))
                if got is not None:
                    parts.append(got)
            if len(parts) != len(value):
                return None
            computes = [p.compute for p in parts]

            def concat(sc: Scope) -> list[Any]:
                out: list[Any] = []
                for f in computes:
                    v = f(sc)
                    if v:
                        out.extend(v)
                return out
            src = ", ".join(p.source for p in parts)
            return CField(name, concat, self.where(loc), src, True, False, target.min_len,
                          any(p.skip_invalid for p in parts), target.allowed)
        spec = value if isinstance(value, FieldSpec) else self._shorthand(value)
        return self._field(ctx, name, spec, target, loc)

    def _shorthand(self, value: Any) -> FieldSpec:
        if isinstance(value, str):
            return FieldSpec(expr=value)
        return FieldSpec(const=value)

    def _field(self, ctx: RuleCtx, name: str, spec: FieldSpec, target: Target, loc: Loc) -> CField | None:
        n_sources = sum(x is not None for x in (spec.path, spec.expr, spec.template, spec.const, spec.fields))
        if n_sources != 1:
            self.problem(loc, "give exactly one of path:, expr:, template:, const: or fields:" if n_sources else
                         "needs a value: path:, expr:, template:, const: or fields:")
            return None
        before = len(self.problems)
        skip = (spec.invalid or self.spec.invalid) == "skip"
        when = self.expr(ctx, spec.when, (*loc, "when")) if spec.when is not None else None

        # nested object built field by field
        if spec.fields is not None:
            return self._nested(ctx, name, spec, target, loc, when, skip)

        # the conversion
        conv_name = self._conversion(spec, target, loc)
        if conv_name is None:
            return None
        info = CONVERSIONS[conv_name]
        for param in ("type", "unit", "system", "systems", "id_type"):
            if getattr(spec, param) is not None and param not in info.params:
                self.problem((*loc, param), f"{param}: does not apply to the {conv_name} conversion")
        table = None
        if spec.table is not None:
            if spec.table not in self.tables:
                self.problem((*loc, "table"), f"unknown table {spec.table!r}; tables are "
                                              f"{', '.join(sorted(self.tables)) or '(none in mappings/tables/)'}")
            elif conv_name not in ("string", "codeable", "coding", "organization"):
                self.problem((*loc, "table"), f"a table maps codes and text; it does not apply to {conv_name}")
            else:
                table = spec.table
        if spec.systems is not None and spec.systems not in self.tables:
            self.problem((*loc, "systems"), f"unknown table {spec.systems!r}")

        mode = MODES[conv_name]
        source, source_text = self._source(ctx, spec, loc, mode, target.many)
        if source is None:
            return None
        convert = self._converter(ctx, conv_name, spec, table, loc)
        default = self._default(spec, conv_name, loc)
        if len(self.problems) > before or convert is False or convert is True:
            return None
        # a coded value, a name, an identifier ... depends only on its text (and on tables, fixed
        # when the mapping is loaded): convert each distinct text once. SN reads the units too.
        cacheable = mode == PARTS and conv_name != "sn"
        compute = _pipeline(mode, source, convert, target.many, when, default, cacheable)
        return CField(name, compute, self.where(loc), source_text, target.many, spec.required, target.min_len,
                      skip, target.allowed)

    def _conversion(self, spec: FieldSpec, target: Target, loc: Loc) -> str | None:
        if spec.as_ is not None:
            conv_name = ALIASES.get(spec.as_) or ALIASES.get(spec.as_.upper())
            if conv_name is None:
                self.problem((*loc, "as"), f"unknown conversion {spec.as_!r}; known: "
                                           f"{', '.join(sorted(ALIASES))}")
                return None
        else:
            guesses = [INFER[t] for t in target.types if t in INFER]
            if len(guesses) != 1:
                self.problem(loc, "say which conversion to use with as: (this field takes "
                                  f"{' or '.join(t.__name__ for t in target.types)})")
                return None
            conv_name = guesses[0]
        produces = CONVERSIONS[conv_name].produces
        prod = produces if isinstance(produces, tuple) else (produces,)
        if not any(p in target.types for p in prod):
            want = " or ".join(t.__name__ for t in target.types)
            self.problem((*loc, "as") if spec.as_ else loc,
                         f"the {conv_name} conversion gives {prod[0].__name__}, but this field takes {want}")
            return None
        return conv_name

    def _source(self, ctx: RuleCtx, spec: FieldSpec, loc: Loc, mode: str, many: bool
                ) -> tuple[Callable[[Scope], Any] | None, str]:
        """What the field reads, shaped for its conversion: TEXT mode gives a string (a list of
        strings for list fields), PARTS and REPS modes a list of repetitions."""
        if spec.const is not None:
            v = spec.const
            return _from_value(lambda sc: v, mode), "a constant"
        if spec.template is not None:
            fn = self._template(ctx, spec.template, (*loc, "template"))
            return (None, "") if fn is None else (_from_value(fn, mode), "a template")
        paths: list[tuple[Path, Loc]] = []
        if spec.path is not None:
            raw = spec.path if isinstance(spec.path, list) else [spec.path]
            for i, text in enumerate(raw):
                ploc = (*loc, "path", i) if isinstance(spec.path, list) else (*loc, "path")
                try:
                    paths.append((parse_path(text), ploc))
                except PathError as exc:
                    self.problem(ploc, str(exc))
            if len(paths) != len(raw):
                return None, ""
        else:
            assert spec.expr is not None
            try:
                node = parse(spec.expr)
            except ExprError as expr_exc:  # a name of its own: compiled (mypyc), one name has one type
                self.problem((*loc, "expr"), f"expression: {expr_exc} (at character {expr_exc.column})")
                return None, ""
            bare = _bare_paths(node)
            if bare is None:
                try:
                    fn = compile_node(node, RuleBinder(ctx, (*loc, "expr")))
                except ExprError as expr_exc:
                    self.problem((*loc, "expr"), f"expression: {expr_exc} (at character {expr_exc.column})")
                    return None, ""
                return _from_value(fn, mode), spec.expr
            paths = [(p, (*loc, "expr")) for p in bare]
        getters: list[Callable[[Scope], Any]] = []
        for p, ploc in paths:
            if not ctx.check_path(p, ploc):
                continue
            kind = ctx.kind_of(p.seg)
            if mode == TEXT:
                getters.append(text_getter(p, kind))
            else:
                getters.append(reps_getter(p, kind, mode == REPS))
        if len(getters) != len(paths):
            return None, ""
        text = " or ".join(p.text for p, _ in paths)
        if len(getters) == 1:
            return getters[0], text
        if mode == TEXT:
            def first_text(sc: Scope) -> Any:
                for g in getters:
                    v = g(sc)
                    if v:
                        return v
                return None
            return first_text, text

        def first_reps(sc: Scope) -> list[Any]:
            for g in getters:
                found: list[Any] = g(sc)
                if any(_present(r) for r in found):
                    return found
            return []
        return first_reps, text

    def _template(self, ctx: RuleCtx, source: str, loc: Loc) -> Callable[[Scope], Any] | None:
        """A ``template:`` field (engine.mapping.template), its paths and names checked as an expression's."""
        try:
            paths, names = literal_paths(source)
        except TemplateProblem as exc:
            self.problem(loc, str(exc))
            return None
        binder = RuleBinder(ctx, loc)
        readers: dict[str, Callable[[Scope], Any]] = {}
        values: dict[str, Callable[[Scope], Any]] = {}
        ok = True
        for text in paths:
            try:
                readers[text] = binder.path(parse_path(text), 0)
            except (PathError, ExprError) as exc:
                self.problem(loc, f"template: field({text!r}): {exc}")
                ok = False
        for name in sorted(names):
            try:
                values[name] = binder.var(name, 0)
            except ExprError as exc:
                self.problem(loc, f"template: {exc}")
                ok = False
        return compile_template(source, readers, values) if ok else None

    def _converter(self, ctx: RuleCtx, conv_name: str, spec: FieldSpec, table: str | None, loc: Loc
                   ) -> Callable[..., Any] | bool | None:
        """The conversion as a closure; None for text as read; False when there are problems.
        TEXT: (text, sc); PARTS: (components, repetition, sc); REPS: (repetitions, sc)."""
        unit_get: Callable[[Scope], list[Any]] | None = None
        if spec.unit is not None:
            try:
                up = parse_path(spec.unit)
            except PathError as exc:
                self.problem((*loc, "unit"), str(exc))
                return False
            if not ctx.check_path(up, (*loc, "unit")):
                return False
            unit_get = reps_getter(up, ctx.kind_of(up.seg))
        type_get: Getter | None = None
        if spec.type is not None:
            type_get = self.expr(ctx, spec.type, (*loc, "type"))
            if type_get is None:
                return False
        elif conv_name == "value":
            self.problem(loc, "the value conversion needs type: (the path of the HL7 type, e.g. OBX-2)")
            return False
        system = spec.system
        systems = spec.systems
        id_type = spec.id_type

        def unit_of(sc: Scope) -> list[str] | None:
            if unit_get is None:
                return None
            found = unit_get(sc)
            return found[0].components() if found else None

        def tbl(sc: Scope, name: str) -> Table:
            try:
                return sc.run.cv.tables[name]
            except KeyError:
                raise Unmapped(name) from None

        if conv_name == "string":
            if table is None:
                return None
            tname = table
            return lambda t, sc: tbl(sc, tname).lookup(t)
        if conv_name == "text":
            def text_all(reps: list[Any], sc: Scope) -> Any:
                parts = [r.text() for r in reps]
                text = "\n".join(p for p in parts if p.strip() not in ("", '""'))
                return text or None
            return text_all
        if conv_name == "datetime":
            return lambda t, sc: cv.dtm(t, sc.run.cv.tz)
        if conv_name == "number":
            return lambda t, sc: cv.decimal(t)
        if conv_name == "boolean":
            return lambda t, sc: t if isinstance(t, bool) else cv.boolean(t)
        if conv_name == "quantity":
            def qty(t: str, sc: Scope) -> Any:
                d = cv.decimal(t)
                return None if d is None else cv.quantity(d, unit_of(sc), sc.run.cv)
            return qty
        if conv_name == "reference_range":
            ranges: dict[tuple[Any, str, str], Any] = {}

            def ref_range(t: str, sc: Scope) -> Any:
                unit = unit_of(sc)
                key = (sc.run.cache_key, t, "^".join(unit[:3]) if unit else "")
                found = ranges.get(key, _MISSING)
                if found is _MISSING:
                    found = cv.reference_range(t, unit, sc.run.cv)
                    if len(ranges) >= _CACHE_SIZE:
                        ranges.clear()
                    ranges[key] = found
                return found
            return ref_range
        if conv_name == "codeable":
            if table is None:
                return lambda p, r, sc: cv.cwe(p, sc.run.cv, system)
            tname = table
            return lambda p, r, sc: cv.cwe(p, sc.run.cv, system, tbl(sc, tname))
        if conv_name == "coding":
            if table is None:
                return lambda p, r, sc: cv.coding(p, sc.run.cv, system)
            tname = table

            def one_coding(p: list[str], r: Any, sc: Scope) -> Any:
                got = cv.coding(p, sc.run.cv, system)
                if got is None:
                    return None
                t = tbl(sc, tname)
                hit = t.find(got.code)
                if isinstance(hit, F.Coding):
                    return hit
                mapped = hit if hit is not None else t.miss(got.code)
                return None if mapped is None else cv.new(F.Coding, code=mapped, system=got.system,
                                                          display=got.display)
            return one_coding
        if conv_name == "name":
            return lambda p, r, sc: cv.xpn(p)
        if conv_name == "identifier":
            if systems is None:
                return lambda p, r, sc: cv.cx(p, r, None, id_type)
            sname = systems
            return lambda p, r, sc: cv.cx(p, r, tbl(sc, sname), id_type)
        if conv_name == "entity_id":
            if systems is None:
                return lambda p, r, sc: cv.ei(p, None, id_type)
            sname = systems
            return lambda p, r, sc: cv.ei(p, tbl(sc, sname), id_type)
        if conv_name == "address":
            return lambda p, r, sc: cv.xad(p)
        if conv_name == "telecom":
            return lambda p, r, sc: cv.xtn(p)
        if conv_name == "organization":
            if table is None:
                return lambda p, r, sc: cv.hd(p)
            tname = table
            return lambda p, r, sc: tbl(sc, tname).lookup(cv.hd(p))
        if conv_name == "person":
            return lambda p, r, sc: cv.xcn(p)
        if conv_name == "sn":
            return lambda p, r, sc: cv.sn(p, unit_of(sc), sc.run.cv)
        if conv_name == "value":
            assert type_get is not None
            tg = type_get

            def value(reps: list[Any], sc: Scope) -> Any:
                t = tg(sc)
                return cv.obx_value(text_of(t) if t is not None else None, reps, unit_of(sc), sc.run.cv)
            return value
        raise AssertionError(conv_name)  # pragma: no cover

    def _default(self, spec: FieldSpec, conv_name: str, loc: Loc) -> Any:
        d = spec.default
        if d is None:
            return None
        if conv_name in ("string", "text", "organization", "person", "telecom"):
            return str(d).lower() if isinstance(d, bool) else str(d)
        if conv_name == "boolean" and isinstance(d, bool):
            return d
        if conv_name == "number" and not isinstance(d, bool) and isinstance(d, (int, float, str)):
            try:
                return Decimal(str(d))
            except ArithmeticError:
                pass
        if conv_name in ("codeable", "coding") and isinstance(d, str):
            coding = cv.new(F.Coding, code=d)
            return coding if conv_name == "coding" else cv.new(F.CodeableConcept, codings=[coding])
        self.problem((*loc, "default"), f"a default does not apply to the {conv_name} conversion "
                                        "(defaults are text, numbers, yes/no, or a code)")
        return None

    def _nested(self, ctx: RuleCtx, name: str, spec: FieldSpec, target: Target, loc: Loc, when: Getter | None,
                skip: bool) -> CField | None:
        models = [t for t in target.types if isinstance(t, type) and issubclass(t, BaseModel)]
        if len(models) != 1:
            self.problem((*loc, "fields"), f"{name} is not an object; fields: does not apply")
            return None
        model = models[0]
        for extra in ("as_", "table", "type", "unit", "system", "systems", "id_type", "default"):
            if getattr(spec, extra) is not None:
                key = "as" if extra == "as_" else extra
                self.problem((*loc, key), f"{key}: does not apply with fields: (give it on the inner fields)")
        parts: list[CField] = []
        assert spec.fields is not None
        for sub, value in spec.fields.items():
            sloc = (*loc, "fields", sub)
            t = target_of(model, sub)
            if t is None:
                self.problem(sloc, f"{model.__name__} has no field {sub!r}; its fields are "
                                   f"{', '.join(model.model_fields)}")
                continue
            got = self.field(ctx, sub, value, t, sloc)
            if got is not None:
                parts.append(got)
        for fname, info in model.model_fields.items():
            if info.is_required() and fname not in spec.fields:
                self.problem((*loc, "fields"), f"{model.__name__} needs {fname}")
        if len(parts) != len(spec.fields):
            return None

        def build(sc: Scope) -> Any:
            if when is not None and empty(when(sc)):
                return None
            vals: dict[str, Any] = {}
            for p in parts:
                v = p.compute(sc)
                if v is None or (p.many and not v):
                    if p.required or (not p.many and model.model_fields[p.name].is_required()):
                        return None  # an incomplete object is no object
                    if p.many:
                        v = []
                vals[p.name] = v
            obj = cv.new_from(model, vals)
            return [obj] if target.many else obj
        return CField(name, build, self.where(loc), name, target.many, spec.required, target.min_len, skip,
                      target.allowed)


TEXT, PARTS, REPS = "text", "parts", "reps"
MODES = {"string": TEXT, "datetime": TEXT, "number": TEXT, "boolean": TEXT, "quantity": TEXT,
         "reference_range": TEXT, "codeable": PARTS, "coding": PARTS, "name": PARTS, "identifier": PARTS,
         "entity_id": PARTS, "address": PARTS, "telecom": PARTS, "organization": PARTS, "person": PARTS,
         "sn": PARTS, "value": REPS, "text": REPS}


def _present(r: Any) -> bool:
    t = r.text()
    return bool(t) and t.strip() not in ("", '""')


def _from_value(fn: Callable[[Scope], Any], mode: str) -> Callable[[Scope], Any]:
    """An expression's (or a constant's) value shaped for a conversion mode."""
    if mode == TEXT:
        def as_text(sc: Scope) -> Any:
            v = fn(sc)
            if v is None or isinstance(v, bool):
                return v
            if isinstance(v, list):
                return [text_of(x) for x in v if not empty(x)]
            t = text_of(v)
            return t or None
        return as_text

    def as_reps(sc: Scope) -> list[Any]:
        v = fn(sc)
        if empty(v):
            return []
        values = v if isinstance(v, list) else [v]
        return [TextRep(text_of(x)) for x in values if not empty(x)]
    return as_reps


_MISSING = object()
_CACHE_SIZE = 4096


def _pipeline(mode: str, source: Callable[[Scope], Any], convert: Callable[..., Any] | None, many: bool,
              when: Getter | None, default: Any, cacheable: bool = False) -> Getter:
    """The compute function of one field: read, convert, default (one closure per shape)."""
    if mode == TEXT:
        if many:
            def text_many(sc: Scope) -> Any:
                if when is not None and empty(when(sc)):
                    return None
                got = source(sc)
                items = got if isinstance(got, list) else [] if got is None else [got]
                out = items if convert is None else [v for v in (convert(t, sc) for t in items) if v is not None]
                return out if out or default is None else [default]
            return text_many
        if convert is None and when is None and default is None:
            def text_plain(sc: Scope) -> Any:
                got = source(sc)
                return got[0] if isinstance(got, list) and got else got or None
            return text_plain

        def text_one(sc: Scope) -> Any:
            if when is not None and empty(when(sc)):
                return None
            got = source(sc)
            if isinstance(got, list):
                got = got[0] if got else None
            if got is None or got == "":
                return default
            v = got if convert is None else convert(got, sc)
            return default if v is None else v
        return text_one
    assert convert is not None
    if mode == PARTS:
        cache: dict[tuple[Any, str], Any] = {}

        def conv_cached(r: Any, sc: Scope) -> Any:
            if not cacheable:
                return convert(r.components(), r, sc)
            key = (sc.run.cache_key, r.raw)
            v = cache.get(key, _MISSING)
            if v is _MISSING:
                v = convert(r.components(), r, sc)
                if len(cache) >= _CACHE_SIZE:
                    cache.clear()
                cache[key] = v
            return v

        if many:
            def parts_many(sc: Scope) -> Any:
                if when is not None and empty(when(sc)):
                    return None
                out = []
                for r in source(sc):
                    v = conv_cached(r, sc)
                    if v is not None:
                        out.append(v)
                return out if out or default is None else [default]
            return parts_many

        def parts_one(sc: Scope) -> Any:
            if when is not None and empty(when(sc)):
                return None
            for r in source(sc):
                v = conv_cached(r, sc)
                if v is not None:
                    return v
            return default
        return parts_one

    def reps_all(sc: Scope) -> Any:
        if when is not None and empty(when(sc)):
            return None
        reps = source(sc)
        v = convert(reps, sc) if reps else None
        if many:
            return [v] if v is not None else ([default] if default is not None else [])
        return default if v is None else v
    return reps_all


def _under(rule: RuleSpec) -> tuple[str, ...]:
    if rule.under is None:
        return ()
    return (rule.under,) if isinstance(rule.under, str) else tuple(rule.under)


def _bare_paths(node: Node) -> list[Path] | None:
    """The paths of an expression that is only a path, or paths joined by ``or``."""
    if node.op == "path":
        return [node.value]
    if node.op == "or":
        left, right = _bare_paths(node.args[0]), _bare_paths(node.args[1])
        if left is not None and right is not None:
            return left + right
    return None


class RuleCtx:
    """What a rule's expressions and paths may refer to."""

    def __init__(self, for_each: str | None, under: tuple[str, ...], kind: str, model: type[BaseModel],
                 comp: Compiler) -> None:
        self.for_each = for_each
        self.under = under
        self.kind = kind
        self.model = model
        self.comp = comp
        self.available: set[str] = set()

    def kind_of(self, seg: str) -> str:
        if seg == self.for_each:
            return ITEM
        if seg in self.under:
            return PARENT
        return OTHER

    def check_path(self, path: Path, loc: Loc, col: int = 0) -> bool:
        problem = check_path(path)
        if problem:
            self.comp.problem(loc, problem, col)
            return False
        if path.segrep is not None and self.kind_of(path.seg) != OTHER:
            self.comp.problem(loc, f"{path.text}: [n] on the rule's own or parent segment has no meaning", col)
            return False
        return True


class RuleBinder(Binder):
    def __init__(self, ctx: RuleCtx, loc: Loc) -> None:
        self.ctx = ctx
        self.loc = loc

    def path(self, path: Path, col: int) -> Fn:
        problem = check_path(path)
        if problem:
            raise ExprError(problem, col)
        if path.segrep is not None and self.ctx.kind_of(path.seg) != OTHER:
            raise ExprError(f"{path.text}: [n] on the rule's own or parent segment has no meaning", col)
        return text_getter(path, self.ctx.kind_of(path.seg))

    def var(self, name: str, col: int) -> Fn:
        if name in self.ctx.model.model_fields and self.ctx.kind != "message":
            if name not in self.ctx.available:
                raise ExprError(f"{name} is not computed before this point (fields are computed in order; "
                                "the key last)", col)
            return lambda sc: _plain(sc.vals.get(name))
        if name == "channel":
            return lambda sc: sc.run.ctx.channel
        if name == "timezone":
            return lambda sc: sc.run.ctx.timezone
        if name == "control_id":
            return lambda sc: sc.run.ctx.control_id or _msh(sc, 10, 1)
        if name == "sending_facility":
            return lambda sc: sc.run.ctx.sending_facility or _msh(sc, 4, 1)
        if name == "message_type":
            def mtype(sc: Scope) -> str:
                if sc.run.ctx.message_type:
                    return sc.run.ctx.message_type
                t, e = _msh(sc, 9, 1), _msh(sc, 9, 2)
                return f"{t}^{e}" if e else t or ""
            return mtype
        fields = [f for f in self.ctx.model.model_fields if f != "key"] if self.ctx.kind != "message" else []
        known = ", ".join([*CONTEXT_VARIABLES, *fields])
        raise ExprError(f"unknown name {name!r}; known: {known} (HL7 paths look like PID-3)", col)

    def special(self, name: str, args: list[Node], col: int) -> Fn:
        ctx = self.ctx
        if name in ("exists", "count", "nth"):
            a = args[0]
            if a.op == "path" and name == "exists":
                g = self.path(a.value, a.col)
                return lambda sc: not empty(g(sc))
            if a.op != "segment":
                raise ExprError(f"{name}() takes a segment name such as NTE" +
                                (" or a path" if name == "exists" else ""), a.col)
            seg = a.value
            problem = check_segment(seg)
            if problem:
                raise ExprError(problem, a.col)
            kind = ctx.kind_of(seg)
            if name == "exists":
                if kind == ITEM:
                    return lambda sc: sc.item is not None
                if kind == PARENT:
                    return lambda sc: sc.anc.get(seg) is not None
                return lambda sc: sc.run.find(seg, sc.item, None) is not None
            if name == "count":
                if kind != OTHER:
                    return lambda sc: 1 if (sc.item if kind == ITEM else sc.anc.get(seg)) is not None else 0
                return lambda sc: len(sc.run.find_all(seg, sc.item))
            if kind == OTHER:
                raise ExprError(f"nth({seg}) needs {seg} to be the rule's for_each or under segment", a.col)

            def nth(sc: Scope) -> int | None:
                s = sc.item if kind == ITEM else sc.anc.get(seg)
                if s is None:
                    return None
                same = sc.run.by_name.get(seg, [])
                return next((i + 1 for i, x in enumerate(same) if x is s), None)
            return nth
        if name == "keyof":
            a = args[0]
            if a.op != "lit" or not isinstance(a.value, str):
                raise ExprError("keyof() takes a fact kind in quotes, e.g. keyof('report')", a.col)
            kind_name = a.value
            if kind_name not in FACT_KINDS or "key" not in FACT_KINDS[kind_name].model_fields:
                keyed = [k for k, m in FACT_KINDS.items() if "key" in m.model_fields]
                raise ExprError(f"keyof(): {kind_name!r} is not a fact kind with a key ({', '.join(keyed)})", a.col)
            if kind_name not in ctx.comp.kinds_before:
                raise ExprError(f"keyof('{kind_name}') needs a {kind_name} rule before this one (rules run in "
                                "order)", a.col)

            def keyof(sc: Scope) -> str | None:
                keys = sc.run.keys
                item = sc.item
                if item is not None:
                    k = keys.get((kind_name, item.index))
                    if k is not None:
                        return k
                for s in sc.anc.values():
                    if s is not None:
                        k = keys.get((kind_name, s.index))
                        if k is not None:
                            return k
                return keys.get((kind_name, -1))
            return keyof
        if name == "lookup":
            a = args[0]
            if a.op != "lit" or not isinstance(a.value, str):
                raise ExprError("lookup() takes a table name in quotes first, e.g. lookup('units', OBX-6.1)", a.col)
            table = a.value
            if table not in ctx.comp.tables:
                raise ExprError(f"unknown table {table!r}; tables are {', '.join(sorted(ctx.comp.tables)) or '(none)'}",
                                a.col)
            value = compile_node(args[1], self)
            dflt = compile_node(args[2], self) if len(args) > 2 else None

            def lookup(sc: Scope) -> Any:
                t = sc.run.cv.tables.get(table)
                if t is None:
                    raise Unmapped(table)
                v = value(sc)
                if empty(v):
                    return dflt(sc) if dflt is not None else None
                if dflt is not None:
                    hit = t.find(text_of(v))
                    if hit is None:
                        return dflt(sc)
                    return hit.code if isinstance(hit, F.Coding) else hit
                return t.lookup(text_of(v))
            return lookup
        if name == "matches":
            pat = args[1]
            if pat.op != "lit" or not isinstance(pat.value, str):
                raise ExprError("matches() takes a regular expression in quotes as its second argument", pat.col)
            try:
                rx = re.compile(pat.value)
            except re.error as exc:
                raise ExprError(f"bad regular expression: {exc}", pat.col) from None
            value = compile_node(args[0], self)
            return lambda sc: isinstance(v := value(sc), str) and rx.search(v) is not None
        raise ExprError(f"unknown function {name}()", col)  # pragma: no cover


def _msh(sc: Scope, field: int, comp: int) -> str | None:
    lst = sc.run.by_name.get("MSH")
    if not lst:
        return None
    v = lst[0].value(field, 1, comp, 1)
    return v.strip() if v else None
