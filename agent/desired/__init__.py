"""Reads a desired-state tree: load the files, the roles, render a host's stack, validate."""
