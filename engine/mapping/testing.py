"""Fixture tests for mappings: one message in, the expected facts out (``hl7engine test``).

A fixture is a YAML file under ``mappings/tests/`` (any depth)::

    mapping: oru_r01                 # which mapping to apply
    message_file: lab-1.hl7          # raw bytes beside this file (or message: inline, one segment a line)
    charset: windows-1251            # the channel's charset, used when MSH-18 is empty
    timezone: Europe/Minsk           # the channel's timezone
    expect:                          # MappedMessage as JSON (model_dump(mode="json", exclude_defaults=True))
      patient: ...
    # or, for a message that must be refused: expect_error: "observations[0].code"

``run_tests(root, paths)`` runs them and ``format_results`` prints a readable unified diff for each
one that fails. ``run_tests(..., update=True)`` writes what the mapping produces into ``expect:``
(review the diff before committing it).
"""

from __future__ import annotations

import difflib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML

from engine.config.loader import load_model
from engine.errors import HL7Error
from engine.hl7.charsets import decode, python_codec
from engine.hl7.header import message_start, read_header
from engine.mapping.errors import MappingError
from engine.mapping.loader import MappingSet, load_mappings, shown_path
from engine.mapping.model import FixtureFile
from engine.record.facts import MappedMessage
from engine.record.writer import sorted_data


@dataclass(slots=True)
class TestResult:
    """The outcome of one fixture test. ``detail`` is the diff or the error, empty when it passed."""

    __test__ = False  # not a pytest test class

    file: str
    mapping: str
    passed: bool
    detail: str = ""
    updated: bool = False


def fixture_files(root: Path, paths: Sequence[Path] | None = None) -> list[Path]:
    """The fixture files named by ``paths`` (files, or folders searched recursively); all of
    ``root/mappings/tests`` when None or empty."""
    targets = list(paths) if paths else [root / "mappings" / "tests"]
    out: list[Path] = []
    for p in targets:
        if p.is_dir():
            out += sorted([*p.rglob("*.yaml"), *p.rglob("*.yml")])
        elif p.exists():
            out.append(p)
    return out


def run_tests(root: Path, paths: Sequence[Path] | None = None, *, update: bool = False,
              mappings: MappingSet | None = None) -> list[TestResult]:
    """Run the fixture tests under ``root/mappings/tests`` (or the given files and folders).

    A path that does not exist gives a failing result (so a typo is not a silent pass). When the
    mappings themselves have problems, the first result lists them."""
    results: list[TestResult] = []
    if mappings is None:
        mappings, problems = load_mappings(root)
        if problems:
            results.append(TestResult("mappings/", "", False,
                                      "the mappings have problems (run hl7engine check):\n" +
                                      "\n".join(f"  {p}" for p in problems)))
    for p in paths or ():
        if not p.exists():
            results.append(TestResult(shown_path(p), "", False, "no such file or folder"))
    for path in fixture_files(root, paths):
        results.append(run_one(path, mappings, update=update))
    return results


def _message_bytes(fx: FixtureFile, path: Path) -> bytes:
    if fx.message_file is not None:
        return (path.parent / fx.message_file).read_bytes()
    assert fx.message is not None
    lines = [ln for ln in fx.message.replace("\r\n", "\n").replace("\r", "\n").split("\n") if ln.strip()]
    return ("\r".join(lines) + "\r").encode("utf-8")


def decode_message(raw: bytes, charset: str) -> tuple[str, Any]:
    """Decode a message as the engine does: MSH-18 when it names a known charset, else the
    channel's; returns the text (from MSH on, segments ending in CR) and the header."""
    header = read_header(raw, python_codec(charset))
    text = decode(raw[message_start(raw):], header.codec)
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    return text, header


