"""Thin async client library for snaprag, plus the command-line client."""
