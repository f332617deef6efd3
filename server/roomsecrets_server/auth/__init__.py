"""Participant tokens: verification (tokens.py), grants (principal.py), the dev signing key (dev_key.py)."""
