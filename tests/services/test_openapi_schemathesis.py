"""The gateway's /openapi.json is true to the server: schemathesis generates requests from it (valid and invalid)
against a real HTTP gateway over a scripted scheduler and checks that every status is documented, every
response matches its documented schema, and nothing is a server error."""

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from apex_serve.types import WorkerInfo
from gateway.config import GatewayConfig
from gateway.generation import Generator
from gateway.http_api.server import HttpServer
from gateway.replicas import Replica, Replicas
from one_token_scheduler import OneTokenScheduler

KEY = "sk-schema"
AUTH = {"authorization": f"Bearer {KEY}"}
WORKER = WorkerInfo(
    model_name="scripted", num_layers=1, vocab_size=258, max_model_len=64, eos_token_ids=(257,), block_size=16,
    num_kv_blocks=8, device="cpu", dtype="float32",
)
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def gateway_url(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway's HTTP server (API keys on) on an event loop of its own thread, as the synchronous
    schemathesis calls need."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="gateway", daemon=True)
    thread.start()
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(KEY)
    keys.chmod(0o600)

    async def start() -> HttpServer:
        config = GatewayConfig(model_dir=str(default_model_dir), http_address="127.0.0.1:0", api_keys_file=str(keys))
        generator = Generator.for_config(
            config, WORKER, Replicas([Replica("scripted", OneTokenScheduler())]), "scripted"  # type: ignore[arg-type]
        )
        server = HttpServer(generator, config)
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.mark.slow  # 12 s of generated requests: outside the fast tier
def test_every_operation_answers_as_documented(gateway_url: str, tmp_path: Path) -> None:
    """Every phase (examples, coverage, fuzzing, stateful), valid and invalid data, with the API key, in a 12 s budget:
    fuzzing and the stateful scenarios repeat until it is spent."""
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{gateway_url}/openapi.json", "--checks", CHECKS,
        "--max-examples", "15", "--max-time", "12", "--seed", "1", "--workers", "1",
        "--header", f"authorization: Bearer {KEY}",
        "--report-dir", str(tmp_path), "--no-color",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]


VALID_BODIES = [
    ("/v1/completions", {"model": "scripted", "prompt": "Hi", "max_tokens": 2, "logprobs": 1}),
    ("/v1/completions", {"model": "scripted", "prompt": [72, 105], "stream": True}),
    ("/v1/chat/completions", {"model": "scripted", "messages": [{"role": "user", "content": "Hi"}], "logprobs": True}),
    ("/v1/chat/completions", {"model": "scripted", "messages": [{"role": "user", "content": "Hi"}], "stream": True}),
    ("/tokenize", {"model": "scripted", "prompt": "Hi", "return_token_strs": True}),
    ("/tokenize", {"messages": [{"role": "user", "content": "Hi"}], "add_special_tokens": True}),
    ("/detokenize", {"model": "scripted", "tokens": [256, 72, 105]}),
]


@pytest.mark.parametrize("path,body", VALID_BODIES)
def test_successful_answers_match_the_document(gateway_url: str, path: str, body: dict) -> None:
    """Generated bodies rarely pass every range check (the ranges live in the server, not the schema), so the
    answers to valid requests are checked here."""
    operation = schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")[path]["POST"]
    response = operation.Case(body=body, media_type="application/json").call_and_validate(
        headers=AUTH, checks=[not_a_server_error, status_code_conformance, response_schema_conformance]
    )
    assert response.status_code == 200, response.text


def test_the_document_is_open_and_has_no_422(gateway_url: str) -> None:
    document = httpx.get(f"{gateway_url}/openapi.json").json()
    statuses = {status for path in document["paths"].values() for op in path.values() for status in op["responses"]}
    assert "422" not in statuses and "HTTPValidationError" not in document["components"]["schemas"]
    assert {"/tokenize", "/detokenize", "/version", "/ping", "/v1/completions"} <= set(document["paths"])
    assert not any(path.startswith("/dashboard") for path in document["paths"])
