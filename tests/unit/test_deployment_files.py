"""Offline checks of the deployment files (DESIGN §9): docker-compose.yml against the compose spec,
the Kustomize overlays rendered and validated against the Kubernetes schemas, and the promise
that compose, Kubernetes and the local launcher start the same services with the same flags.
No Docker engine and no cluster are needed."""

import base64
import dataclasses
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from apex_serve import tracing
from apex_tools.launcher import Stack, StackConfig
from gateway.config import API_KEYS_ENV

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "deploy" / "compose" / "docker-compose.gpu.yml"
OVERLAYS = ("cpu", "nvidia")
K8S_VERSION = "1.31.0"  # the manifests need >= 1.29 (native sidecars); validate against a release past that

# Flags whose values may differ between the launcher, compose and Kubernetes; every other flag
# must carry the same value everywhere.
DEPLOYMENT_SPECIFIC_FLAGS = {
    # Where a service listens or dials: Unix sockets under .apex-run locally, in a shared volume in
    # compose; TCP in Kubernetes, where kubelet's gRPC probes need a port on the pod IP.
    "--address": "listen address",
    "--worker-address": "dials the gpu_worker",
    "--cpu-worker-address": "dials the cpu_attention_worker",
    "--gpu-worker-address": "dials the gpu_worker",
    "--profiler-address": "dials the profiler",
    "--scheduler-address": "dials the scheduler(s); a list of replicas in Kubernetes",
    "--metrics-address": "Prometheus port: 127.0.0.1 locally, 0.0.0.0 where Prometheus scrapes from outside",
    "--http-address": "gateway HTTP port, same reason",
    "--model-dir": "models/ in a checkout, baked into the image at /models",
    "--profile-dir": ".apex-profiles in a checkout, a volume in containers",
    "--api-keys-file": "a secret's file, given at deploy time",
}

# Who dials whom: (client module, flag) -> server module. Compose and the pods must wire these
# to where the server really listens.
DIALS = {
    ("gpu_worker", "--cpu-worker-address"): "cpu_attention_worker",
    ("profiler_service", "--gpu-worker-address"): "gpu_worker",
    ("profiler_service", "--cpu-worker-address"): "cpu_attention_worker",
    ("scheduler_service", "--worker-address"): "gpu_worker",
    ("scheduler_service", "--profiler-address"): "profiler_service",
    ("gateway", "--scheduler-address"): "scheduler_service",
}

# What each service waits for before it serves (gpu_worker attaches to the cpu_attention_worker,
# the scheduler waits for the worker and the profiler, the gateway for the scheduler).
STARTS_AFTER = {
    "gpu_worker": {"cpu_attention_worker"},
    "scheduler_service": {"gpu_worker", "profiler_service"},
    "gateway": {"scheduler_service"},
}

