"""Conditions and computed values in mappings: a small, safe expression language.

No Python ``eval`` and no template engine: the text is tokenised and parsed here into a tree, and
the tree is turned once (at load time) into nested Python closures, so evaluating a condition on a
message is a few function calls. Nothing in an expression can reach Python objects, files or
imports: the only names are HL7 paths, the message context variables, fields of the fact being
built, and the functions listed in ``FUNCTIONS``.

Grammar (lowest precedence first)::

    expr    := or ["if" or "else" expr]
    or      := and ("or" and)*            -- the first non-empty operand (or the last)
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := concat [("==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not in") concat]
    concat  := primary ("~" primary)*     -- string concatenation; empty values count as ""
    primary := PATH | SEGMENT | NAME | STRING | NUMBER | true | false | null
             | NAME "(" [expr ("," expr)*] ")" | "[" [expr ("," expr)*] "]" | "(" expr ")"

``PATH`` is an HL7 path (``OBX-5``, ``PID-3[2].4.1``, ``NTE[*]-3``); ``SEGMENT`` a bare segment name
(``OBR``), used as an argument of ``exists``, ``count``, ``nth``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from engine.mapping.paths import Path, PathError, parse_path

Fn = Callable[[Any], Any]


class ExprError(ValueError):
    """A problem in an expression; ``column`` is 1-based within the expression text."""

    def __init__(self, message: str, column: int = 1) -> None:
        self.column = column
        super().__init__(message)


# -- tokens ---------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<path>[A-Z][A-Z0-9]{2}(?:\[(?:\*|\d+)\])?-\d+(?:\[(?:\*|\d+)\])?(?:\.\d+){0,2})(?![A-Za-z0-9_])
  | (?P<number>\d+(?:\.\d+)?)(?![A-Za-z0-9_])
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<op>==|!=|<=|>=|<|>|~|\(|\)|,|\[|\])
    """,
    re.VERBOSE,
)
KEYWORDS = {"and", "or", "not", "in", "if", "else", "true", "false", "null", "none"}


@dataclass(slots=True)
class Tok:
    kind: str
    text: str
    col: int


def tokenize(text: str) -> list[Tok]:
    out: list[Tok] = []
    i = 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if not m:
            raise ExprError(f"unexpected character {text[i]!r}", i + 1)
        kind = m.lastgroup or ""
        if kind != "ws":
            value = m.group()
            if kind == "name" and value in KEYWORDS:
                kind = "kw"
            out.append(Tok(kind, value, i + 1))
        i = m.end()
    out.append(Tok("end", "", len(text) + 1))
    return out


# -- tree -----------------------------------------------------------------------------------------

