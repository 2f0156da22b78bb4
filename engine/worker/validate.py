"""Opt-in structural validation with hl7apy (``validation: hl7apy`` in a channel).

Off the receiving path: a worker validates the message against its version's structure (message
structure, segment order and cardinality, required fields) before routing. A message that fails is
marked error at step ``validate`` and parks its patient like any permanent failure. hl7apy costs
tens of milliseconds per message, which is why it is opt-in per channel.

The reason recorded names hl7apy's error class and the HL7 element names it mentions (``OBX_3``,
``PID``), never a value from the message.
"""

from __future__ import annotations

import re

_ELEMENT = re.compile(r"\b[A-Z][A-Z0-9]{2}(?:_[0-9]+)?(?:\.[A-Z][A-Z0-9]{2}_[0-9]+)*\b")


class ValidationFailed(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def validate(text: str) -> None:
    """Raise ValidationFailed when hl7apy finds the message invalid for its version."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    try:
        msg = parse_message(text.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        msg.validate()
    except Exception as exc:  # hl7apy raises many kinds; all mean "not valid"
        raise ValidationFailed(reason(exc)) from None


def reason(exc: BaseException) -> str:
    names = list(dict.fromkeys(_ELEMENT.findall(str(exc))))[:5]
    where = f" ({', '.join(names)})" if names else ""
    return f"hl7apy: {type(exc).__name__}{where}"
