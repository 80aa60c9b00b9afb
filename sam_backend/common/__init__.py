"""Helpers every layer shares, one home per idea (resource limits, file locks and atomic writes,
digests, parsing of option values, redaction of URLs in messages)."""
