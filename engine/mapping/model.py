"""What hospital IT writes in ``mappings/*.yaml``, ``mappings/tables/*.yaml`` and
``mappings/tests/*.yaml``: validation models only (the compiled form is in ``engine.mapping.engine``).

Unknown keys are rejected everywhere, so a misspelt key is reported with its position instead of
being ignored. See docs/mappings.md for the meaning of every key.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


Scalar = Union[str, bool, int, float]  # noqa: UP007 - a plain alias pydantic resolves at runtime


class FieldSpec(Strict):
    """How one field of a fact is computed. Exactly one source: ``path``, ``expr``, ``template``,
    ``const`` or ``fields``."""

    path: str | list[str] | None = Field(default=None, description="HL7 path, or a list: the first non-empty")
    expr: str | None = Field(default=None, description="an expression (conditions, computed text)")
    template: str | None = Field(default=None, description="a Jinja2 template (sandboxed) for a computed string; "
                                 "field('PID-5.1') reads a path")
    const: Scalar | None = Field(default=None, description="a fixed value")
    fields: dict[str, FieldValue] | None = Field(default=None, description="build a nested object field by field")
    as_: str | None = Field(default=None, alias="as", description="conversion (inferred from the fact field)")
    table: str | None = Field(default=None, description="lookup table applied to the converted code")
    default: Scalar | None = Field(default=None, description="used when the value is empty")
    required: bool = Field(default=False, description="fail the message when the value is empty")
    when: str | None = Field(default=None, description="condition: the field is set only when it holds")
    invalid: Literal["fail", "skip"] | None = Field(
        default=None, description="a value that cannot be converted fails the message (default) or is skipped")
    # conversion parameters
    type: str | None = Field(default=None, description="value: the HL7 type (a path such as OBX-2)")
    unit: str | None = Field(default=None, description="value/quantity/reference_range: units path (OBX-6)")
    system: str | None = Field(default=None, description="codeable/coding: coding system when none is sent")
    systems: str | None = Field(default=None, description="identifier: table of authority -> system URI")
    id_type: str | None = Field(default=None, description="identifier: type when none is sent (MR, FILL, ...)")


FieldValue = Union[FieldSpec, list[Union[FieldSpec, str]], Scalar]  # noqa: UP007


class RuleSpec(Strict):
    """One rule: produces facts of one kind, once or for each segment of a kind."""

    fact: str = Field(description="patient, encounter, report, observation, specimen, allergy, ...")
    name: str | None = Field(default=None, description="shown in errors (default: the fact kind)")
    for_each: str | None = Field(default=None, description="segment to iterate (one fact per segment)")
    under: str | list[str] | None = Field(
        default=None, description="parent segment(s), innermost first: the nearest preceding one is the parent")
    when: str | None = Field(default=None, description="condition: a fact is produced only when it holds")
    key: str | None = Field(default=None, description="business key expression")
    fields: dict[str, FieldValue] = Field(default_factory=dict)
    required: bool = Field(default=False, description="fail the message when the rule produces nothing")
    on_duplicate_key: Literal["number", "fail", "keep"] = Field(
        default="number", description="two facts with one key in a message: number them (#2), fail, or keep")


class CheckSpec(Strict):
    """A message the mapping must refuse: when the condition holds, the message fails with the text."""

    fail_when: str = Field(description="condition, e.g. count(PID) > 1")
    message: str = Field(description="why (shown in the error; no patient data)")


class MappingFile(Strict):
    mapping: str | None = Field(default=None, description="the mapping's name (default: the file name)")
    description: str = ""
    messages: list[str] = Field(default_factory=list, description="message types it is written for: ORU^R01")
    groups: list[str] = Field(default_factory=list,
                              description="more segments that start a group (end the NTEs of the one before)")
    ignore_segments: list[str] = Field(default_factory=list,
                                       description="segments not reported as unused (EVN, SFT, ...)")
    invalid: Literal["fail", "skip"] = "fail"
    message_time: FieldValue | None = Field(default=None, description="MSH-7, for 'older message' checks")
    checks: list[CheckSpec] = Field(default_factory=list, description="messages to refuse, checked first")
    rules: list[RuleSpec] = Field(min_length=1)


class TableCoding(Strict):
    code: str
    system: str | None = None
    display: str | None = None


class TableFile(Strict):
    name: str | None = Field(default=None, description="the table's name (default: the file name)")
    description: str = ""
    unmapped: Literal["pass", "fail", "empty", "default"] = Field(
        default="pass", description="a code not in the table: pass it through, fail, drop it, or use default")
    default: str | None = None
    case_sensitive: bool = True
    values: dict[str, TableCoding | str | int | float] = Field(default_factory=dict)


class FixtureFile(Strict):
    """A fixture test: one message in, the expected facts out."""

    mapping: str
    description: str = ""
    source: str = Field(default="", description="where the message comes from (attribution, licence)")
    message: str | None = Field(default=None, description="the message inline, one segment per line")
    message_file: str | None = Field(default=None, description="or a file beside this one (raw bytes)")
    charset: str = Field(default="utf-8", description="the channel's charset, used when MSH-18 is empty")
    timezone: str = "UTC"
    channel: str = "test"
    expect: dict[str, Any] | None = Field(default=None, description="the facts, as MappedMessage in JSON form")
    expect_error: str | None = Field(default=None, description="or: the mapping must fail with this text")


FieldSpec.model_rebuild()
RuleSpec.model_rebuild()
MappingFile.model_rebuild()
