"""Load ``mappings/*.yaml`` and ``mappings/tables/*.yaml|csv`` from a configuration directory,
reporting every problem as ``file:line:col: key.path: problem``."""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from engine.config.loader import _words, dotted, key_position, load_model, plain, position, read_yaml
from engine.errors import ConfigError, Problem
from engine.mapping.compiler import Compiler
from engine.mapping.convert import Table
from engine.mapping.engine import MapContext, Mapping_
from engine.mapping.model import CheckSpec, FieldSpec, MappingFile, RuleSpec, TableCoding, TableFile
from engine.record.facts import Coding


def shown_path(path: Path) -> str:
    """A path as printed in messages: relative to the working directory when below it (as
    ``engine.config.project.shown_path``, which cannot be imported here: project loads mappings)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


@dataclass(slots=True)
class MappingSet:
    """Every mapping and table of a configuration directory, compiled."""

    root: Path
    mappings: dict[str, Mapping_] = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)

    def get(self, name: str) -> Mapping_:
        """The mapping called ``name``; KeyError when there is none."""
        return self.mappings[name]

    def __contains__(self, name: object) -> bool:
        return name in self.mappings

    @property
    def names(self) -> list[str]:
        return sorted(self.mappings)

    def context(self, channel: str, timezone: str = "UTC", *, control_id: str = "", sending_facility: str = "",
                message_type: str = "") -> MapContext:
        """A MapContext carrying this set's tables."""
        return MapContext(channel, timezone, self.tables, control_id, sending_facility, message_type)


def mapping_files(root: Path) -> list[Path]:
    folder = root / "mappings"
    if not folder.is_dir():
        return []
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])


def table_files(root: Path) -> list[Path]:
    folder = root / "mappings" / "tables"
    if not folder.is_dir():
        return []
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml"), *folder.glob("*.csv")])


def load_mappings(root: Path) -> tuple[MappingSet, list[Problem]]:
    """Read and compile every mapping and table under ``root/mappings``. Mappings with problems are
    left out of the set; the problems list says why (all of them, in file order)."""
    problems: list[Problem] = []
    mset = MappingSet(root)
    for path in table_files(root):
        table, found = load_table(path)
        problems += found
        if table is None:
            continue
        if table.name in mset.tables:
            problems.append(Problem(table.file, 1, 1, "name", f"a table called {table.name!r} is also defined in "
                                                              f"{mset.tables[table.name].file}"))
            continue
        mset.tables[table.name] = table
    where: dict[str, str] = {}
    for path in mapping_files(root):
        shown = shown_path(path)
        spec, yaml, found = load_mapping_file(path, shown)
        problems += found
        if spec is None:
            continue
        name = spec.mapping or path.stem
        if name in where:
            line, col = position(yaml, ("mapping",))
            problems.append(Problem(shown, line, col, "mapping", f"a mapping called {name!r} is also defined in "
                                                                 f"{where[name]}"))
            continue
        where[name] = shown
        compiler = Compiler(spec, yaml, shown, name, mset.tables)
        mapping = compiler.compile()
        problems += compiler.problems
        if mapping is not None:
            mset.mappings[name] = mapping
    return mset, problems


_MODELS: dict[str, type[BaseModel]] = {"FieldSpec": FieldSpec, "RuleSpec": RuleSpec, "CheckSpec": CheckSpec}
_TAG = re.compile(r"^(str|bool|int|float)$|^[A-Z]|\[")


def _member_fits(tag: str, node: Any) -> bool:
    if isinstance(node, CommentedMap):
        return tag[:1].isupper()
    if isinstance(node, CommentedSeq):
        return tag.startswith("list")
    return tag in ("str", "bool", "int", "float")


def load_mapping_file(path: Path, shown: str) -> tuple[MappingFile | None, Any, list[Problem]]:
    """Like ``engine.config.loader.load_model``, but a field rule may be written several ways (a
    mapping, a list, a path, a constant): a mistake is reported once, for the way it was written,
    not once for every way it could have been."""
    root, problems = read_yaml(path, shown)
    if problems:
        return None, None, problems
    if root is None:
        root = CommentedMap()
    if not isinstance(root, CommentedMap):
        return None, root, [Problem(shown, 1, 1, "", "expected a mapping of keys at the top of the file")]
    try:
        return MappingFile.model_validate(plain(root)), root, []
    except ValidationError as exc:
        errors = exc.errors()
    out: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    unfit: dict[tuple[int | str, ...], Problem] = {}
    for err in errors:
        node: Any = root
        loc: list[int | str] = []
        fits = True
        for part in err["loc"]:
            in_map = isinstance(node, CommentedMap) and part in node
            if in_map or (isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node)):
                loc.append(part)
                node = node[part]
            elif isinstance(part, str) and _TAG.search(part):
                fits = fits and _member_fits(part, node)
            else:
                loc.append(part)
                node = None
        key = tuple(loc)
        line, col = key_position(root, key) if err["type"] == "extra_forbidden" else position(root, key)
        words = _words(dict(err), MappingFile)
        if err["type"] == "extra_forbidden" and words == "unknown key":
            owner = next((m for t in reversed(err["loc"]) if isinstance(t, str) and (m := _MODELS.get(t))), None)
            if owner is not None:
                allowed = [f.alias or n for n, f in owner.model_fields.items()]
                words = f"unknown key; expected one of {', '.join(allowed)}"
        problem = Problem(shown, line, col, dotted(key), words)
        if not fits:
            unfit.setdefault(key, Problem(shown, line, col, dotted(key),
                                          "expected a field rule: a path, an expression, a constant, a list of "
                                          "them, or a mapping of keys (path:, as:, ...)"))
            continue
        if (problem.path, problem.message) not in seen:
            seen.add((problem.path, problem.message))
            out.append(problem)
    for key, problem in unfit.items():
        if not any(p.path == dotted(key) or p.path.startswith(dotted(key) + ".") for p in out):
            out.append(problem)
    return None, root, sorted(out, key=lambda p: (p.line, p.column))


