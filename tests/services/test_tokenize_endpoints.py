"""vLLM's /tokenize, /detokenize, /version and /ping on the gateway's HTTP app (API keys on), with exact token ids
of the default model's byte tokenizer (<s> = 256, </s> = 257, then the UTF-8 bytes)."""

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from apex_serve import __version__
from apex_serve.types import WorkerInfo
from gateway.config import GatewayConfig
from gateway.generation import Generator
from gateway.http_api.app import create_app
from gateway.replicas import Replica, Replicas

KEY = "sk-tok"
WORKER = WorkerInfo(
    model_name="tiny", num_layers=1, vocab_size=258, max_model_len=64, eos_token_ids=(257,), block_size=16,
    num_kv_blocks=8, device="cpu", dtype="float32",
)
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def client(default_model_dir: Path, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    keys = tmp_path / "api-keys"
    keys.write_text(KEY)
    keys.chmod(0o600)
    config = GatewayConfig(model_dir=str(default_model_dir), api_keys_file=str(keys))
    generator = Generator.for_config(
        config, WORKER, Replicas([Replica("unused", None)]), "tiny"  # type: ignore[arg-type]
    )
    transport = httpx.ASGITransport(app=create_app(generator, config))
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway", headers=headers) as c:
        yield c


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


async def test_tokenize_a_prompt_with_and_without_special_tokens(client: httpx.AsyncClient) -> None:
    response = await client.post("/tokenize", json={"model": "tiny", "prompt": "Hi é"})
    assert response.json() == {"count": 6, "max_model_len": 64, "tokens": [256, 72, 105, 32, 195, 169]}
    response = await client.post("/tokenize", json={"prompt": "Hi", "add_special_tokens": False,
                                                    "return_token_strs": True})
    assert response.json() == {"count": 2, "max_model_len": 64, "tokens": [72, 105], "token_strs": ["H", "i"]}


async def test_tokenize_messages_through_the_chat_template(client: httpx.AsyncClient) -> None:
    expected = [256, *b"<|user|>\nhi", 257, *b"\n<|assistant|>\n"]  # the template writes <s> and </s> itself
    response = await client.post("/tokenize", json={"model": "tiny", "messages": CHAT})
    assert response.json()["tokens"] == expected and response.json()["count"] == len(expected)
    response = await client.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False})
    assert response.json()["tokens"] == [256, *b"<|user|>\nhi", 257, *b"\n"]
    response = await client.post("/tokenize", json={"messages": CHAT, "add_special_tokens": True})
    assert response.json()["tokens"] == [256, *expected]


async def test_detokenize_keeps_special_tokens_as_vllm_does(client: httpx.AsyncClient) -> None:
    response = await client.post("/detokenize", json={"model": "tiny", "tokens": [256, 72, 105, 195, 169, 257]})
    assert response.json() == {"prompt": "<s>Hié</s>"}
    assert (await client.post("/detokenize", json={"tokens": []})).json() == {"prompt": ""}


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"prompt": "hi", "messages": CHAT}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/tokenize", {"messages": CHAT, "continue_final_message": True}, "continue_final_message"),
    ("/detokenize", {"tokens": [72, 258]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, "tokens[0]"),
    ("/detokenize", {}, "tokens"),
])
async def test_bad_input_is_400_naming_the_field(client: httpx.AsyncClient, path: str, body: dict, param: str) -> None:
    error = _error(await client.post(path, json=body), 400)
    assert error["param"] == param and param in error["message"], error


async def test_unknown_model_is_404_and_a_missing_key_401(client: httpx.AsyncClient) -> None:
    assert "gpt-9" in _error(await client.post("/tokenize", json={"model": "gpt-9", "prompt": "x"}), 404)["message"]
    assert "gpt-9" in _error(await client.post("/detokenize", json={"model": "gpt-9", "tokens": [1]}), 404)["message"]
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        _error(await client.post(path, json=body, headers={"authorization": "Bearer wrong"}), 401)


async def test_version_and_ping_are_open(client: httpx.AsyncClient) -> None:
    client.headers.pop("authorization")
    assert (await client.get("/version")).json() == {"version": __version__}
    for method in ("GET", "POST"):
        response = await client.request(method, "/ping")
        assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert (await client.get("/openapi.json")).status_code == 200


async def test_a_lone_surrogate_in_the_prompt_is_a_400_naming_it(client: httpx.AsyncClient) -> None:
    response = await client.post("/tokenize", content=b'{"prompt": "a\\ud800b"}',
                                 headers={"content-type": "application/json"})
    assert _error(response, 400)["param"] == "prompt"
