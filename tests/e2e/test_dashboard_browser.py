"""The /dashboard page rendered by a real headless Chromium: the numbers its script fills in from
/dashboard/data (mode mix, overlap, tokens/s, KV use of both pools, queues) and the SVG timeline of the
latest sampled iteration. First over fabricated stats of two replicas (one down), then over a live apex
stack whose small accelerator pool spills requests to the CPU."""

import asyncio
import re
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from PIL import Image

from apex_serve import convert, rpc
from apex_serve.types import SamplingParams, WorkerInfo
from apex_serve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, gpu_worker_pb2, scheduler_pb2
from apex_tools.launcher import Stack, StackConfig
from gateway.config import GatewayConfig
from gateway.generation import Generator
from gateway.http_api.server import HttpServer
from gateway.replicas import Replica, Replicas

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="no chromium on PATH (`apt-get install chromium`, or scripts/setup.sh --dev as root)"
    ),
]
KEY = "dash-key"
WINDOW = (1280, 1000)
SIZE = f"--window-size={WINDOW[0]},{WINDOW[1]}"
COLORS = {"device_linear": (0x4E, 0x79, 0xA7), "cpu_attention": (0xE1, 0x57, 0x59)}  # the page's lane colours
PERCENT = re.compile(r"^(\d+(?:\.\d)?)%$")


