"""The compiled build's bookkeeping (engine/accel.py). The compiled build itself is tested by .ci/run:
it builds the modules with mypyc in place and runs the suite (all but the tests marked
``interpreted``) against them."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import accel

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def test_every_listed_module_exists_and_none_defines_a_pydantic_model() -> None:
    assert len(set(accel.MODULES)) == len(accel.MODULES)
    for path in accel.MODULES:
        source = ROOT / path
        assert source.is_file(), path
        text = source.read_text(encoding="utf-8")
        # mypyc cannot compile a pydantic model (the build fails in C); they stay interpreted
        assert "(BaseModel)" not in text and "(BaseSettings)" not in text, path


def test_describe_says_what_actually_imports() -> None:
    done = accel.compiled()
    assert len(done) in (0, len(accel.MODULES)), f"a partial build: {done}"
    for path in accel.MODULES:
        module = importlib.import_module(accel.module_name(path))
        assert str(module.__file__).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)) == bool(done), path
    if done:
        assert accel.describe().startswith(f"compiled ({len(done)} of {len(done)} modules)")
    else:
        assert accel.describe() == "pure Python"


@pytest.fixture
def fake_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A checkout with one module "compiled": an extension file beside its source (never loaded)."""
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    (tmp_path / "pyproject.toml").write_text("", encoding="utf-8")
    (pkg / "mod.py").write_text("X = 1\n", encoding="utf-8")
    (pkg / "plain.py").write_text("X = 1\n", encoding="utf-8")
    (pkg / f"mod{SUFFIX}").write_bytes(b"not loaded")
    old = os.stat(pkg / "mod.py").st_mtime - 100
    os.utime(pkg / "mod.py", (old, old))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(accel, "ROOT", tmp_path)
    monkeypatch.setattr(accel, "MODULES", ("fakepkg/mod.py", "fakepkg/plain.py"))
    yield pkg
    sys.modules.pop("fakepkg", None)


def edited(pkg: Path) -> None:
    """The source changes after the extension was built (dated explicitly: clock ticks are coarse)."""
    later = os.stat(pkg / f"mod{SUFFIX}").st_mtime + 10
    os.utime(pkg / "mod.py", (later, later))


def test_a_source_edited_after_the_build_is_reported(fake_build: Path) -> None:
    assert accel.compiled() == ["fakepkg.mod"]
    assert accel.stale() == []
    assert accel.describe() == "compiled (1 of 2 modules)"
    edited(fake_build)
    assert accel.stale() == ["fakepkg.mod"]
    assert accel.describe() == "compiled (1 of 2 modules), 1 older than their source"

    warnings: list[tuple[str, dict[str, Any]]] = []

    class Log:
        def warning(self, event: str, **kw: Any) -> None:
            warnings.append((event, kw))

    assert accel.report(Log()).startswith("compiled (1 of 2")
    assert warnings == [("compiled module is older than its source: the old code runs",
                         {"module": "fakepkg.mod", "fix": "python -m engine.accel build (or clean)"})]


def test_a_rebuild_that_kept_a_modules_shim_is_not_stale(fake_build: Path) -> None:
    """The compiled code is in the shared library; an in-place rebuild writes it anew but may keep a
    module's unchanged shim with its old date: the source is older than the build then."""
    shared = fake_build.parent / "engine" / f"{accel.SHARED_LIBRARY}{SUFFIX}"
    shared.parent.mkdir()
    shared.write_bytes(b"not loaded")
    edited(fake_build)
    later = os.stat(fake_build / "mod.py").st_mtime + 10
    os.utime(shared, (later, later))
    assert accel.stale() == []
    os.utime(fake_build / "mod.py", (later + 10, later + 10))
    assert accel.stale() == ["fakepkg.mod"], "edited after the rebuild"


def test_an_installed_build_is_never_called_stale(fake_build: Path) -> None:
    """Installed, the sources beside the extensions carry install-time dates: nothing to compare."""
    (fake_build.parent / "pyproject.toml").unlink()
    edited(fake_build)
    assert accel.stale() == []


def test_status_and_clean(fake_build: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edited(fake_build)
    assert accel.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "fakepkg.mod: the source is newer than its compiled module" in out
    root = fake_build.parent
    # clean removes every extension in the package: the shared library, and one of a module that
    # an older build compiled and the list no longer names (left behind, it would fail to import)
    shared = root / "engine" / f"native__mypyc{SUFFIX}"
    older = root / "engine" / "hl7" / f"header{SUFFIX}"
    older.parent.mkdir(parents=True)
    for p in (shared, older):
        p.write_bytes(b"")
    (root / "engine" / "hl7" / "header.py").write_text("", encoding="utf-8")
    assert accel.main(["clean"]) == 0
    assert not shared.exists() and not older.exists()
    assert (root / "engine" / "hl7" / "header.py").exists()
    # fakepkg is not in engine/: clean leaves its extension, and says so
    assert capsys.readouterr().out.strip().startswith("compiled (1 of 2 modules)")
    assert accel.main(["bogus"]) == 2


def test_a_failed_build_shows_mypys_errors_and_how_to_rerun_it(fake_build: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple[list[str], dict[str, Any]]] = []

    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append((argv, kw))
        return subprocess.CompletedProcess(argv, 1, stdout="engine/x.py:3: error: Incompatible types\n")

    monkeypatch.setattr(accel.subprocess, "run", run)
    assert accel.main(["build"]) == 1
    (argv, kw), = calls
    assert argv[1:] == ["setup.py", "build_ext", "--inplace"] and kw["env"]["HL7ENGINE_COMPILE"] == "1"
    assert kw["cwd"] == fake_build.parent
    out, err = capsys.readouterr()
    assert "engine/x.py:3: error: Incompatible types" in out
    assert "HL7ENGINE_COMPILE=1" in err and "setup.py build_ext --inplace" in err


def test_a_build_that_recompiled_nothing_is_not_stale(fake_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mypyc does not recompile a module whose content is unchanged (a file restored after an
    experiment, a branch checked out again), and setuptools copies the old extension with its old
    date: the build itself must date what it leaves, or the engine would warn that old code runs."""
    shared = fake_build.parent / "engine" / f"{accel.SHARED_LIBRARY}{SUFFIX}"
    shared.parent.mkdir()

    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        # the shim and the shared library, copied from build/ with the time of an earlier compilation
        old = os.stat(fake_build / "mod.py").st_mtime - 50
        for p in (fake_build / f"mod{SUFFIX}", shared):
            p.write_bytes(b"not loaded")
            os.utime(p, (old, old))
        assert accel.stale() == ["fakepkg.mod"]
        return subprocess.CompletedProcess(argv, 0, stdout="")

    monkeypatch.setattr(accel.subprocess, "run", run)
    assert accel.main(["build"]) == 0
    assert accel.stale() == []
