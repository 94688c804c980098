"""ServiceGroup, which starts services for the launcher, the benchmarks and the tests: it waits until SERVING, names
a service that died or never served, pins where asked, and leaves no process behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from apex_tools.processes import ServiceGroup, split_cores
from conftest import wait_until

CPU_WORKER_ARGS = ["--kv-budget-bytes", str(16 * 2**20)]


def test_start_waits_until_serving_and_leaving_the_group_stops_every_service(tmp_path: Path) -> None:
    with ServiceGroup(startup_timeout_s=60) as group:
        services = [group.start("cpu_attention_worker", f"unix://{tmp_path}/{name}.sock",
                                ["--address", f"unix://{tmp_path}/{name}.sock", *CPU_WORKER_ARGS])
                    for name in ("a", "b")]
        assert all(s.process.poll() is None for s in services) and group.dead() == []
    assert [s.process.returncode for s in services] == [0, 0], "SIGTERM should drain and exit cleanly"


def test_a_service_that_exits_during_start_up_is_named_with_its_exit_code(tmp_path: Path) -> None:
    with ServiceGroup(startup_timeout_s=60) as group:
        with pytest.raises(RuntimeError, match="cpu_attention_worker exited with code 2 during start-up"):
            group.start("cpu_attention_worker", f"unix://{tmp_path}/x.sock", ["--no-such-flag"])
        assert group.dead() == []  # the failed service left the group


def test_a_service_that_never_serves_times_out_naming_it_and_is_stopped(tmp_path: Path) -> None:
    group = ServiceGroup(startup_timeout_s=1.0, stop_timeout_s=5.0)
    # a process that runs but never answers health checks on the address
    with pytest.raises(TimeoutError, match="http.server"):
        group.start("http.server", f"unix://{tmp_path}/never.sock", ["--bind", "127.0.0.1", "0"])
    assert group.dead() == []
    group.stop_all()


def test_a_pinned_service_runs_on_the_cores_it_was_given(tmp_path: Path) -> None:
    device, host = split_cores(1)
    if device is None:
        pytest.skip("one core: nothing to pin apart")
    with ServiceGroup(startup_timeout_s=60) as group:
        service = group.start("cpu_attention_worker", f"unix://{tmp_path}/p.sock",
                              ["--address", f"unix://{tmp_path}/p.sock", *CPU_WORKER_ARGS], cpus=host)
        assert os.sched_getaffinity(service.pid) == host
        assert device.isdisjoint(host)


def test_stop_kills_a_service_that_ignores_sigterm(tmp_path: Path) -> None:
    (tmp_path / "stubborn.py").write_text(
        "import pathlib, signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "pathlib.Path(sys.argv[1]).touch()\ntime.sleep(60)\n")
    ready = tmp_path / "ready"
    group = ServiceGroup(stop_timeout_s=0.5)
    service = group.spawn("stubborn", "", [str(ready)], env={"PYTHONPATH": str(tmp_path)})
    wait_until(ready.exists, 30.0, "the stubborn process to ignore SIGTERM")
    group.stop(service)
    assert service.process.returncode == -9 and group.dead() == []


def test_a_service_gets_sigterm_when_the_process_that_started_it_dies(tmp_path: Path) -> None:
    address = f"unix://{tmp_path}/orphan.sock"
    pid_file = tmp_path / "pid"
    starter = (
        "import os, sys; from apex_tools.processes import ServiceGroup; "
        f"s = ServiceGroup(startup_timeout_s=60).start('cpu_attention_worker', {address!r}, "
        f"['--address', {address!r}, *{CPU_WORKER_ARGS!r}]); open({str(pid_file)!r}, 'w').write(str(s.pid)); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", starter], stdout=subprocess.DEVNULL, timeout=120, check=True)
    pid = int(pid_file.read_text())

    def gone() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # reaped by init, or a zombie of it
        except FileNotFoundError:
            return True

    wait_until(gone, 30.0, f"the orphaned service (pid {pid}) to stop")
