"""The chat fields and roles reach the chat template from both edges: the prompt token ids the scheduler is
sent are those of transformers' apply_chat_template with the same options. An in-process gateway (HTTP and
gRPC) over a scheduler stand-in that records each Submit and answers one token."""

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from apex_serve import rpc
from apex_serve.sdk import AsyncClient, ChatMessage, ChatOptions, InvalidArgumentError, ToolCall
from apex_serve.types import WorkerInfo
from apex_serve.v1 import gateway_pb2_grpc
from gateway.config import GatewayConfig
from gateway.generation import Generator
from gateway.http_api.server import HttpServer
from gateway.replicas import Replica, Replicas
from gateway.servicer import GatewayServicer
from gateway.tokenizer import Tokenizer, load_tokenizer
from one_token_scheduler import OneTokenScheduler

WORKER = WorkerInfo(
    model_name="recorded", num_layers=1, vocab_size=258, max_model_len=256, eos_token_ids=(257,), block_size=16,
    num_kv_blocks=16, device="cpu", dtype="float32",
)
# The default model's template knows no developer role and reads no tool fields; this one does both.
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<tool id={{ m['tool_call_id'] }}>{{ m['content'] }}</tool>"
    "{% elif m.tool_calls is defined %}<|assistant|>{% for c in m.tool_calls %}"
    "<call id={{ c.id }}>{{ c.function.name }}{{ c.function.arguments | tojson }}</call>{% endfor %}"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}{{ eos_token }}{% endfor %}"
    "{% if enable_thinking is defined and not enable_thinking %}<no think>{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CALL = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Zürich"}'}}
CONVERSATION = [
    {"role": "developer", "content": "be brief"},
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    {"role": "assistant", "content": "It is"},
]


def _conversation(model_dir: Path) -> list[dict[str, Any]]:
    """CONVERSATION, without the tool call and its answer for a template that does not render tool calls."""
    if "tool_calls" in json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]:
        return CONVERSATION
    return [m for m in CONVERSATION if "tool_calls" not in m and m["role"] != "tool"]


def _model_dir(tmp_path: Path, default_model_dir: Path) -> Path:
    config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOLS_TEMPLATE
    for f in default_model_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.fixture(params=["default", "tools"])
async def gateway(request: pytest.FixtureRequest, tmp_path: Path, default_model_dir: Path) -> AsyncIterator:
    """(model dir, recording scheduler, HTTP base URL, gRPC address) of a gateway over the default model's
    template or one with tool support."""
    model_dir = default_model_dir if request.param == "default" else _model_dir(tmp_path, default_model_dir)
    config = GatewayConfig(model_dir=str(model_dir), http_address="127.0.0.1:0")
    scheduler = OneTokenScheduler()
    generator = Generator.for_config(
        config, WORKER, Replicas([Replica("recorded", scheduler)]), "recorded"  # type: ignore[arg-type]
    )
    http = HttpServer(generator, config)
    await http.start()
    server = rpc.create_server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(generator), server)
    address = rpc.bind(server, "127.0.0.1:0")
    await server.start()
    try:
        yield model_dir, scheduler, f"http://127.0.0.1:{http.port}", address
    finally:
        await server.stop(None)
        await http.stop()


def _transformers_ids(model_dir: Path, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    """The prompt as vLLM builds it: developer as system for a template without that role, tool-call
    arguments parsed, keys without a value dropped; then transformers renders and our tokenizer encodes."""
    from transformers import AutoTokenizer

    hf = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if m["role"] == "developer":
            m["role"] = "system"
        if "tool_calls" in m:
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        hf.append(m)
    text = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(hf, tokenize=False, **kwargs)
    tokenizer: Tokenizer = load_tokenizer(model_dir)
    return tokenizer.encode(text, add_special_tokens=False).ids


OPTIONS: list[tuple[dict[str, Any], dict[str, Any]]] = [  # the request's fields, transformers' arguments
    ({}, {"add_generation_prompt": True}),
    ({"add_generation_prompt": False}, {"add_generation_prompt": False}),
    ({"add_generation_prompt": False, "continue_final_message": True}, {"continue_final_message": True}),
    ({"chat_template_kwargs": {"enable_thinking": False}}, {"add_generation_prompt": True, "enable_thinking": False}),
]


@pytest.mark.parametrize("fields,hf_kwargs", OPTIONS)
async def test_http_chat_renders_roles_and_options_as_transformers(
    gateway: tuple, fields: dict[str, Any], hf_kwargs: dict[str, Any]
) -> None:
    model_dir, scheduler, url, _ = gateway
    conversation = _conversation(model_dir)
    body = {"model": "recorded", "messages": conversation, "max_tokens": 1, **fields}
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        response = await c.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert list(scheduler.requests[-1].prompt_token_ids) == _transformers_ids(model_dir, conversation, **hf_kwargs)


@pytest.mark.parametrize("fields,hf_kwargs", OPTIONS)
async def test_grpc_chat_carries_the_same_roles_and_options(
    gateway: tuple, fields: dict[str, Any], hf_kwargs: dict[str, Any]
) -> None:
    model_dir, scheduler, _, address = gateway
    conversation = _conversation(model_dir)
    messages = [
        ChatMessage(m["role"], m["content"] or "", tool_call_id=m.get("tool_call_id") or "",
                    tool_calls=tuple(ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"])
                                     for c in m.get("tool_calls") or ()))
        for m in conversation
    ]
    chat = ChatOptions(
        add_generation_prompt=fields.get("add_generation_prompt", True),
        continue_final_message=fields.get("continue_final_message", False),
        chat_template_kwargs=fields.get("chat_template_kwargs", {}),
    )
    async with AsyncClient(address, max_retries=0) as client:
        await client.generate(messages, max_tokens=1, chat=chat)
    want = [{**m, "content": m["content"] or ""} for m in conversation]  # proto content has no null
    assert list(scheduler.requests[-1].prompt_token_ids) == _transformers_ids(model_dir, want, **hf_kwargs)


async def test_grpc_chat_option_errors_name_the_field(gateway: tuple) -> None:
    _, scheduler, _, address = gateway
    async with AsyncClient(address, max_retries=0) as client:
        with pytest.raises(InvalidArgumentError, match="continue_final_message: cannot be combined"):
            await client.generate([ChatMessage("assistant", "x")], max_tokens=1,
                                  chat=ChatOptions(continue_final_message=True))
        with pytest.raises(InvalidArgumentError, match="chat_template_kwargs: 'messages' is set by the request"):
            await client.generate([ChatMessage("user", "x")], max_tokens=1,
                                  chat=ChatOptions(chat_template_kwargs={"messages": []}))
        with pytest.raises(InvalidArgumentError, match=r"messages\[0\].role: must be one of system, developer"):
            await client.generate([ChatMessage("robot", "x")], max_tokens=1)
    assert not scheduler.requests


async def test_a_template_that_does_not_render_tool_calls_refuses_them_from_both_edges(gateway: tuple) -> None:
    model_dir, scheduler, url, address = gateway
    if _conversation(model_dir) is CONVERSATION:
        pytest.skip("this template renders tool calls")
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        response = await c.post("/v1/chat/completions", json={"model": "recorded", "messages": CONVERSATION})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[2].tool_calls", response.text
    call = ChatMessage("assistant", "", tool_calls=(ToolCall("c1", "weather", "{}"),))
    async with AsyncClient(address, max_retries=0) as client:
        with pytest.raises(InvalidArgumentError, match=r"messages\[1\].tool_calls: the model's chat template does not"):
            await client.generate([ChatMessage("user", "x"), call], max_tokens=1)
    assert not scheduler.requests
