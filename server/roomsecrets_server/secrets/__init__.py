"""Room secrets domain service."""
