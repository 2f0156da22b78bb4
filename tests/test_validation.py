"""Opt-in hl7apy validation: valid messages pass; invalid ones give a reason without patient data."""

from __future__ import annotations

import pytest

from engine.worker.validate import ValidationFailed, validate

GOOD = ("MSH|^~\\&|LIS|WLAB|HL7ENGINE|CENTRAL|20261122101500||ORU^R01^ORU_R01|C1|P|2.5\r"
        "PID|1||12345^^^WLAB^MR||IVANOVA^ANNA||19800101|F\r"
        "OBR|1||ACC1|2345-7^Glucose^LN|||20261122093000\r"
        "OBX|1|NM|2345-7^Glucose^LN||5.4|mmol/L|3.9-6.1|N|||F\r")


def test_a_valid_message_passes() -> None:
    validate(GOOD)


def test_a_result_without_its_order_fails_without_values() -> None:
    bad = GOOD.replace("OBR|1||ACC1|2345-7^Glucose^LN|||20261122093000\r", "").replace("PID|1||12345^^^WLAB^MR||"
                                                                                      "IVANOVA^ANNA||19800101|F\r", "")
    with pytest.raises(ValidationFailed) as err:
        validate(bad)
    assert err.value.reason.startswith("hl7apy: ")
    for value in ("IVANOVA", "12345", "5.4", "Glucose"):
        assert value not in err.value.reason


def test_unparseable_text_fails() -> None:
    with pytest.raises(ValidationFailed):
        validate("MSH|^~\\&|A\rPID|||\x00")
