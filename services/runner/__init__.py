"""The runner service."""
