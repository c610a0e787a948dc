"""Transports between parties: in-process (tests) and TCP with mutual TLS; the local launcher."""
