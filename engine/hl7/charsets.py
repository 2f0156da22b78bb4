"""MSH-18 character sets (HL7 table 0211) to Python codecs.

The engine keeps the original bytes; a codec is needed only to read header fields, to show a
message to a person, and to encode the ACK in the sender's own character set.
"""

from __future__ import annotations

import codecs
from functools import lru_cache

ECHO = "hl7echo"


def _echo(exc: UnicodeError) -> tuple[str | bytes, int]:
    """Encode error handler: bytes kept by ``surrogateescape`` go back as they came; any other
    character the charset cannot represent becomes ``?``."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = bytearray()
    for ch in exc.object[exc.start:exc.end]:
        code = ord(ch)
        out += bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF else b"?"
    return bytes(out), exc.end


codecs.register_error(ECHO, _echo)


def clean(text: str, codec: str) -> str:
    """Text for storage and display: bytes the charset could not decode become U+FFFD."""
    if text.isascii():
        return text
    return text.encode(codec, "surrogateescape").decode(codec, "replace")

# HL7 table 0211 (and the spellings seen in the field) -> Python codec name.
_TABLE_0211 = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "ISO IR6": "ascii",
    "ISO IR14": "ascii",
    "ISO IR87": "iso2022_jp_ext",
    "ISO IR159": "iso2022_jp_2",
    "ISO IR100": "latin-1",
    "ISO IR144": "iso8859-5",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
}
_ISO2022 = {"ISO IR87", "ISO IR159"}


def _normalise(value: str) -> str:
    return " ".join(value.strip().upper().replace("_", " ").split())


@lru_cache(maxsize=256)
def codec_for_charset(value: str) -> str | None:
    """Return the Python codec for an MSH-18 value (a repeating field, already decoded as ASCII).

    ``""`` gives None (use the channel default). An unknown value also gives None; the caller
    logs it and falls back to the channel's charset.
    """
    reps = [_normalise(r) for r in value.split("~")] if value else []
    reps = [r.replace("ISOIR", "ISO IR") for r in reps]
    if any(r in _ISO2022 for r in reps):
        return "iso2022_jp_ext"  # code extension techniques (ISO 2022) as used in Japan
    for rep in reps:
        if not rep:
            continue
        if rep in _TABLE_0211:
            return _TABLE_0211[rep]
        try:  # UTF-8, ISO-8859-5, WINDOWS-1251, KOI8-R ... spelled as Python knows them
            name = codecs.lookup(rep.replace(" ", "-")).name
        except LookupError:
            return None
        return name if ascii_compatible(name) else None
    return None


@lru_cache(maxsize=64)
def ascii_compatible(name: str) -> bool:
    """A text encoding in which MSH, delimiters and CR are the ASCII bytes MLLP needs (not UTF-16,
    not base64 or hex, which Python also calls codecs)."""
    try:
        info = codecs.lookup(name)
        if not getattr(info, "_is_text_encoding", True):
            return False
        bytes(range(256)).decode(name, "replace")  # decodes anything (idna and punycode do not)
        return "MSH|^~\\&\r0123456789".encode(name) == b"MSH|^~\\&\r0123456789"
    except (LookupError, UnicodeError, TypeError, ValueError):
        return False


def decode(data: bytes, codec: str) -> str:
    """Decode keeping undecodable bytes (``surrogateescape``) so they can be echoed back unchanged;
    where a stateful codec cannot do that (ISO 2022 with a byte below 0x80 it does not expect), fall
    back to replacement characters rather than fail."""
    try:
        return data.decode(codec, "surrogateescape")
    except UnicodeError:
        return data.decode(codec, "replace")


@lru_cache(maxsize=64)
def python_codec(name: str) -> str:
    """Validate a codec name given in configuration (e.g. ``windows-1251``); raise LookupError for
    unknown names and for encodings HL7 over MLLP cannot carry (UTF-16, base64 ...)."""
    found = codecs.lookup(name).name
    if not ascii_compatible(found):
        raise LookupError(name)
    return found
