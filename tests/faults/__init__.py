"""Fault injection for tests: a loopback TCP proxy that cuts, refuses and delays connections."""