# The metric names the services export (scheduler --metrics-address and gateway /metrics). A
# histogram is queried through its _bucket, _sum and _count series, never by its bare name.
HISTOGRAMS = {
    "apex_time_to_first_token_seconds", "apex_inter_token_latency_seconds", "apex_e2e_request_latency_seconds",
    "apex_request_queue_time_seconds", "apex_iteration_overlap_ratio", "apex_iteration_duration_seconds",
}
COUNTERS_AND_GAUGES = {
    "apex_prompt_tokens_total", "apex_generation_tokens_total", "apex_request_success_total",
    "apex_iterations_total", "apex_num_preemptions_total", "apex_cpu_attention_seconds_total",
    "apex_cpu_attention_hidden_seconds_total", "apex_device_idle_seconds_total", "apex_cpu_idle_seconds_total",
    "apex_num_requests_running", "apex_num_requests_waiting", "apex_kv_cache_usage_perc", "apex_cost_model_mape",
    "apex_http_requests_total", "apex_requests_in_flight", "apex_http_prompt_tokens_total",
    "apex_http_generation_tokens_total",
}
ENGINE_JOB = "apex-replica"  # the scheduler's scrape job in compose and Kubernetes alike
SERIES = {
    **{name: name for name in COUNTERS_AND_GAUGES},
    **{h + suffix: h for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")},
}  # series name -> metric name

Flags = dict[str, str]


def _parse_flags(tokens: list[str], where: str) -> Flags:
    """`--name=value` or `--name value` pairs (every service flag takes a value)."""
    flags: Flags = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        assert token.startswith("--"), f"{where}: expected a --flag, got {token!r} in {tokens}"
        if "=" in token:
            name, value = token.split("=", 1)
            i += 1
        else:
            assert i + 1 < len(tokens), f"{where}: {token} has no value"
            name, value = token, tokens[i + 1]
            i += 2
        assert name not in flags, f"{where}: {name} given twice"
        flags[name] = value
    return flags


def _module_and_flags(argv: list[str], where: str) -> tuple[str, Flags]:
    assert argv[:2] == ["python", "-m"], f"{where}: expected `python -m MODULE ...`, got {argv[:3]}"
    return argv[2], _parse_flags(argv[3:], where)


@functools.cache
def launcher_services() -> dict[str, Flags]:
    return {module: _parse_flags(args, f"launcher {module}") for module, _, args in Stack(StackConfig()).commands()}


def _load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@functools.cache
def compose() -> dict:
    return _load_yaml(COMPOSE)


@functools.cache
def compose_services() -> dict[str, tuple[str, Flags]]:
    """module -> (compose service name, flags), for the services that run an apex-serve module."""
    found = {}
    for name, service in compose()["services"].items():
        command = service.get("command")
        if command is None:
            continue
        argv = shlex.split(command) if isinstance(command, str) else command
        if argv[0] != "python":  # the data-plane holder runs no module
            continue
        module, flags = _module_and_flags(argv, f"compose service {name}")
        found[module] = (name, flags)
    return found


@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the Kustomize overlays")
    result = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def _docs(overlay: str, kind: str) -> list[dict]:
    return [d for d in rendered(overlay) if d["kind"] == kind]


def _one(overlay: str, kind: str) -> dict:
    (doc,) = _docs(overlay, kind)
    return doc


def _env_value(overlay: str, item: dict) -> str | None:
    if "value" in item:
        return item["value"]
    ref = item.get("valueFrom", {})
    if "configMapKeyRef" in ref:
        key = ref["configMapKeyRef"]
        (cm,) = [d for d in _docs(overlay, "ConfigMap") if d["metadata"]["name"] == key["name"]]
        return cm["data"][key["key"]]
    if "secretKeyRef" in ref:
        key = ref["secretKeyRef"]
        (secret,) = [d for d in _docs(overlay, "Secret") if d["metadata"]["name"] == key["name"]]
        return base64.b64decode(secret["data"][key["key"]]).decode()
    return None  # fieldRef: known only in a running pod


def _container_argv(overlay: str, container: dict) -> list[str]:
    """command + args with $(VAR) expanded as kubelet does, from the container's env."""
    env = {item["name"]: _env_value(overlay, item) for item in container.get("env", [])}

    def expand(arg: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)] if env.get(m.group(1)) is not None else m.group(0), arg)

    return [expand(a) for a in [*container.get("command", []), *container.get("args", [])]]


def _pod_containers(workload: dict) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


@functools.cache
def k8s_services(overlay: str) -> dict[str, tuple[dict, dict, Flags]]:
    """module -> (workload, container, flags) for every container that runs an apex-serve module."""
    found = {}
    for workload in [*_docs(overlay, "StatefulSet"), *_docs(overlay, "Deployment")]:
        for container in _pod_containers(workload):
            where = f"{workload['kind']} {workload['metadata']['name']} container {container['name']}"
            module, flags = _module_and_flags(_container_argv(overlay, container), where)
            found[module] = (workload, container, flags)
    return found


def _deployment(which: str) -> dict[str, Flags]:
    if which == "compose":
        return {m: flags for m, (_, flags) in compose_services().items()}
    return {m: flags for m, (_, _, flags) in k8s_services(which.removeprefix("k8s-")).items()}


