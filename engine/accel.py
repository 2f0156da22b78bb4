"""The compiled build: the engine's hot modules compiled to C extensions with mypyc.

The same source runs either way; compiled, a worker spends about 30% less CPU per message
(bench/results/e2e.md). The plain install (``pip install .``, ``pip install -e .``) is pure Python.
A compiled one is built on purpose:

    pip install mypy setuptools wheel . && \
    HL7ENGINE_COMPILE=1 pip install --no-build-isolation --no-deps --force-reinstall .
                                                                 # a deployment (the Dockerfile does this)
    python -m engine.accel build                                 # in place, in a checkout (for benchmarks)
    python -m engine.accel status                                # which modules run compiled
    python -m engine.accel clean                                 # back to pure Python

Both need mypy (which brings mypyc), a C compiler and the engine's dependencies installed (mypyc
type-checks the modules against them, with pyproject.toml's mypy settings). In a checkout, the
extensions sit beside the ``.py`` files and Python imports them first: a source file edited after
``build`` is *not* what runs until the next ``build`` or ``clean``. ``stale()`` finds that case,
and the engine logs it at start.

This module is read by setup.py before the engine is installed: standard library only.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# The modules compiled, as paths from the project root: what a worker runs for every message (parse,
# route, map, write the record), chosen by profile. Not here: the receiving path (compiled, it
# measured no faster: its time goes to the event loop, sockets and SQLite), pydantic models (mypyc
# cannot compile them), and code that waits on I/O more than it computes (engine/store/keys.py,
# for one, spends its time in the database; compiled, its loops over result rows also failed
# mypyc's checks, as SQLAlchemy types a Row as a tuple: annotate such rows as Any in a listed module).
MODULES: tuple[str, ...] = (
    "engine/hl7/message.py",
    "engine/mapping/engine.py",
    "engine/mapping/compiler.py",
    "engine/mapping/convert.py",
    "engine/mapping/expr.py",
    "engine/mapping/segments.py",
    "engine/mapping/paths.py",
    "engine/record/writer.py",
    "engine/record/datatypes.py",
    "engine/store/bulk.py",
    "engine/worker/router.py",
    "engine/worker/processor.py",
)

ROOT = Path(__file__).resolve().parent.parent
# setup.py's mypyc group: all compiled code in one shared library, engine/native__mypyc.*
GROUP_NAME = "engine.native"
SHARED_LIBRARY = GROUP_NAME.rpartition(".")[2] + "__mypyc"
_EXTENSIONS = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def _extensions() -> dict[str, tuple[Path, Path]]:
    """Each module of MODULES that Python finds as a compiled extension: name -> (the extension,
    its source). ``find_spec`` imports the parent packages, which may import the modules."""
    out = {}
    for path in MODULES:
        spec = importlib.util.find_spec(module_name(path))
        if spec is not None and spec.origin is not None and spec.origin.endswith(_EXTENSIONS):
            origin = Path(spec.origin)
            out[module_name(path)] = (origin, origin.parent / Path(path).name)
    return out


def compiled() -> list[str]:
    """The modules of MODULES that Python finds as compiled extensions."""
    return list(_extensions())


def stale(found: dict[str, tuple[Path, Path]] | None = None) -> list[str]:
    """In a checkout (``python -m engine.accel build``), the compiled modules whose source file is
    newer than the extension that shadows it. An installed build keeps its sources beside the
    extensions with install-time dates, so there is nothing to compare there."""
    if not (ROOT / "pyproject.toml").is_file():
        return []
    # a module's own extension is a small shim into the build's shared library, which holds the
    # compiled code: a rebuild after an edit writes the library anew, but an in-place build keeps
    # an unchanged shim's old date (setuptools copies it from build/ with its time)
    shared = [p.stat().st_mtime for p in (ROOT / "engine").glob(f"{SHARED_LIBRARY}*") if p.name.endswith(_EXTENSIONS)]
    built_shared = max(shared, default=0.0)
    out = []
    for name, (extension, source) in (_extensions() if found is None else found).items():
        try:
            if source.stat().st_mtime > max(extension.stat().st_mtime, built_shared):
                out.append(name)
        except OSError:
            continue
    return out


def _describe(found: dict[str, tuple[Path, Path]], old: list[str]) -> str:
    if not found:
        return "pure Python"
    text = f"compiled ({len(found)} of {len(MODULES)} modules)"
    return text + (f", {len(old)} older than their source" if old else "")


def describe() -> str:
    """One line for logs and benchmark reports: "compiled (12 of 12 modules)" or "pure Python"."""
    found = _extensions()
    return _describe(found, stale(found))


def report(log: Any) -> str:
    """Warn (on a structlog logger) about each stale compiled module; return ``describe()`` for the
    caller's start line."""
    found = _extensions()
    old = stale(found)
    for name in old:
        log.warning("compiled module is older than its source: the old code runs", module=name,
                    fix="python -m engine.accel build (or clean)")
    return _describe(found, old)


def _artifacts() -> list[Path]:
    """Every compiled extension in the checkout's package (the engine has no others): beside each
    module, and the build's shared library (engine/native__mypyc.*). All of them, also of modules a
    later list leaves out, so that no extension of an older build is left to fail at import."""
    return [p for p in (ROOT / "engine").rglob("*") if p.name.endswith(_EXTENSIONS)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "status"
    if command == "status":
        found = _extensions()
        old = stale(found)
        print(_describe(found, old))
        for name in old:
            print(f"  {name}: the source is newer than its compiled module; run `python -m engine.accel build`")
        return 0
    if command == "clean":
        for p in _artifacts():
            p.unlink()
        print(describe())
        return 0
    if command == "build":
        for p in _artifacts():  # never mix extensions of two builds
            p.unlink()
        argv = [sys.executable, "setup.py", "build_ext", "--inplace"]
        done = subprocess.run(argv, cwd=ROOT, env=dict(os.environ, HL7ENGINE_COMPILE="1"),
                              stdout=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:  # mypy's errors come on stdout, the compiler's on stderr
            print(done.stdout, end="")
            print("the compiled build failed (it needs mypy, a C compiler and the Python headers); its errors "
                  f"are above. To run it by hand:\n  cd {ROOT} && HL7ENGINE_COMPILE=1 {' '.join(argv)}",
                  file=sys.stderr)
            return done.returncode
        # the extensions now hold the sources as they are; setuptools copies them from build/ with
        # the date of the last compilation, which mypyc skips for a module whose content did not
        # change (a file restored or checked out again): date them now, or stale() would say they
        # are older than their source
        for p in _artifacts():
            os.utime(p)
        print(describe())
        return 0
    print("usage: python -m engine.accel [status|build|clean]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
