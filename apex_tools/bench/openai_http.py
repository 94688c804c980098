"""The OpenAI HTTP endpoint as a benchmark's clients use it: a request streamed (with the arrival time of its chunks)
or not, and many at once, one thread each."""

import http.client
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

REQUEST_TIMEOUT_S = 600.0


@dataclass
class Reply:
    """One streamed HTTP request: its status, the text of its one choice, and when its chunks arrived (perf ns)."""

    status: int = 0
    text: str = ""
    error: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    submit_ns: int = 0
    first_ns: int = 0  # the first chunk that carried text
    last_ns: int = 0


def stream(http_address: str, path: str, body: dict, timeout_s: float = REQUEST_TIMEOUT_S) -> Reply:
    """POST body with stream on (and a usage chunk) to the OpenAI endpoint at path, read to its end."""
    host, port = http_address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    reply = Reply(submit_ns=time.perf_counter_ns())
    payload = body | {"stream": True, "stream_options": {"include_usage": True}}
    try:
        conn.request("POST", path, json.dumps(payload), {"content-type": "application/json"})
        response = conn.getresponse()
        reply.status = response.status
        if response.status != 200:
            reply.error = response.read().decode(errors="replace")
            return reply
        parts = []
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            now = time.perf_counter_ns()
            if "error" in chunk:
                reply.error = json.dumps(chunk["error"])
            for choice in chunk.get("choices") or ():
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if text:
                    parts.append(text)
                    reply.first_ns = reply.first_ns or now
                    reply.last_ns = now
                reply.finish_reason = choice.get("finish_reason") or reply.finish_reason
            if chunk.get("usage"):
                reply.completion_tokens = chunk["usage"]["completion_tokens"]
        reply.text = "".join(parts)
    finally:
        conn.close()
    return reply


def post(http_address: str, path: str, body: dict, timeout_s: float = REQUEST_TIMEOUT_S) -> Reply:
    """POST body with stream off: the whole reply at once (its last_ns is when it arrived)."""
    host, port = http_address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    reply = Reply(submit_ns=time.perf_counter_ns())
    try:
        conn.request("POST", path, json.dumps(body | {"stream": False}), {"content-type": "application/json"})
        response = conn.getresponse()
        reply.status = response.status
        payload = response.read().decode(errors="replace")
        reply.last_ns = time.perf_counter_ns()
        if response.status != 200:
            reply.error = payload
            return reply
        document = json.loads(payload)
        choice = document["choices"][0]
        reply.text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
        reply.finish_reason = choice.get("finish_reason")
        reply.completion_tokens = document["usage"]["completion_tokens"]
    finally:
        conn.close()
    return reply


def run_all(http_address: str, requests: Sequence[tuple[str, dict]], whole: Sequence[tuple[str, dict]] = ()
            ) -> list[Reply]:
    """Every (path, body) of requests streamed and of whole not streamed, all at once, one thread each; the replies
    in order, requests' first."""
    calls = [(stream, *r) for r in requests] + [(post, *r) for r in whole]
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        return list(pool.map(lambda call: call[0](http_address, *call[1:]), calls))
