"""apex-serve core: domain types, errors, RPC helpers and the generated protobuf code (apex_serve.v1)."""

__version__ = "0.1.0"
