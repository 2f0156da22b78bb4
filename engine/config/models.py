"""Configuration models: what hospital IT writes in YAML. Validation only; no runtime state here.

Unknown keys are rejected everywhere (``extra="forbid"``), so a typo is an error, not a silently
ignored setting.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from engine.hl7.charsets import python_codec

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def _duration(value: object) -> object:
    """``30s``, ``5m``, ``1h``, ``250ms`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, 5m or 1h, got {value!r}")
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"expected a duration such as 30s, 5m or 1h, got {value!r}")
        return float(m.group(1)) * _UNITS[m.group(2)]
    return value


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``5m``, ``1h``, ``250ms`` or a number of seconds; ValueError otherwise."""
    value = _duration(text)
    assert isinstance(value, float)
    return value


def _size(value: object) -> object:
    """``1MiB``, ``512KiB``, ``2MB`` or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 1MiB or 65536, got {value!r}")
    if isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"expected a size such as 1MiB or 65536, got {value!r}")
        unit = (m.group(2) or "B").lower()
        return int(float(m.group(1)) * _SIZE_UNITS[unit])
    return value


Duration = Annotated[float, BeforeValidator(_duration), Field(ge=0)]
Size = Annotated[int, BeforeValidator(_size), Field(gt=0)]

HL7_VERSIONS = ("2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1",
                "2.8", "2.8.1", "2.8.2", "2.9", "2.9.1")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(Strict):
    """TLS for a listener. Paths only; the key file itself is the secret and stays on disk."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = Field(
        default=None, description="when set, senders must present a certificate signed by this CA"
    )
    min_version: Literal["1.2", "1.3"] = "1.2"


class ListenConfig(Strict):
    host: str = "0.0.0.0"
    port: int = Field(default=2575, ge=1, le=65535)
    max_connections: int = Field(default=1000, ge=1)
    idle_timeout: Duration = Field(default=3600.0, description="close a connection silent this long; 0 = never")
    frame_timeout: Duration = Field(default=60.0, description="longest time one frame may take to arrive")
    allowed_senders: list[str] | None = Field(default=None, description="CIDR list; none means any address")
    tls: TLSConfig | None = None
    max_pipelined: int = Field(default=64, ge=1, description="unanswered messages per connection before "
                                                            "the engine stops reading from it")

    @field_validator("allowed_senders")
    @classmethod
    def _cidrs(cls, v: list[str] | None) -> list[str] | None:
        for item in v or []:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"expected an address or CIDR network such as 10.1.0.0/16, got {item!r}") from None
        return v


def _version_text(value: object) -> object:
    """YAML reads an unquoted 2.5 as a number: take it as the version it was meant to be."""
    if isinstance(value, list):
        return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
    return value


class AcceptConfig(Strict):
    versions: Annotated[list[str], BeforeValidator(_version_text)] = Field(default_factory=lambda: list(HL7_VERSIONS))
    processing_ids: list[str] = Field(default_factory=lambda: ["P"], description="MSH-11 values accepted")

    @field_validator("versions")
    @classmethod
    def _versions(cls, v: list[str]) -> list[str]:
        for item in v:
            if item not in HL7_VERSIONS:
                raise ValueError(f"unknown HL7 version {item!r}; expected one of {', '.join(HL7_VERSIONS)}")
        return v

    @field_validator("processing_ids")
    @classmethod
    def _pids(cls, v: list[str]) -> list[str]:
        for item in v:
            if item not in ("P", "T", "D"):
                raise ValueError(f"expected processing IDs from P, T, D, got {item!r}")
        return v


class ClientTLSConfig(Strict):
    """TLS when the engine connects out (to a sender's listener). Paths only."""

    ca_file: Path | None = Field(default=None, description="CA that signed the peer's certificate; "
                                 "none: the system's trusted CAs")
    cert_file: Path | None = Field(default=None, description="our client certificate, when the peer asks for one")
    key_file: Path | None = None
    server_name: str | None = Field(default=None, description="name to verify in the peer's certificate "
                                    "(default: the host of 'to')")
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _pair(self) -> ClientTLSConfig:
        if (self.key_file is None) != (self.cert_file is None):
            raise ValueError("cert_file and key_file go together: give both or neither")
        return self


class MLLPPeerConfig(Strict):
    """An MLLP listener the engine connects to: a sender's (application ACKs) or a downstream system's
    (a route's ``mllp`` destination)."""

    to: str = Field(description="the peer's MLLP listener, host:port")
    tls: ClientTLSConfig | None = None
    connect_timeout: Duration = Field(default=5.0, gt=0)
    answer_timeout: Duration = Field(default=10.0, gt=0, description="how long to wait for the peer's ACK to "
                                     "each message sent")
    give_up_after: Duration = Field(default=86400.0, gt=0, description="stop retrying a message not delivered "
                                    "this long after it was due (status expired)")

    @field_validator("to")
    @classmethod
    def _to(cls, v: str) -> str:
        host, sep, port = v.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"expected host:port, e.g. lis.example.org:6661, got {v!r}")
        return v.strip()

    @property
    def host(self) -> str:
        return self.to.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.to.rpartition(":")[2])

    @property
    def waits_for_ack(self) -> bool:
        return True


class ApplicationAcksConfig(MLLPPeerConfig):
    """Enhanced mode: where and how to deliver application ACKs once workers have processed a message."""

    to: str = Field(description="the sender's own MLLP listener, host:port")
    commit_ack: bool = Field(default=True, description="ask for and wait for the sender's commit ACK (CA) to each "
                             "application ACK; false for senders that never answer an ACK: one then counts as "
                             "delivered once written to the connection (MSH-15 NE)")

    @property
    def waits_for_ack(self) -> bool:
        return self.commit_ack


class AckConfig(Strict):
    mode: Literal["original", "enhanced"] = "original"
    after: Literal["stored", "processed"] = Field(
        default="stored", description="stored: AA once the message is durable (stored and queued). processed: "
        "AA only once a worker has written it to the record (or filtered it); AE with the reason when "
        "processing failed or did not finish within processing_timeout")
    timeout: Duration = Field(default=10.0, gt=0, description="answer AE if the message is not durable by then")
    processing_timeout: Duration = Field(
        default=30.0, gt=0, description="with after: processed, answer AE if the message is not processed by "
        "then (it stays stored and queued; a resend is answered with its outcome)")
    application: str = Field(default="HL7ENGINE", description="our MSH-3 when the sender left MSH-5 empty")
    facility: str = Field(default="", description="our MSH-4 when the sender left MSH-6 empty")
    application_acks: ApplicationAcksConfig | None = Field(
        default=None, description="enhanced mode: send application ACKs (AA/AE after processing, as the "
        "message's MSH-16 asks) to the sender's listener")

    @field_validator("after")
    @classmethod
    def _after(cls, v: str, info: ValidationInfo) -> str:
        if v == "processed" and info.data.get("mode") == "enhanced":
            raise ValueError("'processed' needs mode: original; in enhanced mode the commit ACK (CA) is sent once "
                             "the message is stored, and the outcome of processing goes in an application ACK "
                             "(ack.application_acks)")
        return v

    @field_validator("application_acks")
    @classmethod
    def _application_acks(cls, v: ApplicationAcksConfig | None, info: ValidationInfo) -> ApplicationAcksConfig | None:
        if v is not None and info.data.get("mode") != "enhanced":
            raise ValueError("application ACKs need mode: enhanced (in original mode the one ACK is sent on the "
                             "sender's connection; use after: processed for an AA that means 'in the record')")
        return v

    @field_validator("processing_timeout")
    @classmethod
    def _processing_timeout(cls, v: float, info: ValidationInfo) -> float:
        timeout = info.data.get("timeout")
        if isinstance(timeout, float | int) and v < timeout:
            raise ValueError(f"processing_timeout ({v:g}s) must not be shorter than timeout ({timeout:g}s): "
                             "processing starts once the message is stored")
        return v


class ChannelConfig(Strict):
    """One MLLP channel: ``channels/<name>.yaml``."""

    name: str = Field(default="", pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    enabled: bool = True
    listen: ListenConfig = Field(default_factory=ListenConfig)
    max_message_size: Size = 1024 * 1024
    charset: str = Field(default="utf-8", description="used when MSH-18 is empty, e.g. windows-1251")
    timezone: str = Field(default="UTC", description="for times without an offset, e.g. Europe/Minsk")
    segment_separators: Literal["lenient", "strict"] = Field(
        default="lenient", description="lenient accepts LF and CRLF as well as CR; strict refuses them"
    )
    batches: Literal["accept", "reject"] = "accept"
    accept: AcceptConfig = Field(default_factory=AcceptConfig)
    ack: AckConfig = Field(default_factory=AckConfig)
    validation: Literal["none", "hl7apy"] = "none"

    @field_validator("charset")
    @classmethod
    def _charset(cls, v: str) -> str:
        try:
            python_codec(v)
        except LookupError:
            raise ValueError(f"unknown character set {v!r}; try utf-8, latin-1 or windows-1251") from None
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {v!r}; use an IANA name such as Europe/Minsk") from None
        return v
