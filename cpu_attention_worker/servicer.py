"""gRPC edge of the cpu_attention_worker (control plane only; the data plane is shared memory)."""

import grpc

from apex_serve.v1 import cpu_attention_pb2, cpu_attention_pb2_grpc
from cpu_attention_worker.config import CpuAttentionConfig
from cpu_attention_worker.kernel import kernel_info


class CpuAttentionServicer(cpu_attention_pb2_grpc.CpuAttentionWorkerServicer):
    def __init__(self, config: CpuAttentionConfig) -> None:
        self._config = config

    async def GetKernelInfo(
        self, request: cpu_attention_pb2.GetKernelInfoRequest, context: grpc.aio.ServicerContext
    ) -> cpu_attention_pb2.KernelInfo:
        info = kernel_info()
        return cpu_attention_pb2.KernelInfo(
            isa=info["isa"], num_threads=self._config.num_threads, dtypes=list(info["dtypes"])
        )
