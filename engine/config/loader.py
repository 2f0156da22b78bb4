"""Load YAML with line numbers (ruamel.yaml) and validate it with pydantic, reporting every problem
as ``file:line:col: key.path: message`` in words a hospital integration engineer can act on."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from engine.errors import Problem

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: Path, shown: str) -> tuple[Any, list[Problem]]:
    """Parse ``path`` keeping positions. ``shown`` is the name used in messages (relative path)."""
    yaml = YAML(typ="rt")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(shown, 1, 1, "", f"cannot read file: {exc}")]
    try:
        return yaml.load(text), []
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = exc.problem or str(exc)
        return None, [Problem(shown, line, col, "", f"invalid YAML: {what}")]
    except YAMLError as exc:
        return None, [Problem(shown, 1, 1, "", f"invalid YAML: {exc}")]


def position(root: Any, loc: tuple[int | str, ...]) -> tuple[int, int]:
    """1-based line and column of the YAML node at ``loc`` (or of the nearest existing parent)."""
    node = root
    line, col = (node.lc.line + 1, node.lc.col + 1) if hasattr(node, "lc") else (1, 1)
    for key in loc:
        if isinstance(node, CommentedMap) and key in node:
            kl, kc = node.lc.key(key)
            vl, vc = node.lc.value(key)
            child = node[key]
            # an empty value has no position of its own (ruamel gives the next token's): use the key's
            scalar = child is not None and not isinstance(child, (CommentedMap, CommentedSeq))
            line, col = (vl + 1, vc + 1) if scalar else (kl + 1, kc + 1)
            node = child
        elif isinstance(node, CommentedSeq) and isinstance(key, int) and 0 <= key < len(node):
            il, ic = node.lc.item(key)
            line, col = il + 1, ic + 1
            node = node[key]
        else:
            break
    return line, col


def key_position(root: Any, loc: tuple[int | str, ...]) -> tuple[int, int]:
    """Position of the *key* at the end of ``loc`` (for unknown keys)."""
    node = root
    for key in loc[:-1]:
        if isinstance(node, (CommentedMap, CommentedSeq)):
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                return position(root, loc[:-1])
    last = loc[-1] if loc else None
    if isinstance(node, CommentedMap) and last in node:
        kl, kc = node.lc.key(last)
        return kl + 1, kc + 1
    return position(root, loc)


def plain(node: Any) -> Any:
    """ruamel's round-trip containers and scalars as plain Python values."""
    if isinstance(node, CommentedMap):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, CommentedSeq):
        return [plain(v) for v in node]
    if isinstance(node, bool) or node is None:
        return node
    for t in (int, float, str):
        if isinstance(node, t):
            return t(node)
    return node


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that owns the mapping at ``loc`` (for listing allowed keys). ``loc`` is
    pydantic's, with the tag of a tagged union (``destinations.0.mllp.to``) where one was chosen."""
    current: Any = model
    for key in loc:
        if isinstance(key, int):
            continue
        members = _models(current)
        tagged = [m for m in members if _tag(m) == key]
        if len(members) > 1 and tagged:
            current = tagged[0]
            continue
        if not members:
            return None
        field = members[0].model_fields.get(key)
        if field is None:
            return None
        current = field.annotation
    found = _models(current)
    return found[0] if len(found) == 1 else None


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The model classes an annotation holds (through Optional, list, dict, Annotated, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, dict, typing.Annotated):
        return [m for arg in typing.get_args(annotation) for m in _models(arg)]
    return []


def _tag(model: type[BaseModel]) -> object:
    field = model.model_fields.get("type")
    args = typing.get_args(field.annotation) if field is not None else ()
    return args[0] if len(args) == 1 else None


def _yaml_loc(root: Any, loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """``loc`` without the tag pydantic adds for a tagged union's member (``type: mllp`` -> "mllp")."""
    out: list[int | str] = []
    node = root
    for key in loc:
        if isinstance(node, CommentedMap) and isinstance(key, str) and key not in node and node.get("type") == key:
            continue
        out.append(key)
        try:
            node = node[key] if isinstance(node, (CommentedMap, CommentedSeq)) else None
        except (KeyError, IndexError, TypeError):
            node = None
    return tuple(out)


def _words(err: dict[str, Any], model: type[BaseModel]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return f"expected one of {', '.join(options)}, got {got!r}"
    if kind == "union_tag_invalid":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
        return f"unknown type {ctx.get('tag')!r}; expected one of {', '.join(options)}"
    if kind == "union_tag_not_found":
        return f"needs a {str(ctx.get('discriminator', 'type')).strip(chr(39))!r} key"
    if kind == "extra_forbidden":
        owner = _model_at(model, tuple(err["loc"][:-1]))
        allowed = ", ".join(owner.model_fields) if owner else ""
        return f"unknown key; expected one of {allowed}" if allowed else "unknown key"
    if kind == "missing":
        return "required key is missing"
    if got is None and kind not in ("none_required",):
        return "needs a value"
    if kind in ("path_type",):
        return f"expected a file path, got {got!r}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected a whole number, got {got!r}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {got!r}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {got!r}"
    if kind in ("string_type",):
        return f"expected text, got {got!r}" + (" (put it in quotes)" if isinstance(got, (int, float)) else "")
    if kind in ("list_type",):
        return f"expected a list, got {got!r}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a mapping of keys, got {got!r}"
    if kind == "string_pattern_mismatch":
        return f"{got!r} does not match {ctx.get('pattern')}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = next(iter(ctx.values()), "")
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        return f"expected a value {op} {bound}, got {got!r}"
    msg = str(err.get("msg", ""))
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    """A pydantic error of ``model`` in words that name what was wrong and what is expected."""
    return _words(err, model)


def dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validate(model: type[M], root: Any, shown: str) -> tuple[M | None, list[Problem]]:
    """Validate parsed YAML against ``model``; problems carry positions in the YAML file."""
    if root is None:
        root = CommentedMap()
    if not isinstance(root, CommentedMap):
        return None, [Problem(shown, 1, 1, "", "expected a mapping of keys at the top of the file")]
    try:
        return model.model_validate(plain(root)), []
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            # pydantic appends the type tried for union/tagged members; keep the YAML path only
            loc = tuple(p for p in loc if isinstance(p, int) or not str(p).startswith(("function-", "lax-")))
            err["loc"] = loc  # with a tagged union's tag, for the allowed keys of the member chosen
            loc = _yaml_loc(root, loc)
            line, col = key_position(root, loc) if err["type"] == "extra_forbidden" else position(root, loc)
            problems.append(Problem(shown, line, col, dotted(loc), _words(dict(err), model)))
        return None, problems


def load_model(model: type[M], path: Path, shown: str) -> tuple[M | None, Any, list[Problem]]:
    root, problems = read_yaml(path, shown)
    if problems:
        return None, None, problems
    obj, problems = validate(model, root, shown)
    return obj, root, problems
