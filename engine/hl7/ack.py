"""Build HL7 acknowledgements: original mode (AA/AE/AR) and enhanced-mode commit ACKs (CA/CE/CR).

The ACK uses the sender's own delimiters and character set, swaps sending and receiving
application and facility, echoes MSH-11 and MSH-12, answers MSA-2 with the incoming MSH-10, and
carries its own control ID and timestamp. Errors go in ERR segments: the HL7 table 0357 code in
ERR-3, the engine's reason in ERR-5, the text in ERR-8 (and MSA-3); for versions before 2.5 the
code and location are also given in ERR-1, where those versions expect them.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from zoneinfo import ZoneInfo

from engine.errors import HL7Error
from engine.hl7.charsets import ECHO
from engine.hl7.header import Delimiters, Header

TABLE_0357 = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "104": "Value too long",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

ORIGINAL_TO_ENHANCED = {"AA": "CA", "AE": "CE", "AR": "CR"}
POSITIVE = frozenset({"AA", "CA"})


def version_tuple(version: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in version.strip().split("."):
        if not (part.isascii() and part.isdigit()):
            break
        out.append(int(part))
    return tuple(out)


def escape(text: str, d: Delimiters) -> str:
    """Escape delimiter characters in free text we put into a field (MSA-3, ERR-8)."""
    e = d.escape
    out = text.replace(e, f"{e}E{e}")
    pairs = [(d.field, "F"), (d.component, "S"), (d.repetition, "R"), (d.subcomponent, "T")]
    if len(d.encoding) > 4:  # the 2.7 truncation character
        pairs.append((d.encoding[4], "P"))
    for ch, code in pairs:
        out = out.replace(ch, f"{e}{code}{e}")
    return out.replace("\r", " ").replace("\n", " ")


class ControlIds:
    """ACK control IDs: a random per-process prefix and a counter; at most 20 characters."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or "A" + os.urandom(5).hex().upper()[:7]
        self._n = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self._n)}"


class Clock:
    """HL7 DTM timestamps in a given timezone, cached per second."""

    def __init__(self, tz: ZoneInfo, now: Callable[[], float] = time.time) -> None:
        self.tz = tz
        self.now = now
        self._second = -1
        self._text = ""

    def __call__(self) -> str:
        t = self.now()
        s = int(t)
        if s != self._second:
            self._second = s
            self._text = datetime.fromtimestamp(s, self.tz).strftime("%Y%m%d%H%M%S%z")
        return self._text


