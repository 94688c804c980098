"""The client SDK needs grpcio and protobuf only: importing it loads no torch."""

import subprocess
import sys


def test_sdk_imports_without_torch() -> None:
    code = "import sys, apex_serve.sdk; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
