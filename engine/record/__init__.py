"""The central record: facts from mapped messages kept in relational tables, readable as FHIR R4.

- ``facts``: the contract with the mappings (what one message produces);
- ``models``: the ``rec_*`` tables (``record_metadata``);
- ``writer``: ``apply()`` writes one message's facts, idempotently, in the caller's transaction;
- ``links``: patient merge links (ADT^A40) and the groups that reads follow;
- ``fhir`` (with ``datatypes``): rows rendered as FHIR R4 resources, read and search;
- ``export``: a FHIR Bundle of one patient's record, or of every patient's.
"""
