"""``hl7engine diff OLD [NEW]``: what a configuration change does, key by key, before it is deployed.

Both directories are loaded and checked as ``hl7engine check`` does; then channels are compared by
name on their effective settings (defaults included, so a key removed from the YAML shows the
default it falls back to), routes by name (and their order, which decides the match), and
mappings and lookup tables by file, on their YAML content. Every difference is one line::

    channels/lab.yaml: ack.mode: 'original' -> 'enhanced'
    routes.yaml: routes[lab-results].destinations[lis-archive]: added {"type": "mllp", ...}
    mappings/tables/units.yaml: entries.mg/dL: added 'mg/dL'
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.loader import plain, read_yaml
from engine.config.project import Project
from engine.config.routes import routes_file

MISSING = object()
FILE = object()  # a whole file added or removed
CONTENT = object()  # a file that is not YAML (a fixture message, a table as TSV) whose bytes changed
KEYS = ("name", "id", "fact", "type", "path")  # list items are matched by the first of these they have


@dataclass(frozen=True, slots=True)
class Change:
    file: str
    path: str
    old: Any
    new: Any

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        if self.new is CONTENT:
            return f"{where}: changed"
        if FILE in (self.old, self.new):
            return f"{where}: {'added' if self.old is MISSING else 'removed'}"
        if self.old is MISSING:
            return f"{where}: added {_show(self.new)}"
        if self.new is MISSING:
            return f"{where}: removed (was {_show(self.old)})"
        return f"{where}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any, limit: int = 400) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _keyed(items: list[Any]) -> dict[str, Any] | None:
    """A list of mappings each with a distinct key (the first of KEYS it has), keyed by it; else None."""
    names = []
    for i in items:
        key = next((i[k] for k in KEYS if isinstance(i, dict) and isinstance(i.get(k), str)), None)
        if key is None:
            return None
        names.append(key)
    if not items or len(set(names)) != len(names):
        return None
    return dict(zip(names, items, strict=True))


def changes(old: Any, new: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(dotted path, old, new)`` for every difference between two plain values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*old, *(k for k in new if k not in old)]:
            sub = f"{path}.{k}" if path else str(k)
            yield from changes(old.get(k, MISSING), new.get(k, MISSING), sub)
        return
    if isinstance(old, list) and isinstance(new, list) and old != new:
        a, b = _keyed(old), _keyed(new)
        if a is not None and b is not None:
            for k in [*a, *(k for k in b if k not in a)]:
                yield from changes(a.get(k, MISSING), b.get(k, MISSING), f"{path}[{k}]")
            if [k for k in a if k in b] != [k for k in b if k in a]:
                yield f"{path} (order)", [k for k in a if k in b], [k for k in b if k in a]
            return
        if all(not isinstance(v, (dict, list)) for v in [*old, *new]):
            yield path, old, new  # a list of scalars reads best whole
            return
        for i in range(max(len(old), len(new))):
            yield from changes(old[i] if i < len(old) else MISSING, new[i] if i < len(new) else MISSING,
                               f"{path}[{i}]")
        return
    if old != new:
        yield path, old, new


def _mapping_files(root: Path) -> dict[str, Any]:
    """Mappings, their tables and fixture tests by their path under ``root``: YAML as plain data,
    other files (fixture messages, TSV tables) as bytes."""
    out: dict[str, Any] = {}
    folder = root / "mappings"
    if folder.is_dir():
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            rel = path.relative_to(root).as_posix()
            if path.suffix in (".yaml", ".yml"):
                data, _ = read_yaml(path, rel)
                out[rel] = plain(data)
            else:
                out[rel] = path.read_bytes()
    return out


def diff_projects(old: Project, new: Project) -> list[Change]:
    out: list[Change] = []
    a = {c.name: c for c in old.channels}
    b = {c.name: c for c in new.channels}
    for name in [*a, *(n for n in b if n not in a)]:
        before, after = a.get(name), b.get(name)
        file = _rel(after.file, new.root) if after is not None else _rel(before.file, old.root)  # type: ignore[union-attr]
        if before is None or after is None:
            cfg = (after or before).config  # type: ignore[union-attr]
            summary = {"channel": name, "port": cfg.listen.port, "enabled": cfg.enabled}
            out.append(Change(file, "", MISSING if before is None else summary, summary if before is None else MISSING))
            continue
        if _rel(before.file, old.root) != file:
            out.append(Change(file, "file", _rel(before.file, old.root), file))
        out += [Change(file, p, o, n) for p, o, n in changes(_dump(before.config, relative_to=old.root),
                                                             _dump(after.config, relative_to=new.root))]
    routes = routes_file(new.root) or routes_file(old.root)
    shown = routes.name if routes is not None else "routes.yaml"
    out += [Change(shown, p, o, n) for p, o, n in
            changes(_dump(old.routes, relative_to=old.root), _dump(new.routes, relative_to=new.root))]
    fa, fb = _mapping_files(old.root), _mapping_files(new.root)
    for rel in [*fa, *(r for r in fb if r not in fa)]:
        if rel not in fa or rel not in fb:
            out.append(Change(rel, "", MISSING if rel not in fa else FILE, FILE if rel not in fa else MISSING))
        elif isinstance(fa[rel], bytes) or isinstance(fb[rel], bytes):
            if fa[rel] != fb[rel]:
                out.append(Change(rel, "", FILE, CONTENT))
        else:
            out += [Change(rel, p, o, n) for p, o, n in changes(fa[rel], fb[rel])]
    return out


def _rel(shown: str, root: Path) -> str:
    """A file as shown in messages (relative to the working directory, or absolute), relative to its
    configuration directory."""
    path = Path(shown)
    path = path if path.is_absolute() else Path.cwd() / path
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return shown


def _dump(model: Any, relative_to: Path | None = None) -> Any:
    """A config model as plain data; paths under its directory written relative to it, as in YAML."""
    data = model.model_dump(mode="json")
    if relative_to is None:
        return data
    prefix = str(relative_to).rstrip("/") + "/"

    def rel(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: rel(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rel(x) for x in v]
        return v[len(prefix):] if isinstance(v, str) and v.startswith(prefix) else v

    return rel(data)