def run_one(path: Path, mappings: MappingSet, *, update: bool = False) -> TestResult:
    shown = shown_path(path)
    fx, _, problems = load_model(FixtureFile, path, shown)
    if fx is None:
        return TestResult(shown, "", False, "\n".join(str(p) for p in problems))
    if (fx.message is None) == (fx.message_file is None):
        return TestResult(shown, fx.mapping, False, "give exactly one of message: or message_file:")
    if (fx.expect is None) == (fx.expect_error is None) and not update:
        return TestResult(shown, fx.mapping, False, "give exactly one of expect: or expect_error:")
    if fx.mapping not in mappings:
        known = ", ".join(mappings.names) or "(none loaded)"
        return TestResult(shown, fx.mapping, False, f"no mapping called {fx.mapping!r}; mappings: {known}")
    mapping = mappings.get(fx.mapping)
    try:
        raw = _message_bytes(fx, path)
        text, header = decode_message(raw, fx.charset)
    except (OSError, LookupError, HL7Error) as exc:
        return TestResult(shown, fx.mapping, False, f"cannot read the message: {exc}")
    label = header.type_label
    if mapping.messages and label not in mapping.messages and header.message_type not in mapping.messages:
        return TestResult(shown, fx.mapping, False, f"mapping {fx.mapping} is written for "
                                                    f"{', '.join(mapping.messages)}; the message is {label}")
    from engine.hl7.message import Message

    msg = Message.parse(text)
    ctx = mappings.context(fx.channel, fx.timezone, control_id=header.control_id,
                           sending_facility=header.sending_facility, message_type=label)
    try:
        out = mapping.apply(msg, ctx)
    except MappingError as exc:
        if fx.expect_error is not None and fx.expect_error in str(exc):
            return TestResult(shown, fx.mapping, True)
        want = f"expected: {fx.expect_error}\n" if fx.expect_error else ""
        return TestResult(shown, fx.mapping, False, f"{want}the mapping failed: {exc}")
    actual = out.model_dump(mode="json", exclude_defaults=True)
    if update:
        _write_expect(path, actual)
        return TestResult(shown, fx.mapping, True, updated=True)
    if fx.expect_error is not None:
        return TestResult(shown, fx.mapping, False, f"expected the mapping to fail with {fx.expect_error!r}, "
                                                    "but it produced facts")
    try:
        expected = MappedMessage.model_validate(fx.expect).model_dump(mode="json", exclude_defaults=True)
    except ValidationError as exc:
        lines = [f"  expect.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return TestResult(shown, fx.mapping, False, "expect: is not valid facts:\n" + "\n".join(lines))
    if expected == actual:
        return TestResult(shown, fx.mapping, True)
    return TestResult(shown, fx.mapping, False, diff(expected, actual))


def _yaml_text(data: Any) -> list[str]:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.allow_unicode = True
    yaml.width = 4096
    buf = io.StringIO()
    yaml.dump(sorted_data(data), buf)
    return buf.getvalue().splitlines(keepends=True)


def diff(expected: Any, actual: Any) -> str:
    """A unified diff of the expected and the actual facts, as YAML with sorted keys."""
    lines = difflib.unified_diff(_yaml_text(expected), _yaml_text(actual), "expected", "actual", n=3)
    return "".join(lines)


def _write_expect(path: Path, actual: dict[str, Any]) -> None:
    yaml = YAML(typ="rt")
    yaml.allow_unicode = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    data = yaml.load(path.read_text(encoding="utf-8"))
    data["expect"] = actual
    data.pop("expect_error", None)
    buf = io.StringIO()
    yaml.dump(data, buf)
    path.write_text(buf.getvalue(), encoding="utf-8")


def format_results(results: Sequence[TestResult]) -> str:
    """What ``hl7engine test`` prints: each failure with its diff, then a summary line."""
    out: list[str] = []
    for r in results:
        if r.passed:
            continue
        head = f"FAIL {r.file}" + (f" (mapping {r.mapping})" if r.mapping else "")
        out.append(head)
        out.append("\n".join(f"    {line}" for line in r.detail.rstrip("\n").splitlines()))
    passed = sum(r.passed for r in results)
    failed = len(results) - passed
    updated = sum(r.updated for r in results)
    summary = f"{passed} passed, {failed} failed"
    if updated:
        summary += f" ({updated} expectations written)"
    if not results:
        summary = "no fixture tests found (mappings/tests/*.yaml)"
    out.append(summary)
    return "\n".join(out)


def failed(results: Sequence[TestResult]) -> bool:
    return any(not r.passed for r in results)
