"""Attacker tests: real nodes, hand-made certificates and hostile clients (issue 8)."""
