"""Domain errors. The one exception interceptor (apex_serve.rpc) maps them to gRPC status codes."""


class ApexError(Exception):
    """Base class of errors a caller can act on."""


class InvalidArgument(ApexError):
    """A request field is out of range; the message names the field and the limit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(ApexError):
    """An unknown model, request or resource."""


class ResourceExhausted(ApexError):
    """A bounded queue or pool is full."""


class FailedPrecondition(ApexError):
    """The service is not in a state to serve the call (draining, not initialised)."""


class Unavailable(ApexError):
    """A service this call depends on stopped answering (e.g. the cpu_attention_worker mid-step)."""
