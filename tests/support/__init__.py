"""Helpers the tests share (processes, payloads, random weights, loopback hosts)."""