class AckBuilder:
    """Builds ACK messages for one channel."""

    def __init__(
        self,
        *,
        application: str,
        facility: str,
        clock: Callable[[], str],
        control_ids: Callable[[], str],
    ) -> None:
        self.application = application
        self.facility = facility
        self.clock = clock
        self.control_ids = control_ids
        self._types: dict[tuple[str, str, str], str] = {}
        self._templates: dict[tuple[str, ...], tuple[str, str, str]] = {}

    def build(
        self,
        header: Header | None,
        code: str,
        errors: Sequence[HL7Error] = (),
        *,
        text: str = "",
    ) -> bytes:
        """Return the ACK for ``header`` encoded in the sender's character set.

        ``header`` None means no MSH could be read at all: a best-effort ACK with default
        delimiters, version 2.5 and an empty MSA-2.
        """
        if not errors and not text and header is not None and not header.salvaged:
            return self._fast(header, code)
        return self.build_text(header, code, errors, text=text).encode(
            header.codec if header else "ascii", ECHO
        )

    def _fast(self, header: Header, code: str) -> bytes:
        """A plain AA/CA from a template kept per sender: a sender's MSH-3..6, MSH-9.2, MSH-11,
        MSH-12 and MSH-18 are the same message after message, only MSH-7/MSH-10 and MSA-2 change."""
        f = header.fields
        n = len(f)
        key = (header.delimiters.field, header.delimiters.encoding, code, header.trigger_event, *f[3:7],
               *f[11:13], f[18] if n > 18 else "")
        parts = self._templates.get(key)
        if parts is None:
            # MSH|...|<ts>||<type>|<id>|...\rMSA|AA|<ctrl>\r, without spending a control ID or a clock call
            text = self.build_text(header, code, timestamp="", control_id="")
            fs = header.delimiters.field
            msh, _ = text.split("\r", 1)
            cut = msh.split(fs)
            head = fs.join(cut[:6]) + fs
            middle = fs + fs.join(cut[7:9]) + fs
            tail = fs + fs.join(cut[10:]) + f"\rMSA{fs}{code}{fs}"
            if len(self._templates) > 1024:
                self._templates.clear()
            parts = self._templates[key] = (head, middle, tail)
        head, middle, tail = parts
        return (head + self.clock() + middle + self.control_ids() + tail + header.control_id + "\r").encode(
            header.codec, ECHO)

    def build_text(
        self,
        header: Header | None,
        code: str,
        errors: Sequence[HL7Error] = (),
        *,
        text: str = "",
        timestamp: str | None = None,
        control_id: str | None = None,
        ack_types: tuple[str, str] | None = None,
    ) -> str:
        """The ACK as text. ``ack_types``: MSH-15 and MSH-16 of the ACK itself (an application ACK
        asks for a commit ACK back); None leaves them empty."""
        if header is None or header.salvaged:
            d = Delimiters()
            fields = [escape(v, d) for v in header.fields] if header is not None else []
        else:
            d = header.delimiters
            fields = header.fields
        n = len(fields)
        f = d.field
        version = fields[12] if n > 12 and fields[12] else "2.5"
        trigger = header.trigger_event if header is not None and not header.salvaged else ""
        key = (version, trigger, d.component)
        msg_type = self._types.get(key)
        if msg_type is None:
            msg_type = self._types[key] = _ack_type(version.split(d.component)[0], trigger, d.component)
        msh = [
            "MSH", d.encoding,
            (fields[5] if n > 5 else "") or self.application,
            (fields[6] if n > 6 else "") or self.facility,
            fields[3] if n > 3 else "",
            fields[4] if n > 4 else "",
            self.clock() if timestamp is None else timestamp, "", msg_type,
            self.control_ids() if control_id is None else control_id,
            (fields[11] if n > 11 else "") or "P",
            version,
        ]
        charset = fields[18] if n > 18 and fields[18] else ""
        if ack_types is not None:
            msh += ["", "", *ack_types]
        if charset:
            msh += [""] * (17 - len(msh)) + [charset]
        if not text and errors:
            text = errors[0].text
        msa = f"MSA{f}{code}{f}{fields[10] if n > 10 else ''}"
        if text:
            msa += f"{f}{escape(text, d)}"
        out = f.join(msh) + "\r" + msa + "\r"
        if errors:
            vt = version_tuple(version.split(d.component)[0])
            out += "".join(self._err(err, d, vt) + "\r" for err in errors)
        return out

    @staticmethod
    def _err(err: HL7Error, d: Delimiters, vt: tuple[int, ...]) -> str:
        c, s, f = d.component, d.subcomponent, d.field
        name = TABLE_0357.get(err.code, "")
        location = err.location.replace("^", c)
        severity = "E"
        err1 = ""
        if vt and vt < (2, 5):
            # ELD: segment^sequence^field^code (CE, as subcomponents)
            seg_id, *rest = [*err.location.split("^"), "", "", ""][:3]
            err1 = c.join([seg_id, *rest, s.join([err.code, name, "HL70357"])])
        fields = [
            "ERR",
            err1,
            location,
            c.join([err.code, name, "HL70357"]),
            severity,
            c.join([err.reason, "", "HL7ENGINE"]) if err.reason else "",
            "",
            "",
            escape(err.text, d),
        ]
        return f.join(fields)


def _ack_type(version: str, trigger: str, comp: str) -> str:
    """MSH-9 of the ACK: ``ACK`` (2.1), ``ACK^event`` (2.2 to 2.3), ``ACK^event^ACK`` (2.3.1 on)."""
    vt = version_tuple(version)
    if not trigger or (vt and vt < (2, 2)):
        return "ACK"
    if vt and vt < (2, 3, 1):
        return f"ACK{comp}{trigger}"
    return f"ACK{comp}{trigger}{comp}ACK"


def ack_code(original: str, enhanced: bool) -> str:
    """Map an original-mode code (AA/AE/AR) to the commit code when answering in enhanced mode."""
    return ORIGINAL_TO_ENHANCED[original] if enhanced else original


PROCESSING_ERROR_CODES = {"route": "200", "order": "206"}  # else 207, application internal error


def processing_error(step: str, reason: str) -> HL7Error:
    """The ERR of a message stored but not processed (an AE after processing): HL7 table 0357 200
    when no route takes it, 206 when its patient's stream is parked (step order), else 207."""
    step = step or "error"
    text = f"message stored but not processed ({step}: {reason or 'failed'})"
    if len(text) > 500:
        text = text[:497] + "..."
    return HL7Error(PROCESSING_ERROR_CODES.get(step, "207"), f"PROCESSING_{step.upper()}", text)


def application_ack_due(application_ack_type: str, code: str) -> bool:
    """Whether an enhanced-mode application ACK with MSA-1 ``code`` is sent, per MSH-16 (AL, NE, ER,
    SU; empty means AL, as for MSH-15)."""
    if application_ack_type in ("", "AL"):
        return True
    if application_ack_type == "NE":
        return False
    if application_ack_type == "ER":
        return code != "AA"
    if application_ack_type == "SU":
        return code == "AA"
    return True  # unknown value: answer rather than leave the sender without an outcome


def enhanced_wants_ack(accept_ack_type: str, code: str) -> bool:
    """Whether an enhanced-mode commit ACK is sent, per MSH-15 (AL, NE, ER, SU; empty means AL)."""
    if accept_ack_type in ("", "AL"):
        return True
    if accept_ack_type == "NE":
        return False
    positive = code in POSITIVE
    if accept_ack_type == "ER":
        return not positive
    if accept_ack_type == "SU":
        return positive
    return True  # unknown value: answer rather than leave the sender waiting