@dataclass(slots=True)
class Node:
    op: str  # path, segment, var, lit, call, list, or, and, not, cmp, concat, ifelse
    col: int
    value: Any = None  # Path, segment name, variable name, literal, function name, comparison operator
    args: list[Node] = field(default_factory=list)

    def walk(self) -> list[Node]:
        out = [self]
        for a in self.args:
            out += a.walk()
        return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = tokenize(text)
        self.i = 0

    @property
    def tok(self) -> Tok:
        return self.toks[self.i]

    def take(self, kind: str | None = None, text: str | None = None) -> Tok | None:
        t = self.tok
        if (kind is None or t.kind == kind) and (text is None or t.text == text):
            self.i += 1
            return t
        return None

    def expect(self, kind: str, text: str, what: str) -> Tok:
        t = self.take(kind, text)
        if t is None:
            got = self.tok.text or "the end"
            raise ExprError(f"expected {what}, found {got!r}" if self.tok.text else f"expected {what} before the end",
                            self.tok.col)
        return t

    def parse(self) -> Node:
        node = self.expr()
        if self.tok.kind != "end":
            raise ExprError(f"unexpected {self.tok.text!r}", self.tok.col)
        return node

    def expr(self) -> Node:
        node = self.or_()
        t = self.take("kw", "if")
        if t:
            cond = self.or_()
            self.expect("kw", "else", "'else'")
            other = self.expr()
            return Node("ifelse", t.col, None, [cond, node, other])
        return node

    def or_(self) -> Node:
        node = self.and_()
        while (t := self.take("kw", "or")) is not None:
            node = Node("or", t.col, None, [node, self.and_()])
        return node

    def and_(self) -> Node:
        node = self.not_()
        while (t := self.take("kw", "and")) is not None:
            node = Node("and", t.col, None, [node, self.not_()])
        return node

    def not_(self) -> Node:
        t = self.take("kw", "not")
        if t:
            return Node("not", t.col, None, [self.not_()])
        return self.compare()

    def compare(self) -> Node:
        left = self.concat()
        t = self.tok
        if t.kind == "op" and t.text in ("==", "!=", "<", "<=", ">", ">="):
            self.i += 1
            return Node("cmp", t.col, t.text, [left, self.concat()])
        if t.kind == "kw" and t.text == "in":
            self.i += 1
            return Node("cmp", t.col, "in", [left, self.concat()])
        if t.kind == "kw" and t.text == "not" and self.toks[self.i + 1].text == "in":
            self.i += 2
            return Node("cmp", t.col, "not in", [left, self.concat()])
        return left

    def concat(self) -> Node:
        node = self.primary()
        if self.tok.text == "~":
            parts = [node]
            col = self.tok.col
            while self.take("op", "~"):
                parts.append(self.primary())
            return Node("concat", col, None, parts)
        return node

    def args(self, close: str) -> list[Node]:
        out: list[Node] = []
        if self.take("op", close):
            return out
        while True:
            out.append(self.expr())
            if self.take("op", close):
                return out
            self.expect("op", ",", f"',' or '{close}'")

    def primary(self) -> Node:
        t = self.tok
        self.i += 1
        if t.kind == "path":
            try:
                return Node("path", t.col, parse_path(t.text))
            except PathError as exc:
                raise ExprError(str(exc), t.col) from exc
        if t.kind == "number":
            return Node("lit", t.col, Decimal(t.text))
        if t.kind == "string":
            return Node("lit", t.col, _unquote(t.text))
        if t.kind == "kw" and t.text in ("true", "false"):
            return Node("lit", t.col, t.text == "true")
        if t.kind == "kw" and t.text in ("null", "none"):
            return Node("lit", t.col, None)
        if t.kind == "name":
            if self.take("op", "("):
                return Node("call", t.col, t.text, self.args(")"))
            if re.fullmatch(r"[A-Z][A-Z0-9]{2}", t.text):
                return Node("segment", t.col, t.text)
            return Node("var", t.col, t.text)
        if t.kind == "op" and t.text == "(":
            node = self.expr()
            self.expect("op", ")", "')'")
            return node
        if t.kind == "op" and t.text == "[":
            return Node("list", t.col, None, self.args("]"))
        if t.kind == "end":
            raise ExprError("expression is incomplete", t.col)
        raise ExprError(f"unexpected {t.text!r}", t.col)


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)), body)


def parse(text: str) -> Node:
    """Parse an expression; raises ExprError."""
    if not text or not text.strip():
        raise ExprError("expression is empty", 1)
    return _Parser(text).parse()


# -- values ---------------------------------------------------------------------------------------

def empty(v: Any) -> bool:
    return v is None or v in ("", []) or v is False


def text_of(v: Any) -> str:
    if v is None or v is False:
        return ""
    if isinstance(v, list):
        return "\n".join(text_of(x) for x in v if not empty(x))
    if v is True:
        return "true"
    return str(v)


def number(v: Any) -> Decimal | None:
    if isinstance(v, Decimal):
        return v
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return Decimal(v)
    if isinstance(v, str):
        s = v.strip()
        if not s or not (s[0].isdigit() or s[0] in "+-."):
            return None
        try:
            d = Decimal(s)
        except InvalidOperation:
            return None
        return d if d.is_finite() else None
    return None


