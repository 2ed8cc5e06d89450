"""Test support: daemon fixture, tgtd helper, raw-PDU initiator, tool wrappers."""