DEPLOYMENTS = ("compose", *(f"k8s-{o}" for o in OVERLAYS))


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _reaches(dialed: str, listening: str) -> bool:
    """A Unix socket must be the same path; TCP the same port on a host the server listens on."""
    if dialed.startswith("unix://") or listening.startswith("unix://"):
        return dialed == listening
    host = listening.rsplit(":", 1)[0]
    return _port(dialed) == _port(listening) and host in ("0.0.0.0", dialed.rsplit(":", 1)[0])


def _size_bytes(size: str) -> int:
    """Compose sizes (512m, 1g) and Kubernetes quantities (512Mi, 1Gi) as bytes."""
    number, unit = re.fullmatch(r"(\d+)([a-zA-Z]*)", str(size)).groups()  # type: ignore[union-attr]
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[unit]
    return int(number) * scale


# --- schemas -----------------------------------------------------------------------------------


def test_compose_files_validate_against_the_compose_spec() -> None:
    check = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run([str(check), "--builtin-schema", "vendor.compose-spec", str(COMPOSE), str(COMPOSE_GPU)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_overlay_renders_documents_valid_for_kubernetes(overlay: str) -> None:
    docs = rendered(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: not in the Kubernetes schemas, checked by the ServiceMonitor test below
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"overlays/{overlay}: {doc['kind']} {doc['metadata']['name']} is invalid: {exc.message}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitors_scrape_the_scheduler_metrics_and_gateway_http_ports(overlay: str) -> None:
    monitors = _docs(overlay, "ServiceMonitor")
    services = _docs(overlay, "Service")
    scraped = set()
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["name"]
        labels = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [s for s in services if labels.items() <= s["metadata"].get("labels", {}).items()]
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert monitor["spec"]["endpoints"], f"ServiceMonitor {monitor['metadata']['name']} has no endpoints"
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in ports, f"{service['metadata']['name']} has no port named {endpoint['port']}"
            scraped.add(ports[endpoint["port"]]["port"])
        # Targets carry job=<Service name>; the dashboard selects the engine's by it (as compose's Prometheus names it).
        assert "jobLabel" not in monitor["spec"]
        if service["spec"]["selector"]["app.kubernetes.io/component"] == "replica":
            assert service["metadata"]["name"] == ENGINE_JOB
    flags = _deployment(f"k8s-{overlay}")
    assert _port(flags["scheduler_service"]["--metrics-address"]) in scraped
    assert _port(flags["gateway"]["--http-address"]) in scraped


# --- the same services with the same flags everywhere --------------------------------------------


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_deployment_runs_the_launchers_services_with_the_same_flag_names(deployment: str) -> None:
    launcher, deployed = launcher_services(), _deployment(deployment)
    assert set(deployed) == set(launcher), f"{deployment} runs other services than `apex-serve up`"
    for module, flags in launcher.items():
        assert set(deployed[module]) == set(flags), (
            f"{deployment} {module}: missing {sorted(set(flags) - set(deployed[module]))}, "
            f"extra {sorted(set(deployed[module]) - set(flags))} compared with the launcher")


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_deployment_flag_values_equal_the_launchers_except_addresses_and_paths(deployment: str) -> None:
    deployed = _deployment(deployment)
    for module, flags in launcher_services().items():
        for name, value in flags.items():
            if name not in DEPLOYMENT_SPECIFIC_FLAGS and name in deployed.get(module, {}):
                assert deployed[module][name] == value, (
                    f"{deployment} {module} {name}={deployed[module][name]!r}, the launcher passes {value!r}")


@pytest.mark.parametrize("deployment", ("launcher", *DEPLOYMENTS))
def test_every_client_dials_the_address_its_server_listens_on(deployment: str) -> None:
    services = launcher_services() if deployment == "launcher" else _deployment(deployment)
    for (client, flag), server in DIALS.items():
        listening = services[server]["--address"]
        for dialed in services[client][flag].split(","):
            assert _reaches(dialed, listening), (
                f"{deployment}: {client} {flag}={dialed}, {server} listens on {listening}")
            if deployment.startswith("k8s-") and dialed.startswith(("127.0.0.1:", "localhost:")):
                pods = k8s_services(deployment.removeprefix("k8s-"))
                assert pods[client][0] is pods[server][0], (
                    f"{deployment}: {client} dials {server} on loopback from another pod")


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_api_keys_reach_the_gateway_in_its_environment_never_its_command_line(deployment: str) -> None:
    if deployment == "compose":
        name, _ = compose_services()["gateway"]
        service = compose()["services"][name]
        command, env_keys = str(service["command"]), service["environment"][API_KEYS_ENV]
        assert env_keys == f"${{{API_KEYS_ENV}:-}}", f"compose {name}: {API_KEYS_ENV} must come from the host"
    else:
        overlay = deployment.removeprefix("k8s-")
        _, container, _ = k8s_services(overlay)["gateway"]
        command = " ".join([*container.get("command", []), *container.get("args", [])])
        (item,) = [e for e in container["env"] if e["name"] == API_KEYS_ENV]
        assert "secretKeyRef" in item["valueFrom"] and _env_value(overlay, item) == "", (
            f"{deployment}: {API_KEYS_ENV} must come from the (empty by default) apex-api-keys Secret")
    assert API_KEYS_ENV not in command, f"{deployment}: the API keys are expanded into the gateway's command line"


# --- docker-compose ------------------------------------------------------------------------------


def test_compose_depends_on_is_health_gated_and_follows_the_start_order() -> None:
    services = compose()["services"]
    name_of = {module: name for module, (name, _) in compose_services().items()}
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            assert isinstance(how, dict) and how.get("condition") == "service_healthy", (
                f"compose {name} depends_on {dependency} is not gated on service_healthy")
            assert "healthcheck" in services[dependency], f"compose {dependency} has no healthcheck to gate on"
    for module, after in STARTS_AFTER.items():
        dependencies = set(services[name_of[module]].get("depends_on", {})) - {"data-plane"}
        assert dependencies == {name_of[m] for m in after}, (
            f"compose {name_of[module]} must start after {sorted(name_of[m] for m in after)}")


def test_compose_healthchecks_probe_each_services_own_grpc_address() -> None:
    services = compose()["services"]
    for name, flags in compose_services().values():
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "/opt/apex/healthcheck.py"], f"compose {name} healthcheck: {test}"
        assert _reaches(test[3], flags["--address"]), (
            f"compose {name} checks {test[3]}, listens on {flags['--address']}")


def test_compose_workers_share_ipc_and_pid_of_a_holder_neither_worker_takes_down_and_shm_holds_the_cpu_kv_pool(
) -> None:
    services = compose()["services"]
    cpu_name, cpu_flags = compose_services()["cpu_attention_worker"]
    gpu_name, _ = compose_services()["gpu_worker"]
    holder = services["data-plane"]
    for worker in (cpu_name, gpu_name):
        assert services[worker]["ipc"] == "service:data-plane" and services[worker]["pid"] == "service:data-plane"
    assert holder["ipc"] == "shareable" and holder["restart"] == "unless-stopped"
    assert "python" not in holder["command"], "the holder runs no service: a crash of a worker must not end it"
    shm = _size_bytes(holder["shm_size"])
    assert shm > int(cpu_flags["--kv-budget-bytes"]), f"shm_size {shm} B cannot hold the CPU KV pool and staging"


def test_compose_gpu_override_reserves_one_nvidia_gpu_for_the_gpu_worker_only() -> None:
    gpu_name, _ = compose_services()["gpu_worker"]
    assert all("deploy" not in s for s in compose()["services"].values()), "the base must run on CPU-only hosts"
    override = _load_yaml(COMPOSE_GPU)["services"]
    assert set(override) == {gpu_name}
    (device,) = override[gpu_name]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    assert override[gpu_name]["build"]["args"]["VARIANT"] == "cuda"


def test_compose_tracing_goes_through_the_collector_to_jaegers_otlp_port() -> None:
    services = compose()["services"]
    collector = _load_yaml(ROOT / "deploy" / "otel-collector" / "config.yaml")
    exporter_types = {name.split("/")[0] for name in collector["exporters"]}
    assert "jaeger" not in exporter_types, "the collector's `jaeger` exporter was removed: export OTLP to Jaeger"
    exporters = collector["service"]["pipelines"]["traces"]["exporters"]
    assert exporters and all(e.split("/")[0] == "otlp" for e in exporters)
    for exporter in exporters:
        host, port = collector["exporters"][exporter]["endpoint"].rsplit(":", 1)
        assert host in services and port == "4317", f"{exporter} must point at a compose service's OTLP gRPC port"
        assert services[host]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    receiver_port = _port(collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
    for name, _ in compose_services().values():
        environment = services[name]["environment"]
        assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{receiver_port}", name
        assert environment["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc", name


def test_compose_and_k8s_name_each_service_in_traces_as_the_service_itself_does() -> None:
    """OTEL_SERVICE_NAME overrides the name a service gives itself; trace-report and Jaeger queries use those."""
    services = compose()["services"]
    for module, (name, _) in compose_services().items():
        assert services[name]["environment"]["OTEL_SERVICE_NAME"] == tracing.SERVICE_NAMES[module], name
    for overlay in OVERLAYS:
        for module, (_, container, _) in k8s_services(overlay).items():
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("OTEL_SERVICE_NAME") == tracing.SERVICE_NAMES[module], f"{overlay}: {container['name']}"


def test_prometheus_scrapes_the_scheduler_metrics_port_and_the_gateway() -> None:
    prometheus = _load_yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")
    jobs = {
        t: job["job_name"] for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    scheduler, scheduler_flags = compose_services()["scheduler_service"]
    gateway, gateway_flags = compose_services()["gateway"]
    assert jobs.get(f"{scheduler}:{_port(scheduler_flags['--metrics-address'])}") == ENGINE_JOB
    assert f"{gateway}:{_port(gateway_flags['--http-address'])}" in jobs


def test_grafana_dashboard_queries_only_exported_metrics_and_has_the_key_panels() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "apex-serve.json").read_text())
    datasources = _load_yaml(ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "datasources.yml")
    uids = {d["uid"] for d in datasources["datasources"]}
    assert {d["type"] for d in datasources["datasources"]} >= {"prometheus", "jaeger"}
    used = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids, f"panel {panel['title']!r}: unknown datasource"
        for target in panel["targets"]:
            for name in re.findall(r"\bapex_\w+", target["expr"]):
                assert name in SERIES, f"panel {panel['title']!r} queries {name}, which no service exports"
                used.add(SERIES[name])
    for metric in ("apex_iteration_overlap_ratio", "apex_time_to_first_token_seconds",
                   "apex_inter_token_latency_seconds", "apex_generation_tokens_total", "apex_iterations_total",
                   "apex_kv_cache_usage_perc"):
        assert metric in used, f"the dashboard has no panel on {metric}"


def test_compose_healthcheck_script_reports_serving_and_not_serving(tmp_path: Path) -> None:
    script = ROOT / "deploy" / "docker" / "healthcheck.py"
    address = f"unix://{tmp_path / 'health.sock'}"
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    server.start()

    def check(target: str) -> int:
        return subprocess.run([sys.executable, str(script), target, "2"], check=False, capture_output=True,
                              timeout=30).returncode

    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check(address) == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check(address) == 1
        assert check(f"unix://{tmp_path / 'nobody.sock'}") == 1
    finally:
        server.stop(None)


# --- the image -----------------------------------------------------------------------------------


def test_dockerfile_pins_torch_builds_both_variants_and_ships_what_compose_uses() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in dockerfile
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", dockerfile, re.MULTILINE)
    assert "ARG CUDA_IMAGE=nvidia/cuda:" in dockerfile
    assert '[cuda]' in dockerfile, "the CUDA variant installs the `cuda` extra"
    torch_installs = [line for line in dockerfile.splitlines() if "pip install" in line and "torch" in line]
    assert torch_installs and all('"torch==2.13.0"' in line for line in torch_installs)
    assert not re.search(r"index-url|find-links|download\.pytorch", dockerfile), "no package index in the project"
    assert "COPY deploy/docker/healthcheck.py /opt/apex/healthcheck.py" in dockerfile
    model_dirs = {flags["--model-dir"] for _, flags in compose_services().values() if "--model-dir" in flags}
    assert model_dirs == {"/models/apex-tiny-llama"}
    assert "make-model --preset default --out /models/apex-tiny-llama" in dockerfile
    cmd = json.loads(re.search(r"^CMD (\[.*?\])", dockerfile.replace("\\\n", ""), re.MULTILINE | re.DOTALL).group(1))
    assert cmd[:2] == ["apex-serve", "up"], "run alone, the image starts the whole stack"
    stack_flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(StackConfig)}
    assert set(_parse_flags(cmd[2:], "Dockerfile CMD")) <= stack_flags
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "models", "bench_results", ".apex-*"} <= ignored


# --- Kubernetes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_replica_pod_shares_a_memory_backed_dev_shm_and_its_pids(overlay: str) -> None:
    services = k8s_services(overlay)
    pod_modules = ("scheduler_service", "gpu_worker", "cpu_attention_worker")
    workload = services["scheduler_service"][0]
    assert all(services[m][0] is workload for m in pod_modules), f"{pod_modules} must run in one pod"
    spec = workload["spec"]["template"]["spec"]
    assert spec["shareProcessNamespace"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    for module in ("gpu_worker", "cpu_attention_worker"):
        (mount,) = [m for m in services[module][1]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        shm = volumes[mount["name"]]["emptyDir"]
        assert shm["medium"] == "Memory", f"{module}: /dev/shm must be memory-backed"
        assert _size_bytes(shm["sizeLimit"]) > int(services["cpu_attention_worker"][2]["--kv-budget-bytes"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_probes_check_grpc_health_on_each_containers_listen_port(overlay: str) -> None:
    for module, (_, container, flags) in k8s_services(overlay).items():
        address = flags["--address"]
        assert address.startswith("0.0.0.0:"), f"{module} listens on {address}: kubelet probes dial the pod IP"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == _port(address), f"{module} {probe}"
        assert container["resources"]["requests"], f"{module} has no resource requests"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_gateway_lists_every_replicas_scheduler(overlay: str) -> None:
    replicas = _one(overlay, "StatefulSet")
    name, headless = replicas["metadata"]["name"], replicas["spec"]["serviceName"]
    (service,) = [s for s in _docs(overlay, "Service") if s["metadata"]["name"] == headless]
    assert service["spec"]["clusterIP"] == "None", "per-pod DNS names need a headless Service"
    assert service["spec"]["selector"].items() <= replicas["spec"]["template"]["metadata"]["labels"].items()
    port = _port(k8s_services(overlay)["scheduler_service"][2]["--address"])
    listed = k8s_services(overlay)["gateway"][2]["--scheduler-address"].split(",")
    assert listed == [f"{name}-{i}.{headless}:{port}" for i in range(replicas["spec"]["replicas"])]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_disruption_budgets_cover_the_replicas_and_the_gateway(overlay: str) -> None:
    budgets = _docs(overlay, "PodDisruptionBudget")
    for workload in [_one(overlay, "StatefulSet"), _one(overlay, "Deployment")]:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert any(b["spec"]["selector"]["matchLabels"].items() <= labels.items() for b in budgets), (
            f"no PodDisruptionBudget selects {workload['kind']} {workload['metadata']['name']}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_only_the_nvidia_overlay_gives_the_gpu_worker_a_gpu_and_the_cuda_image(overlay: str) -> None:
    containers = {m: c for m, (_, c, _) in k8s_services(overlay).items()}
    gpu_worker = containers.pop("gpu_worker")
    if overlay == "nvidia":
        assert gpu_worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert gpu_worker["image"].endswith(":cuda")
    else:
        assert "nvidia.com/gpu" not in gpu_worker["resources"].get("limits", {})
        assert gpu_worker["image"].endswith(":cpu")
    for module, container in containers.items():
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {}), f"{module} must not hold a GPU"
        assert container["image"].endswith(":cpu"), f"{module} needs no CUDA image"
