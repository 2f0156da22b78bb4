"""Read what the receiving path needs from a message: its MSH header, and nothing more.

A full parse costs about a millisecond per message; this reads the first segment only (a few
microseconds). Values are kept as sent (escape sequences untouched) so they can be echoed in the
ACK with the sender's own delimiters.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import HL7Error
from engine.hl7.charsets import codec_for_charset, decode

BOM = b"\xef\xbb\xbf"
_WS = b" \t\r\n\x00"
SEGMENT_IDS = (b"MSH", b"FHS", b"BHS")


@dataclass(slots=True)
class Delimiters:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    encoding: str = "^~\\&"  # MSH-2 exactly as sent (may carry the 2.7 truncation character)


class Header:
    """The MSH segment of one message, as far as it could be read.

    ``fields[n]`` is MSH-n (``fields[1]`` is the field separator, ``fields[2]`` MSH-2), so the
    numbering matches the standard. Missing fields read as ``""``. The values the engine uses on
    every message are split out once, at construction.
    """

    __slots__ = ("accept_ack_type", "application_ack_type", "charset_known", "codec", "control_id", "delimiters",
                 "fields", "message_type", "problems", "processing_id", "salvaged", "sending_facility", "structure",
                 "trigger_event", "version")

    def __init__(self, delimiters: Delimiters, fields: list[str], codec: str, charset_known: bool = True,
                 salvaged: bool = False) -> None:
        self.delimiters = delimiters
        self.fields = fields
        self.codec = codec
        self.charset_known = charset_known
        self.salvaged = salvaged  # read with default delimiters after read_header failed
        self.problems: list[HL7Error] = []
        n = len(fields)
        comp = delimiters.component
        msh9 = fields[9].split(comp) if n > 9 else [""]
        self.message_type = msh9[0]
        self.trigger_event = msh9[1] if len(msh9) > 1 else ""
        self.structure = msh9[2] if len(msh9) > 2 else ""
        self.sending_facility = fields[4] if n > 4 else ""
        self.control_id = fields[10] if n > 10 else ""
        self.processing_id = fields[11].split(comp, 1)[0] if n > 11 else ""
        self.version = fields[12].split(comp, 1)[0] if n > 12 else ""
        self.accept_ack_type = fields[15].strip().upper() if n > 15 else ""
        self.application_ack_type = fields[16].strip().upper() if n > 16 else ""

    def get(self, n: int) -> str:
        return self.fields[n] if n < len(self.fields) else ""

    def component(self, n: int, c: int) -> str:
        parts = self.get(n).split(self.delimiters.component)
        return parts[c - 1] if c - 1 < len(parts) else ""

    @property
    def sending_application(self) -> str:
        return self.get(3)

    @property
    def receiving_application(self) -> str:
        return self.get(5)

    @property
    def receiving_facility(self) -> str:
        return self.get(6)

    @property
    def type_label(self) -> str:
        """``ORU^R01`` style label (type and trigger), for logs and the store."""
        t, e = self.message_type, self.trigger_event
        return f"{t}^{e}" if e else t

    @property
    def charset(self) -> str:
        return self.get(18)


def message_start(raw: bytes) -> int:
    """Offset of the first segment: skips a UTF-8 byte-order mark and leading whitespace."""
    i = 3 if raw.startswith(BOM) else 0
    n = len(raw)
    while i < n and raw[i] in _WS:
        i += 1
    return i


def segment_end(raw: bytes, start: int) -> int:
    """Offset of the CR or LF that ends the segment starting at ``start`` (or len(raw))."""
    cr = raw.find(b"\r", start)
    lf = raw.find(b"\n", start)
    if cr < 0:
        return lf if lf >= 0 else len(raw)
    return cr if lf < 0 or cr < lf else lf


_DELIMITERS: dict[bytes, Delimiters] = {}


def read_delimiters(seg: bytes) -> Delimiters:
    """Delimiters from the first four bytes of an MSH/FHS/BHS segment and its second field.

    Raises HL7Error (table 0357 code 102) when they are unusable: a field separator that is not an
    ASCII punctuation character, fewer than four encoding characters, a repeated character, or
    digits, spaces, control or non-ASCII characters among them. (Letters are allowed as encoding
    characters: some senders use them, e.g. ``MSH!$r?@``.)
    """
    if len(seg) < 4:
        raise HL7Error("100", "NOT_HL7", f"{seg[:3].decode('ascii', 'replace')} segment has no field separator",
                       "MSH^1^1")
    fs = seg[3:4]
    end = seg.find(fs, 4)
    enc_b = seg[4:end] if end >= 0 else seg[4:]
    known = _DELIMITERS.get(fs + enc_b)
    if known is not None:
        return known
    fs_s = fs.decode("latin-1")
    enc = enc_b.decode("latin-1")
    if not (fs_s.isascii() and fs_s.isprintable() and not fs_s.isalnum() and not fs_s.isspace()):
        raise HL7Error("102", "BAD_DELIMITERS", f"MSH-1 field separator {fs_s!r} must be an ASCII punctuation "
                                                "character such as |", "MSH^1^1")
    if len(enc) < 4:
        raise HL7Error("102", "BAD_DELIMITERS",
                       f"MSH-2 must hold four encoding characters, got {len(enc)}", "MSH^1^2")
    chars = fs_s + enc[:4]
    if len(set(chars)) != 5 or any(not c.isascii() or not c.isprintable() or c.isspace() or c.isdigit()
                                   for c in enc):
        raise HL7Error("102", "BAD_DELIMITERS",
                       "MSH-1 and MSH-2 must be five distinct delimiter characters "
                       "(ASCII, not digits or spaces)", "MSH^1^2")
    found = Delimiters(fs_s, enc[0], enc[1], enc[2], enc[3], enc)
    if len(_DELIMITERS) < 64:
        _DELIMITERS[fs + enc_b] = found
    return found


def read_header(raw: bytes, default_codec: str) -> Header:
    """Read the MSH of ``raw`` (one message, without MLLP framing).

    Raises HL7Error when there is no MSH or its delimiters cannot be read; otherwise returns the
    header with any problems of required fields listed in ``header.problems``.
    """
    start = message_start(raw)
    if not raw.startswith(b"MSH", start):
        raise HL7Error("100", "NOT_HL7", "message does not start with an MSH segment", "MSH^1")
    end = segment_end(raw, start)
    seg = raw[start:end]
    delims = read_delimiters(seg)
    # surrogateescape: bytes the charset cannot decode survive, so echoed fields go back unchanged
    values = decode(seg, default_codec).split(delims.field)
    codec = default_codec
    known = True
    charset = values[17] if len(values) > 17 else ""
    if charset:
        found = codec_for_charset(charset)
        if found is None:
            known = False
        elif found != codec:
            codec = found
            values = decode(seg, codec).split(delims.field)
    # MSH-1 is the separator itself: fields[1] = "|", fields[2] = MSH-2, fields[n] = MSH-n.
    fields = ["MSH", delims.field, *values[1:]]
    header = Header(delims, fields, codec, known)
    if not (header.message_type.strip() and header.control_id.strip() and header.processing_id.strip()
            and header.version.strip()):
        header.problems = check_required(header)
    return header


def check_required(h: Header) -> list[HL7Error]:
    problems: list[HL7Error] = []
    if not h.message_type.strip():
        problems.append(HL7Error("101", "MISSING_FIELD", "MSH-9 message type is empty", "MSH^1^9"))
    if not h.control_id.strip():
        problems.append(HL7Error("101", "MISSING_FIELD", "MSH-10 message control ID is empty", "MSH^1^10"))
    if not h.processing_id.strip():
        problems.append(HL7Error("101", "MISSING_FIELD", "MSH-11 processing ID is empty", "MSH^1^11"))
    if not h.version.strip():
        problems.append(HL7Error("101", "MISSING_FIELD", "MSH-12 version ID is empty", "MSH^1^12"))
    return problems


def salvage_header(raw: bytes, default_codec: str) -> Header | None:
    """Best effort for an AR when ``read_header`` failed: default delimiters, whatever fields exist."""
    start = message_start(raw)
    end = segment_end(raw, start)
    seg = raw[start:end]
    if not seg.startswith(b"MSH") or len(seg) < 4:
        return None
    text = decode(seg, default_codec)
    fs = text[3]
    if not fs.isascii() or fs.isalnum() or fs.isspace():
        return None
    values = text.split(fs)
    return Header(Delimiters(), ["MSH", "|", "^~\\&", *values[2:]], default_codec, False, salvaged=True)
