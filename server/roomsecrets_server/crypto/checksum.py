"""CRC32C (Castagnoli), the checksum carried with every payload on the wire."""

from __future__ import annotations

import google_crc32c


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))
