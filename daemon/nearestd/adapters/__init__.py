"""Adapters: each owns one library or kind of I/O and talks only to the service."""