def load_mappings_or_raise(root: Path) -> MappingSet:
    """``load_mappings`` for the worker: raises ConfigError listing every problem."""
    mset, problems = load_mappings(root)
    if problems:
        raise ConfigError(problems)
    return mset


def load_table(path: Path) -> tuple[Table | None, list[Problem]]:
    shown = shown_path(path)
    if path.suffix == ".csv":
        return _load_csv(path, shown)
    spec, yaml, problems = load_model(TableFile, path, shown)
    if spec is None:
        return None, problems
    if spec.unmapped == "default" and spec.default is None:
        line, col = position(yaml, ("unmapped",))
        return None, [Problem(shown, line, col, "unmapped", "unmapped: default needs a default: value")]
    entries: dict[str, str | Coding] = {}
    for k, v in spec.values.items():
        if isinstance(v, TableCoding):
            entries[k] = Coding.model_construct(code=v.code, system=v.system, display=v.display)
        else:
            entries[k] = str(v)
    return Table(spec.name or path.stem, entries, spec.unmapped, spec.default, spec.case_sensitive, shown), []


_CSV_SETTINGS = ("unmapped", "default", "case_sensitive", "name", "description")


def _load_csv(path: Path, shown: str) -> tuple[Table | None, list[Problem]]:
    """CSV tables: optional ``# key: value`` settings lines first (unmapped, default,
    case_sensitive), then a header with ``code`` and ``value`` (or ``code``, ``system``,
    ``display`` for a coding: then ``value`` is the target code)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(shown, 1, 1, "", f"cannot read file: {exc}")]
    settings: dict[str, str] = {}
    problems: list[Problem] = []
    lines = text.splitlines()
    body_start = 0
    for i, line in enumerate(lines):
        s = line.strip()
        if not s:
            continue
        if not s.startswith("#"):
            body_start = i
            break
        key, sep, value = s.lstrip("#").partition(":")
        key = key.strip()
        if sep and key in _CSV_SETTINGS:
            settings[key] = value.strip()
        elif sep and key and " " not in key:
            problems.append(Problem(shown, i + 1, 1, key,
                                    f"unknown setting; expected one of {', '.join(_CSV_SETTINGS)}"))
    else:
        body_start = len(lines)
    unmapped = settings.get("unmapped", "pass")
    if unmapped not in ("pass", "fail", "empty", "default"):
        problems.append(Problem(shown, 1, 1, "unmapped",
                                f"expected one of pass, fail, empty, default, got {unmapped!r}"))
    if unmapped == "default" and "default" not in settings:
        problems.append(Problem(shown, 1, 1, "unmapped", "unmapped: default needs a default: value"))
    reader = csv.reader(io.StringIO("\n".join(lines[body_start:])))
    rows = list(reader)
    if not rows:
        problems.append(Problem(shown, body_start + 1, 1, "", "no header line (expected code,value)"))
        return None, problems
    head = [h.strip().lower() for h in rows[0]]
    if "code" not in head or "value" not in head:
        problems.append(Problem(shown, body_start + 1, 1, "", "the header must name the columns code and value "
                                                              "(and optionally system, display)"))
        return None, problems
    ci, vi = head.index("code"), head.index("value")
    si = head.index("system") if "system" in head else None
    di = head.index("display") if "display" in head else None
    entries: dict[str, str | Coding] = {}
    for n, row in enumerate(rows[1:], start=body_start + 2):
        if not row or not any(x.strip() for x in row):
            continue
        if len(row) <= max(ci, vi):
            problems.append(Problem(shown, n, 1, "", f"expected {len(head)} columns, got {len(row)}"))
            continue
        code, value = row[ci].strip(), row[vi].strip()
        if code in entries:
            problems.append(Problem(shown, n, 1, "", "this code is already in the table"))
            continue
        system = row[si].strip() if si is not None and si < len(row) else ""
        display = row[di].strip() if di is not None and di < len(row) else ""
        entries[code] = Coding.model_construct(code=value, system=system or None, display=display or None) \
            if (system or display) else value
    if problems:
        return None, problems
    case = settings.get("case_sensitive", "true").lower() not in ("false", "no", "0")
    return Table(settings.get("name") or path.stem, entries, unmapped, settings.get("default"), case, shown), []
