"""The mapping's run-time error: a message that a mapping cannot turn into facts."""

from __future__ import annotations

from engine.errors import EngineError


class MappingError(EngineError):
    """A permanent failure to map one message (retrying the same message gives the same result).

    ``step`` is always ``"map"``; ``where`` names the fact field and the mapping rule, e.g.
    ``observations[3].value (mappings/oru_r01.yaml:42)``; ``reason`` says what is wrong, naming
    the HL7 path (``OBX-5: not a number``). Neither ever contains a value from the message: the
    text goes to logs and the message store, and must not carry patient data.
    """

    step = "map"

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}" if where else reason)
