"""Container health check for docker-compose: exits 0 when the gRPC server at ADDRESS reports
SERVING on grpc.health.v1, else 1. Kubernetes needs no script: it probes gRPC health natively.

Usage: python healthcheck.py ADDRESS [TIMEOUT_S]   (ADDRESS: unix:///run/apex/x.sock or host:port)
"""

import logging
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger("healthcheck")


def serving(address: str, timeout_s: float) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            logger.error("%s: %s", address, exc.code().name)
            return False
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        logger.error("%s: %s", address, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        return False
    return True


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if len(argv) not in (1, 2):
        logger.error("usage: healthcheck.py ADDRESS [TIMEOUT_S]")
        return 2
    return 0 if serving(argv[0], float(argv[1]) if len(argv) == 2 else 3.0) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
