"""API keys stay off every command line: the stack started with a key file and with APEX_API_KEYS in the launcher's
environment shows neither key in any service's /proc/<pid>/cmdline (what `ps` prints to every local user), and the
gateway still requires a key from either source."""

import os
import secrets
from pathlib import Path

import httpx
import pytest

from apex_serve.sdk import Client, UnauthenticatedError
from conftest import running_stack
from gateway.config import API_KEYS_ENV

SERVICES = ("cpu_attention_worker", "profiler_service", "gpu_worker", "scheduler_service", "gateway")


def _descendants(root: int) -> list[int]:
    """Every process under root, from the parent pids in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_no_service_command_line_carries_an_api_key(
    default_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file_key, env_key = f"sk-file-{secrets.token_hex(8)}", f"sk-env-{secrets.token_hex(8)}"
    key_file = tmp_path / "api-keys"
    key_file.write_text(f"\n  other-key  \n{file_key}\n")
    key_file.chmod(0o600)
    monkeypatch.setenv(API_KEYS_ENV, env_key)
    with running_stack(default_model_dir, api_keys_file=str(key_file)) as stack:
        command_lines = [_cmdline(pid) for pid in _descendants(os.getpid())]
        for module in SERVICES:
            assert any(f"-m {module} " in line for line in command_lines), f"no {module} process found"
        for line in command_lines:
            assert file_key not in line and env_key not in line and "other-key" not in line, line
        assert any(f"--api-keys-file {key_file}" in line for line in command_lines), "the gateway got no key file"

        url = f"http://{stack.config.http_address}/v1/models"
        with httpx.Client(timeout=30) as http:
            assert http.get(url).status_code == 401
            assert http.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
            for key in (file_key, env_key, "other-key"):
                response = http.get(url, headers={"authorization": f"Bearer {key}"})
                assert response.status_code == 200, response.text
        with Client(stack.config.gateway_address) as client:
            with pytest.raises(UnauthenticatedError):
                client.model_info()
        with Client(stack.config.gateway_address, api_key=env_key) as client:
            assert client.model_info().name == Path(default_model_dir).name