def _eq(a: Any, b: Any) -> bool:
    if isinstance(a, Decimal) or isinstance(b, Decimal):
        na, nb = number(a), number(b)
        if na is not None and nb is not None:
            return na == nb
    if a is None or b is None:
        return empty(a) and empty(b)
    return bool(a == b)


def _order(op: str, a: Any, b: Any) -> bool:
    na, nb = number(a), number(b)
    if na is not None and nb is not None:
        x: Any = na
        y: Any = nb
    elif isinstance(a, str) and isinstance(b, str):
        x, y = a, b
    else:
        return False
    if op == "<":
        return bool(x < y)
    if op == "<=":
        return bool(x <= y)
    if op == ">":
        return bool(x > y)
    return bool(x >= y)


def _contains(container: Any, item: Any) -> bool:
    if isinstance(container, list):
        return any(_eq(item, c) for c in container)
    if isinstance(container, str):
        return isinstance(item, str) and item in container
    return False


# -- functions ------------------------------------------------------------------------------------

def _upper(x: Any) -> Any:
    return x.upper() if isinstance(x, str) else x


def _lower(x: Any) -> Any:
    return x.lower() if isinstance(x, str) else x


def _trim(x: Any) -> Any:
    return x.strip() if isinstance(x, str) else x


def _len(x: Any) -> int:
    return 0 if x is None else len(x) if isinstance(x, (str, list)) else len(text_of(x))


def _join(sep: Any, *parts: Any) -> str:
    flat: list[Any] = []
    for p in parts:
        flat.extend(p if isinstance(p, list) else [p])
    return text_of(sep).join(text_of(p) for p in flat if not empty(p))


def _coalesce(*parts: Any) -> Any:
    for p in parts:
        if not empty(p):
            return p
    return None


def _starts(x: Any, p: Any) -> bool:
    return isinstance(x, str) and x.startswith(text_of(p))


def _ends(x: Any, p: Any) -> bool:
    return isinstance(x, str) and x.endswith(text_of(p))


def _left(x: Any, n: Any) -> Any:
    k = number(n)
    return x[: int(k)] if isinstance(x, str) and k is not None else x


def _first(x: Any) -> Any:
    if isinstance(x, list):
        for v in x:
            if not empty(v):
                return v
        return None
    return x


def _replace(x: Any, old: Any, new: Any) -> Any:
    return x.replace(text_of(old), text_of(new)) if isinstance(x, str) else x


def _split(x: Any, sep: Any) -> list[str]:
    return [p for p in x.split(text_of(sep))] if isinstance(x, str) else []


FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int]] = {
    # name: (implementation, min args, max args); see docs/mappings.md
    "upper": (_upper, 1, 1),
    "lower": (_lower, 1, 1),
    "trim": (_trim, 1, 1),
    "len": (_len, 1, 1),
    "empty": (empty, 1, 1),
    "join": (_join, 1, 99),
    "coalesce": (_coalesce, 1, 99),
    "starts_with": (_starts, 2, 2),
    "ends_with": (_ends, 2, 2),
    "contains": (_contains, 2, 2),
    "left": (_left, 2, 2),
    "first": (_first, 1, 1),
    "replace": (_replace, 3, 3),
    "split": (_split, 2, 2),
    "number": (number, 1, 1),
    "text": (text_of, 1, 1),
}
# Functions that the engine binds itself (they need the message or the tables):
#   exists(PATH or SEGMENT), count(SEGMENT), nth(SEGMENT), keyof('kind'), lookup('table', value[, default]),
#   matches(value, 'regex')
SPECIAL = {"exists": (1, 1), "count": (1, 1), "nth": (1, 1), "keyof": (1, 1), "lookup": (2, 3), "matches": (2, 2)}


