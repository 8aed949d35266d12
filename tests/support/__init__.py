"""Shared helpers for the tests: certificates, ports, polling with deadlines."""
