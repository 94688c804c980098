"""scripts/gpu-check.sh, the one command that checks the CUDA paths, passes its dry run on a machine without CUDA: it
says so, its gpu tests skip cleanly, it writes their report where it says, and it exits 0."""

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs its benchmark: not a dry run")
def test_gpu_check_dry_run_without_cuda_skips_the_gpu_tests_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(out), "tests/kernels/test_gpu_device.py"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"results in {out}" in done.stdout
    assert "sees no CUDA device" in done.stdout
    suite = ET.parse(out / "gpu-tests.xml").getroot().find("testsuite")
    assert suite is not None
    assert int(suite.get("tests")) >= 1, "no gpu test was collected"
    assert int(suite.get("skipped")) == int(suite.get("tests")), "a gpu test ran or failed without CUDA"
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0
    assert (out / "gpu-tests.log").read_text().count("needs a CUDA device") >= 1
    assert not (out / "hybrid.json").exists(), "the CUDA benchmark ran without CUDA"
