"""Application ACKs (enhanced mode): which outcome earns one, and its bytes.

A worker decides a message's outcome in a transaction; in that same transaction it writes the
application ACK owed for it into ``outbound``, so an outcome and the ACK that reports it are
committed together or not at all. ``deliver`` sends the row later. The ACK's bytes (with its own
MSH-10) are fixed here, so every attempt sends the same message and the peer can drop repeats.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from engine.config.models import ChannelConfig
from engine.errors import HL7Error
from engine.hl7.ack import AckBuilder, Clock, ControlIds, application_ack_due, processing_error
from engine.hl7.charsets import ECHO, python_codec
from engine.hl7.header import read_header

KIND = "app_ack"
CODES = {"processed": "AA", "filtered": "AA", "error": "AE", "held": "AE"}
# MSH-15/16 of our application ACK: a commit ACK back (unless the channel's sender never gives one),
# never an application ACK of an ACK
ACK_TYPES = ("AL", "NE")
NO_COMMIT_ACK = ("NE", "NE")


@dataclass(slots=True)
class _Channel:
    destination: str
    codec: str
    builder: AckBuilder
    ack_types: tuple[str, str]


class AppAcks:
    """The application ACKs of the channels that send them (``ack.application_acks``)."""

    def __init__(self, channels: Iterable[tuple[str, ChannelConfig]], control_ids: ControlIds | None = None) -> None:
        ids = control_ids or ControlIds("P" + ControlIds().prefix[1:])
        self.channels: dict[str, _Channel] = {}
        for name, cfg in channels:
            to = cfg.ack.application_acks
            if cfg.ack.mode != "enhanced" or to is None:
                continue
            builder = AckBuilder(application=cfg.ack.application, facility=cfg.ack.facility,
                                 clock=Clock(ZoneInfo(cfg.timezone)), control_ids=ids)
            self.channels[name] = _Channel(to.to, python_codec(cfg.charset), builder,
                                           ACK_TYPES if to.commit_ack else NO_COMMIT_ACK)

    def __bool__(self) -> bool:
        return bool(self.channels)

    def build(self, channel: str, raw: bytes, status: str, step: str | None, reason: str | None,
              codec: str | None = None) -> tuple[str, bytes] | None:
        """The application ACK owed for a message of ``channel`` whose processing ended in ``status``
        (MSA-1 and bytes), or None: the channel sends none, the outcome is not final, the message
        was sent in original mode (MSH-15 and MSH-16 empty) or its MSH-16 does not ask for this one.
        ``codec``: the one the message was read with at receipt (stored with it), else the channel's."""
        ch = self.channels.get(channel)
        code = CODES.get(status)
        if ch is None or code is None:
            return None
        try:
            header = read_header(raw, codec or ch.codec)
        except HL7Error:  # pragma: no cover - the message was accepted, so its MSH was read once already
            return None
        if not header.accept_ack_type and not header.application_ack_type:
            return None
        if not application_ack_due(header.application_ack_type, code):
            return None
        errors = [processing_error(step or status, reason or status)] if code != "AA" else []
        text = ch.builder.build_text(header, code, errors, ack_types=ch.ack_types)
        return code, text.encode(header.codec, ECHO)

    def rows(self, outcomes: Iterable[tuple[Any, str, str | None, str | None]], now: datetime) -> list[dict[str, Any]]:
        """``outbound`` rows for ``(message row, status, step, reason)`` outcomes; the message row
        needs ``id``, ``channel`` and ``raw`` (and ``charset``, the codec used at receipt, if known)."""
        out: list[dict[str, Any]] = []
        for row, status, step, reason in outcomes:
            built = self.build(row.channel, row.raw, status, step, reason, getattr(row, "charset", None))
            if built is None:
                continue
            code, payload = built
            out.append({"message_id": row.id, "kind": KIND, "channel": row.channel, "target": row.channel,
                        "destination": self.channels[row.channel].destination, "control_id": control_id(payload),
                        "code": code, "payload": payload, "status": "pending", "attempts": 0, "created_at": now,
                        "due_at": now, "next_attempt_at": now})
        return out


def control_id(payload: bytes) -> str:
    """MSH-10 of a message we built (the field separator is MSH's fourth byte)."""
    msh = payload.split(b"\r", 1)[0]
    fields = msh.split(msh[3:4])
    return fields[9].decode("latin-1") if len(fields) > 9 else ""
