"""Gateway configuration."""

import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from apex_serve.flags import option
from gateway.validation import RequestLimits

logger = logging.getLogger(__name__)

API_KEYS_ENV = "APEX_API_KEYS"  # comma-separated keys, accepted besides those of --api-keys-file


def _split_keys(text: str) -> set[str]:
    """Keys separated by commas or newlines, surrounding whitespace and empty entries dropped."""
    return {key.strip() for line in text.splitlines() for key in line.split(",") if key.strip()}


@dataclass(frozen=True)
class GatewayConfig:
    model_dir: str = option(help="model directory whose tokenizer.json and chat template the gateway uses")
    model_name: str = option("", help="model name clients send and see; empty: the model directory's name")
    address: str = option("127.0.0.1:50051", help="public gRPC address (host:port)")
    http_address: str = option("", help="OpenAI-compatible HTTP address (host:port); empty: off")
    scheduler_address: str = option(
        "unix:///tmp/apex-serve/scheduler.sock",
        help="scheduler gRPC address; comma-separated: replicas, routed by load",
    )
    api_keys_file: str = option(
        "",
        help=f"file of accepted API keys (sent as 'authorization: Bearer <key>'), one a line or comma-separated, "
        f"readable by its owner only; keys in the environment variable {API_KEYS_ENV} (comma-separated) are accepted "
        f"as well; neither: no authentication",
    )
    allowed_hosts: str = option(
        "",
        help="Host header names or IPs (no port) the HTTP API answers, comma-separated, '*': any; empty: on a "
        "loopback --http-address localhost, 127.0.0.1, ::1 and that address only, else any (/health, /ping: any)",
    )
    tls_cert_file: str = option(
        "", help="PEM certificate chain; with --tls-key-file the public gRPC port speaks TLS; empty: plaintext"
    )
    tls_key_file: str = option("", help="PEM private key of --tls-cert-file; empty: plaintext")
    max_concurrent_requests: int = option(
        1024, help="requests in flight at once; more get RESOURCE_EXHAUSTED / HTTP 429"
    )
    max_prompt_bytes: int = option(
        1 << 20,
        help="largest prompt in UTF-8 bytes (a chat's: its messages' text, checked before the template renders it); "
        "larger ones get INVALID_ARGUMENT / HTTP 400 naming the field, before tokenizing",
    )
    max_stop_strings: int = option(
        16,
        help="most stop strings a request may give (OpenAI allows 4, vLLM any number; each one is searched in every "
        "text delta); more: INVALID_ARGUMENT / HTTP 400 naming `stop`",
    )
    max_stop_string_bytes: int = option(
        1024,
        help="longest stop string in UTF-8 bytes (the stream holds back that many characters); with max_stop_strings "
        "a request carries at most 16 KiB of them by default; longer: INVALID_ARGUMENT / HTTP 400 naming `stop[i]`",
    )
    max_bad_words: int = option(
        128,
        help="most bad_words a request may give (each is tokenized and banned at every step); more: "
        "INVALID_ARGUMENT / HTTP 400 naming `bad_words`; each word is at most max_stop_string_bytes long",
    )
    max_chat_messages: int = option(
        2048, help="most messages in one chat request; more: INVALID_ARGUMENT / HTTP 400 naming `messages`"
    )
    max_batch_prompts: int = option(
        256, help="most prompts in one completions request (a list of texts or of token-id lists), each one engine "
        "request; more: HTTP 400 naming `prompt`"
    )
    max_samples: int = option(
        16, help="most samples per prompt (n, best_of), each one engine request that prefills the prompt again; "
        "more: INVALID_ARGUMENT / HTTP 400 naming the field"
    )
    max_http_connections: int = option(
        4096,
        help="open HTTP connections; at the bound a new connection closes the one that has waited longest for its "
        "request head, and request tasks past it are answered 503 (uvicorn's limit_concurrency)",
    )
    http_header_timeout_s: float = option(
        10.0, help="seconds an HTTP connection gets to send a whole request head (line and headers); then it is closed"
    )
    http_keep_alive_s: int = option(5, help="seconds an idle keep-alive HTTP connection is kept open")
    http_max_header_bytes: int = option(
        16384, help="largest HTTP request head in bytes (h11's max_incomplete_event_size); larger: 400 and closed"
    )
    drain_timeout_s: float = option(10.0, help="seconds in-flight requests get to finish after SIGTERM")
    stall_timeout_s: float = option(
        30.0, help="a replica whose engine runs no step for this many seconds while it has requests running is not "
        "ready (/health 503, ServerReady false) until it steps again; 0: not watched"
    )
    unavailable_retry_s: float = option(
        30.0, help="seconds a request that finds no scheduler replica SERVING, or fails UNAVAILABLE before its first "
        "token with no other replica SERVING, waits for one (a restarted scheduler) to submit it there again; a request "
        "that already produced tokens is never retried; 0: it fails UNAVAILABLE / HTTP 503 at once"
    )
    startup_timeout_s: float = option(300.0, help="seconds to wait at start for every scheduler replica to be SERVING")

    def __post_init__(self) -> None:
        if not (Path(self.model_dir) / "tokenizer.json").is_file():
            raise ValueError(f"model_dir: no tokenizer.json in {self.model_dir}")
        addresses = [a.strip() for a in self.scheduler_address.split(",")]
        if not all(addresses):
            raise ValueError(f"scheduler_address: empty entry in {self.scheduler_address!r}")
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"scheduler_address: a replica is listed twice in {self.scheduler_address!r}")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s: must be > 0, got {self.startup_timeout_s}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s: must be >= 0, got {self.drain_timeout_s}")
        if self.stall_timeout_s < 0:
            raise ValueError(f"stall_timeout_s: must be >= 0 (0: not watched), got {self.stall_timeout_s}")
        if self.unavailable_retry_s < 0:
            raise ValueError(f"unavailable_retry_s: must be >= 0 (0: no wait), got {self.unavailable_retry_s}")
        if self.max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests: must be >= 1, got {self.max_concurrent_requests}")
        if self.max_prompt_bytes < 1:
            raise ValueError(f"max_prompt_bytes: must be >= 1, got {self.max_prompt_bytes}")
        for name in (
            "max_stop_strings", "max_stop_string_bytes", "max_bad_words", "max_chat_messages", "max_batch_prompts",
            "max_samples", "max_http_connections",
            "http_keep_alive_s", "http_max_header_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.http_header_timeout_s <= 0:
            raise ValueError(f"http_header_timeout_s: must be > 0, got {self.http_header_timeout_s}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file, tls_key_file: give both or neither")
        for name in ("tls_cert_file", "tls_key_file"):
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                raise ValueError(f"{name}: {getattr(self, name)} does not exist")
        _ = self.api_key_set  # read at start-up: a missing or empty key file stops the gateway here

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model_dir).resolve().name

    @property
    def allowed_host_set(self) -> frozenset[str]:
        return frozenset(h.strip().lower().strip("[]") for h in self.allowed_hosts.split(",") if h.strip())

    @property
    def scheduler_addresses(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.scheduler_address.split(","))

    @cached_property
    def api_key_set(self) -> frozenset[str]:
        """The keys of api_keys_file and of the APEX_API_KEYS environment variable together; empty: no authentication.
        ValueError when the file cannot be read or holds no key; a file others may read is logged as a warning."""
        keys = _split_keys(os.environ.get(API_KEYS_ENV, ""))
        if self.api_keys_file:
            path = Path(self.api_keys_file)
            try:
                from_file = _split_keys(path.read_text())
                mode = path.stat().st_mode
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or exc
                raise ValueError(f"api_keys_file (--api-keys-file): cannot read {path}: {reason}") from None
            if not from_file:
                raise ValueError(f"api_keys_file (--api-keys-file): no key in {path}")
            if mode & 0o077:
                logger.warning("api_keys_file: %s is open to group or others (mode %03o); chmod 600 it",
                               path, mode & 0o777)
            keys |= from_file
        return frozenset(keys)

    @property
    def max_message_bytes(self) -> int:
        """The largest HTTP body or gRPC request message read: room for JSON escaping (up to 6 bytes a character) of a
        prompt at max_prompt_bytes, which the Generator answers with 400 / INVALID_ARGUMENT naming the field, and 1
        MiB for the other fields. A larger one is refused before it is read into memory (HTTP 413, gRPC
        RESOURCE_EXHAUSTED)."""
        return 8 * self.max_prompt_bytes + (1 << 20)

    @property
    def request_limits(self) -> RequestLimits:
        return RequestLimits(
            max_prompt_bytes=self.max_prompt_bytes, max_stop_strings=self.max_stop_strings,
            max_stop_string_bytes=self.max_stop_string_bytes, max_bad_words=self.max_bad_words,
            max_chat_messages=self.max_chat_messages, max_batch_prompts=self.max_batch_prompts,
            max_samples=self.max_samples,
        )
