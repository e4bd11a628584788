"""The server's version, shown in ``/status`` and the OpenAPI schema."""

VERSION = "0.1.0"
