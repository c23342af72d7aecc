"""Fixtures for the trial tests: real instances on loopback, real clients."""