async def _chromium_run(url: str, *flags: str) -> tuple[str, str]:
    """Loads the page, lets its script poll for ~3 s of virtual time, and returns stdout and stderr (where
    the page's console messages go, Content Security Policy violations among them)."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", "--virtual-time-budget=3000",
            *flags, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()[-2000:]
    return out.decode(), err.decode()


def _csp_violations(console: str) -> list[str]:
    return [line for line in console.splitlines() if "CONSOLE" in line and "Content Security Policy" in line]


async def _chromium(url: str, *flags: str) -> str:
    """Loads the page as _chromium_run does, checks that nothing on it broke its Content Security Policy,
    and returns stdout."""
    out, err = await _chromium_run(url, *flags)
    assert not _csp_violations(err), _csp_violations(err)
    return out


def _status(dom: str) -> str:
    match = re.search(r'<span id="status"[^>]*>(.*?)</span>', dom)
    assert match, "no status line"
    return match.group(1)


def _sections(dom: str) -> list[str]:
    """The rendered replica sections, in order (from the page's main element, not its script)."""
    match = re.search(r'<main id="replicas">(.*?)</main>', dom, re.S)
    assert match, "no main element"
    return match.group(1).split('<section class="replica"')[1:]


def _metrics(section: str) -> dict[str, str]:
    """The text of each data-metric element (tags inside it removed)."""
    found = re.findall(r'data-metric="(\w+)"[^>]*>(.*?)</(?:div|td|span|p)>', section, re.S)
    return {name: re.sub(r"<[^>]+>", "", text).strip() for name, text in found}


def _lanes(section: str) -> dict[str, list[str]]:
    """The timeline's lanes and the subtask kinds drawn on each."""
    lanes = re.findall(r'<g class="lane" data-lane="(\w+)">(.*?)</g>', section, re.S)
    return {lane: re.findall(r'<rect class="st (\w+)', body) for lane, body in lanes}


def _gaps(section: str) -> tuple[list[str], list[str]]:
    """The causes of the shaded idle stretches on the accelerator lane, in drawing order, and of the named ones."""
    return (re.findall(r'<rect class="gap \w+" data-cause="(\w+)"', section),
            re.findall(r'<text class="gap-label" data-cause="(\w+)"', section))


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _ratio(text: str) -> float:
    match = PERCENT.match(text)
    assert match, f"not a percentage: {text!r}"
    value = float(match.group(1)) / 100
    assert 0.0 <= value <= 1.0, text
    return value


def _check_png(path: Path) -> Image.Image:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "the screenshot is not a PNG"
    assert struct.unpack(">II", data[16:24]) == WINDOW, "the screenshot is not of the window size"
    image = Image.open(path).convert("RGB")
    image.load()
    return image


# Fabricated stats: every field the page shows, a replica that does not answer, and one that ran nothing.

T0 = 1_700_000_000_000_000_000


def _subtask(kind: int, layer: int, start_us: int, end_us: int) -> gpu_worker_pb2.Subtask:
    return gpu_worker_pb2.Subtask(
        kind=kind, layer=layer, start_unix_ns=T0 + start_us * 1000, end_unix_ns=T0 + end_us * 1000
    )


def _fabricated_stats() -> scheduler_pb2.SchedulerStats:
    subtasks = []
    for layer in range(4):
        base = 1000 * layer
        subtasks += [
            _subtask(gpu_worker_pb2.SUBTASK_KIND_DEVICE_LINEAR, layer, base, base + 400),
            _subtask(gpu_worker_pb2.SUBTASK_KIND_STAGING, layer, base + 400, base + 450),
            _subtask(gpu_worker_pb2.SUBTASK_KIND_DEVICE_ATTENTION, layer, base + 450, base + 800),
            _subtask(gpu_worker_pb2.SUBTASK_KIND_CPU_ATTENTION, layer, base + 450, base + 900),
        ]
    overlap = scheduler_pb2.Overlap(hidden_ratio=0.78, cpu_attention_ns=1_800_000, hidden_ns=1_404_000)
    recent = [
        scheduler_pb2.IterationStats(step_id=i, mode=common_pb2.EXECUTION_MODE_GPU_ONLY, gpu_rows=4)
        for i in range(2)
    ] + [
        scheduler_pb2.IterationStats(
            step_id=i, mode=common_pb2.EXECUTION_MODE_ASYNC_OVERLAP, gpu_rows=4, cpu_rows=3,
            overlap=scheduler_pb2.Overlap(hidden_ratio=0.5 + 0.2 * (i % 2), cpu_attention_ns=1000),
        )
        for i in range(2, 6)
    ]
    return scheduler_pb2.SchedulerStats(
        policy="apex", num_running=7, num_running_cpu=3, num_waiting=2, num_free_blocks=3, num_total_blocks=12,
        num_free_cpu_blocks=3000, num_total_cpu_blocks=4096, num_steps=40, num_finished=11, tokens_per_s=321.5,
        iterations_by_mode={"gpu_only": 10, "async_overlap": 30}, recent_iterations=recent,
        latest_timeline=scheduler_pb2.IterationTimeline(
            step_id=36, mode=common_pb2.EXECUTION_MODE_ASYNC_OVERLAP, start_unix_ns=T0, end_unix_ns=T0 + 4_000_000,
            subtasks=subtasks, overlap=overlap,
        ),
    )


IDLE = scheduler_pb2.SchedulerStats(policy="gpu-only", num_free_blocks=64, num_total_blocks=64)  # nothing ran yet


class StatsStub:
    """Stands in for a scheduler stub: GetStats answers `stats`, or fails UNAVAILABLE when it is None."""

    def __init__(self, stats: scheduler_pb2.SchedulerStats | None) -> None:
        self.stats = stats

    async def GetStats(self, request: scheduler_pb2.GetStatsRequest, timeout: float) -> scheduler_pb2.SchedulerStats:
        if self.stats is None:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
        return self.stats


@pytest.fixture
async def fabricated(default_model_dir: Path, tmp_path: Path) -> AsyncIterator[str]:
    keys = tmp_path / "api-keys"
    keys.write_text(KEY)
    keys.chmod(0o600)
    config = GatewayConfig(model_dir=str(default_model_dir), http_address="127.0.0.1:0", api_keys_file=str(keys))
    replicas = Replicas([
        Replica("unix:///run/a.sock", StatsStub(_fabricated_stats())),  # type: ignore[arg-type]
        Replica("unix:///run/b.sock", StatsStub(None), serving=False),  # type: ignore[arg-type]
        Replica("unix:///run/c.sock", StatsStub(IDLE)),  # type: ignore[arg-type]
    ])
    worker = WorkerInfo("m", 4, 259, 256, (1,), 16, 12, "cpu", "float32")
    generator = Generator.for_config(config, worker, replicas, "fabricated")
    server = HttpServer(generator, config)
    await server.start()
    yield f"http://127.0.0.1:{server.port}"
    await server.stop()


async def test_the_page_renders_fabricated_stats_of_two_replicas(fabricated: str, tmp_path: Path) -> None:
    async with httpx.AsyncClient(base_url=fabricated, timeout=10) as c:
        page = await c.get("/dashboard")
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "<script>" not in page.text and "<style>" not in page.text
        assert (page.headers["x-frame-options"], page.headers["x-content-type-options"]) == ("DENY", "nosniff")
        script, style = await c.get("/dashboard/app.js"), await c.get("/dashboard/app.css")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
        assert (await c.get("/dashboard/data")).status_code == 401, "the data must need the API key"
        data = (await c.get("/dashboard/data", headers={"authorization": f"Bearer {KEY}"})).json()
    assert data["replicas"][0]["stats"]["overlap"]["recent_hidden_ratio"] == pytest.approx(0.6)

    locked = await _chromium(f"{fabricated}/dashboard", "--dump-dom")
    assert _status(locked) == "API key needed" and '<form id="auth">' in locked and not _sections(locked)

    dom = await _chromium(f"{fabricated}/dashboard#key={KEY}", "--dump-dom")
    assert _status(dom).startswith("updated "), _status(dom)
    up, down, idle = _sections(dom)
    m = _metrics(up)
    assert (m["mode_gpu_only"], m["mode_async_overlap"], m["mode_asym_pipeline"]) == ("10", "30", "0")
    assert (m["recent_gpu_only"], m["recent_async_overlap"]) == ("2", "4")
    assert (m["overlap_recent"], m["overlap_latest"], m["timeline_hidden"]) == ("60.0%", "78.0%", "78.0%")
    assert (m["tokens_per_s"], m["running"], m["running_cpu"]) == ("321.5", "7 · 2", "3")
    assert (m["kv_accelerator"], m["kv_cpu"]) == ("75.0%", "26.8%")
    assert "9 / 12 blocks" in up and "1,096 / 4,096 blocks" in up
    lanes = _lanes(up)
    assert set(lanes) == {"accelerator", "cpu"}
    assert sorted(set(lanes["accelerator"])) == ["device_attention", "device_linear", "staging"]
    assert lanes["cpu"] == ["cpu_attention"] * 4 and len(lanes["accelerator"]) == 12
    assert "4 ms" in up, "the time axis has no ms ticks"
    # per layer: staging 400-450 µs, the wait 800-1000 for the CPU's attention ending at 900; the last layer's
    # CPU attention is the step's last subtask (3900), then 0.1 ms of step overhead to the step's end at 4 ms
    assert _gaps(up) == (["staging", "waiting_for_cpu"] * 4 + ["step_overhead"],
                         ["staging", "waiting_for_cpu", "step_overhead"])
    assert m["timeline_gaps"] == "waiting for the CPU 0.70 ms · staging 0.20 ms · scheduling / step overhead 0.10 ms"
    assert _metrics(down)["serving"] == "NOT SERVING" and "no stats: UNAVAILABLE: gone" in down
    m = _metrics(idle)
    assert (m["overlap_recent"], m["overlap_latest"], m["kv_accelerator"], m["kv_cpu"]) == ("–", "–", "0.0%", "–")
    assert m["timeline"] == "no sampled iteration yet" and "no hybrid iteration yet" in idle and not _lanes(idle)

    shot = tmp_path / "fabricated.png"
    await _chromium(f"{fabricated}/dashboard#key={KEY}", f"--screenshot={shot}", SIZE)
    colors = {color for _, color in _check_png(shot).getcolors(WINDOW[0] * WINDOW[1])}
    assert set(COLORS.values()) <= colors, "the timeline's lanes are not on the screenshot"


async def test_the_console_check_sees_a_csp_violation() -> None:
    """The check every page load above passes would fail on a page whose policy blocks its inline script."""
    page = "data:text/html,<meta http-equiv='Content-Security-Policy' content=\"script-src 'self'\"><script>1</script>"
    _, err = await _chromium_run(page, "--dump-dom")
    assert _csp_violations(err), err[-2000:]


# A live apex stack.


@pytest.fixture(scope="module")
def apex_stack(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """12 accelerator blocks: most of 16 concurrent requests live in the CPU pool. The profile is stored
    under the default profile dir, as in test_stack_e2e, so only the first run ever profiles (~45 s)."""
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(KEY)
    keys.chmod(0o600)
    config = StackConfig(
        model_dir=str(default_model_dir), port=rpc.free_tcp_port(), http_port=rpc.free_tcp_port(),
        run_dir=tempfile.mkdtemp(prefix="apx-", dir="/tmp"), num_kv_blocks=12, policy="apex", metrics_port=0,
        sample_layers_every=4, api_keys_file=str(keys),
    )
    with Stack(config) as stack:
        yield stack


async def _generate(address: str, i: int) -> None:
    sampling = SamplingParams(temperature=0.0, max_tokens=160, ignore_eos=True)
    request = gateway_pb2.GenerateRequest(
        prompt=f"Dashboard {i}: " + "x" * (8 * i), sampling=convert.sampling_to_pb(sampling)
    )
    async with grpc.aio.insecure_channel(address) as channel:
        async for _ in gateway_pb2_grpc.GatewayStub(channel).Generate(
            request, metadata=(("authorization", f"Bearer {KEY}"),)
        ):
            pass


async def _wait_for_hybrid_iterations(url: str) -> dict:
    """The stats once CPU requests run, hybrid iterations ran, and a hybrid iteration was sampled."""
    async with httpx.AsyncClient(timeout=10, headers={"authorization": f"Bearer {KEY}"}) as c:
        for _ in range(120):
            stats = (await c.get(f"{url}/dashboard/data")).json()["replicas"][0]["stats"]
            timeline = stats["timeline"]
            if stats["num_running_cpu"] and timeline and timeline["mode"] != "gpu_only":
                return stats
            await asyncio.sleep(0.25)
    raise AssertionError(f"no sampled hybrid iteration while requests ran on the CPU: {stats}")


async def test_the_page_shows_a_live_apex_stack_with_requests_on_the_cpu(apex_stack: Stack, tmp_path: Path) -> None:
    url = f"http://{apex_stack.config.http_address}"
    requests = [asyncio.create_task(_generate(apex_stack.config.gateway_address, i)) for i in range(16)]
    try:
        await _wait_for_hybrid_iterations(url)
        dom = await _chromium(f"{url}/dashboard#key={KEY}", "--dump-dom")
        shot = tmp_path / "live.png"
        await _chromium(f"{url}/dashboard#key={KEY}", f"--screenshot={shot}", SIZE)
    finally:
        for task in requests:
            task.cancel()
        await asyncio.gather(*requests, return_exceptions=True)
    assert _status(dom).startswith("updated "), _status(dom)
    (section,) = _sections(dom)
    m = _metrics(section)
    assert _number(m["mode_async_overlap"]) + _number(m["mode_asym_pipeline"]) > 0, m
    assert _number(m["recent_async_overlap"]) + _number(m["recent_asym_pipeline"]) > 0, m
    _ratio(m["overlap_recent"])
    assert _number(m["tokens_per_s"]) > 0 and _number(m["running_cpu"]) > 0, m
    _ratio(m["kv_accelerator"])
    assert _ratio(m["kv_cpu"]) > 0, "no KV blocks in use in the CPU pool"
    assert re.search(r"\d+ / 12 blocks", section) and re.search(r"[\d,]+ / [\d,]+ blocks", section.split("KV CPU")[1])
    lanes = _lanes(section)
    assert "device_linear" in lanes["accelerator"], lanes
    mode = re.search(r"Latest sampled iteration: step \d+ · (\w+)", section)
    assert mode, "no timeline header"
    assert "step_overhead" in _gaps(section)[0] and "scheduling / step overhead" in m["timeline_gaps"], m
    if mode.group(1) != "gpu_only":  # the page polled again: its latest timeline may be a newer one
        _ratio(m["overlap_latest"])
        assert "cpu_attention" in lanes["cpu"], lanes
    _check_png(shot)
