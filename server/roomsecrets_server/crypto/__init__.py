"""Envelope encryption (envelope.py), the key-encryption keyring (keyring.py), CRC32C (checksum.py)."""
