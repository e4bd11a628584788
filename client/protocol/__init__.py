"""The shared contract both sides import: wire format, job spec, planner, counter-based RNG, errors.

Pure and light (numpy and msgpack only): the server depends on it, and it depends on nothing of the
trainer runtime or the server.
"""

from stoker.client.protocol.errors import ProtocolError, StokerError
from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.wire import PROTOCOL_VERSION, ErrorCode, Header, Kind

__all__ = ["JobSpec", "Kind", "ErrorCode", "Header", "PROTOCOL_VERSION", "ProtocolError", "StokerError"]
