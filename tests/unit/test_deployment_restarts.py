"""Compose and Kubernetes restart a service that fails, as `apex-serve up` does: every container of compose restarts
unless stopped, and every container of the Kubernetes workloads restarts always, with liveness and readiness probes."""

import pytest
from test_deployment_files import OVERLAYS, compose, compose_services, k8s_services


def test_every_compose_service_restarts_unless_stopped_and_has_a_healthcheck() -> None:
    services = compose()["services"]
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", f"compose {name} is not restarted when it fails"
    for name, _ in compose_services().values():
        assert "healthcheck" in services[name], f"compose {name} has no healthcheck"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_k8s_container_restarts_always_and_is_probed_for_liveness_and_readiness(overlay: str) -> None:
    for module, (workload, container, _) in k8s_services(overlay).items():
        spec = workload["spec"]["template"]["spec"]
        assert spec.get("restartPolicy", "Always") == "Always", f"{overlay}: {module}'s pod"
        if container in spec.get("initContainers", []):
            assert container.get("restartPolicy") == "Always", f"{overlay}: sidecar {module} is not restarted"
        for probe in ("livenessProbe", "readinessProbe"):
            assert probe in container, f"{overlay}: {module} has no {probe}"
