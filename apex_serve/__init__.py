"""apex-serve's ground floor: domain types, errors, protobuf conversion (convert), RPC helpers, flags, logging, tracing,
overlap arithmetic, measurement, the hardware fingerprint, the generated protobuf code (apex_serve.v1) and the client
SDK (apex_serve.sdk). It imports no service and no tool."""

__version__ = "0.1.0"
