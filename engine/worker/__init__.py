"""Workers: take queued messages, route them (routes.yaml), map them (mappings/) and write the
central record, each message in one transaction with its status change."""
