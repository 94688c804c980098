"""Names of the scheduler's trace spans and their attributes: the scheduler_service writes them, the trace report
reads them back. One `apex.iteration` span per engine iteration; on sampled iterations one child span per layer and
subtask, named by its SubtaskKind."""

from apex_serve.types import SubtaskKind

ITERATION_SPAN = "apex.iteration"
SUBTASK_SPANS: dict[SubtaskKind, str] = {kind: kind.value for kind in SubtaskKind}

# on the iteration span: what the scheduler chose
ITERATION_STEP_ID = "apex.iteration.step_id"
ITERATION_MODE = "apex.iteration.mode"
ITERATION_SAMPLED = "apex.iteration.sampled"  # the step recorded per-layer subtask intervals
ITERATION_NUM_PREFILLS = "apex.iteration.num_prefills"
ITERATION_PREFILL_TOKENS = "apex.iteration.prefill_tokens"
ITERATION_GPU_ROWS = "apex.iteration.gpu_rows"
ITERATION_CPU_ROWS = "apex.iteration.cpu_rows"
ITERATION_CPU_SAT_OUT = "apex.iteration.cpu_sat_out"
ITERATION_MEASURED_NS = "apex.iteration.measured_ns"

# on the iteration span: the overlap of CPU attention with accelerator work, from the step's timings
OVERLAP_HIDDEN_RATIO = "apex.overlap.hidden_ratio"
OVERLAP_CPU_ATTENTION_NS = "apex.overlap.cpu_attention_ns"
OVERLAP_HIDDEN_NS = "apex.overlap.hidden_ns"
OVERLAP_DEVICE_IDLE_NS = "apex.overlap.device_idle_ns"
OVERLAP_CPU_IDLE_NS = "apex.overlap.cpu_idle_ns"

# on each subtask span
SUBTASK_KIND = "apex.subtask.kind"
SUBTASK_LANE = "apex.subtask.lane"  # LANE_CPU or LANE_ACCELERATOR
SUBTASK_LAYER = "apex.subtask.layer"
SUBTASK_SUB_BATCH = "apex.subtask.sub_batch"
LANE_CPU = "cpu"
LANE_ACCELERATOR = "accelerator"
