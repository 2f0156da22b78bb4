"""Declarative YAML mappings: HL7 v2 messages to facts (``engine.record.facts``).

    mset, problems = load_mappings(config_dir)          # compile every mapping and table once
    facts = mset.get("oru_r01").apply(message, mset.context("lab", "Europe/Minsk"))

See docs/mappings.md for how to write mappings, tables and fixture tests.
"""

from __future__ import annotations

from engine.mapping.convert import Table
from engine.mapping.engine import MapContext
from engine.mapping.engine import Mapping_ as Mapping
from engine.mapping.errors import MappingError
from engine.mapping.loader import MappingSet, load_mappings, load_mappings_or_raise

__all__ = ["MapContext", "Mapping", "MappingError", "MappingSet", "Table", "load_mappings", "load_mappings_or_raise"]
