"""Domain errors. The one exception interceptor (apex_serve.rpc) maps them to gRPC status codes."""


class ApexError(Exception):
    """Base class of errors a caller can act on. `kind`, when set, names the error across a gRPC edge where its
    status code alone would be ambiguous (apex_serve.rpc sends it as trailing metadata)."""

    kind: str = ""


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


class CpuPoolLost(Unavailable):
    """The gpu_worker lost its cpu_attention_worker during a step: the worker died, or a layer of the CPU rows passed
    its deadline. The gpu_worker dropped the state of every request the step admitted or swapped and of every
    CPU-resident request, undid the step's block growth of the others, and re-attaches a data plane in the
    background; the scheduler requeues the CPU pool's requests for recompute and retries the step's accelerator
    rows."""

    kind = "cpu-pool-lost"


class StepRefused(FailedPrecondition):
    """The gpu_worker refused a plan made ahead of the step before it (StepPlan.planned_ahead) because that step
    failed: the plan assumed its output. The worker's state is as that failed step left it."""

    kind = "step-refused"
