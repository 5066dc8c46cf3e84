"""The vectors file format: its schema name and version."""

from __future__ import annotations

SCHEMA_NAME = "gradcheck-vectors"
SCHEMA_VERSION = "1.0.0"