# -- compiling to closures ------------------------------------------------------------------------

class Binder:
    """What an expression may refer to; the mapping engine supplies the real one."""

    def path(self, path: Path, col: int) -> Fn:  # pragma: no cover - interface
        raise NotImplementedError

    def var(self, name: str, col: int) -> Fn:  # pragma: no cover - interface
        raise NotImplementedError

    def special(self, name: str, args: list[Node], col: int) -> Fn:  # pragma: no cover - interface
        raise NotImplementedError


def compile_node(node: Node, b: Binder) -> Fn:
    op = node.op
    if op == "lit":
        v = node.value
        return lambda sc: v
    if op == "path":
        return b.path(node.value, node.col)
    if op == "var":
        return b.var(node.value, node.col)
    if op == "segment":
        raise ExprError(f"a segment name ({node.value}) alone has no value; name a field, e.g. {node.value}-1, "
                        "or use exists(" + node.value + ")", node.col)
    if op == "list":
        items = [compile_node(a, b) for a in node.args]
        return lambda sc: [f(sc) for f in items]
    if op == "or":
        left, right = compile_node(node.args[0], b), compile_node(node.args[1], b)

        def _or(sc: Any) -> Any:
            v = left(sc)
            return right(sc) if empty(v) else v
        return _or
    if op == "and":
        left, right = compile_node(node.args[0], b), compile_node(node.args[1], b)

        def _and(sc: Any) -> Any:
            v = left(sc)
            return v if empty(v) else right(sc)
        return _and
    if op == "not":
        inner = compile_node(node.args[0], b)
        return lambda sc: empty(inner(sc))
    if op == "ifelse":
        cond, yes, no = (compile_node(a, b) for a in node.args)
        return lambda sc: no(sc) if empty(cond(sc)) else yes(sc)
    if op == "concat":
        parts = [compile_node(a, b) for a in node.args]
        def concat(sc: Any) -> str:
            out = []
            for f in parts:
                v = f(sc)
                if v is None or v is False:
                    continue
                out.append(v if isinstance(v, str) else text_of(v))
            return "".join(out)
        return concat
    if op == "cmp":
        left, right = compile_node(node.args[0], b), compile_node(node.args[1], b)
        cop = node.value
        if cop == "==":
            return lambda sc: _eq(left(sc), right(sc))
        if cop == "!=":
            return lambda sc: not _eq(left(sc), right(sc))
        if cop == "in":
            return lambda sc: _contains(right(sc), left(sc))
        if cop == "not in":
            return lambda sc: not _contains(right(sc), left(sc))
        return lambda sc: _order(cop, left(sc), right(sc))
    if op == "call":
        name = node.value
        if name in SPECIAL:
            lo, hi = SPECIAL[name]
            _arity(name, node, lo, hi)
            return b.special(name, node.args, node.col)
        if name not in FUNCTIONS:
            known = ", ".join(sorted([*FUNCTIONS, *SPECIAL]))
            raise ExprError(f"unknown function {name}(); known: {known}", node.col)
        impl, lo, hi = FUNCTIONS[name]
        _arity(name, node, lo, hi)
        fns = [compile_node(a, b) for a in node.args]
        if len(fns) == 1:
            f0 = fns[0]
            return lambda sc: impl(f0(sc))
        return lambda sc: impl(*(f(sc) for f in fns))
    raise ExprError(f"cannot evaluate {op}", node.col)  # pragma: no cover


def _arity(name: str, node: Node, lo: int, hi: int) -> None:
    n = len(node.args)
    if n < lo or n > hi:
        want = str(lo) if lo == hi else f"{lo} to {hi}"
        raise ExprError(f"{name}() takes {want} argument{'s' if hi > 1 else ''}, got {n}", node.col)


def paths_in(node: Node) -> list[Path]:
    return [n.value for n in node.walk() if n.op == "path"]
