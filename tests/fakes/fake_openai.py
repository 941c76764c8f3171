"""Fake OpenAI-compatible server standing in for vLLM in tests (stdlib only).

Takes vLLM's ``api_server`` arguments (other flags are ignored), e.g.::

    python tests/fakes/fake_openai.py --port 18001 --served-model-name Qwen/Qwen2.5-7B-Instruct-AWQ

GET /health, GET /v1/models, POST /v1/chat/completions (``stream`` too), /v1/completions,
/v1/embeddings. Answers say who answered: ``fake:<served-name>@<FAKE_NAME or host:port>``
(also the ``x-fake-server`` header). Like vLLM: an unknown ``model`` gets 404; with
``--api-key`` /v1/* needs ``Authorization: Bearer <key>``; with ``--max-model-len`` a prompt
whose word count plus ``max_tokens`` exceeds it gets 400 "maximum context length".

GET /metrics serves vLLM's load gauges (``vllm:num_requests_running`` / ``_waiting``, the
requests in flight); GET /fake/stats counts what was received per path.

Environment: FAKE_MODE=ok|hang|error|stall (hang: read the request, never answer; error: 500
on /health and /v1/*; stall: /v1/* answers its headers, then nothing), FAKE_DELAY_S (added
latency), FAKE_MODE_FILE (mode re-read from it on every request, and every 0.1 s by hanging
requests, which answer once it changes), FAKE_NAME.
One line per request on stderr. SIGTERM exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODES = ("ok", "hang", "error", "stall")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fake vLLM OpenAI server")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--quantization", default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--api-key", default=None)
    args, _unknown = p.parse_known_args(argv)
    args.served_model_name = args.served_model_name or [args.model]
    return args


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog; the default of 5 drops connections under load

    def __init__(self, args: argparse.Namespace, env: Mapping[str, str]) -> None:
        self.args, self.env = args, dict(env)
        self.stopping = threading.Event()
        self.counter = 0
        self.in_flight = 0
        self.received: dict[str, int] = {}
        self.lock = threading.Lock()
        super().__init__((args.host, args.port), Handler)
        host = "127.0.0.1" if args.host in ("", "0.0.0.0") else args.host
        self.ident = self.env.get("FAKE_NAME") or f"{host}:{self.server_address[1]}"

    def mode(self) -> str:
        text = self.env.get("FAKE_MODE", "ok")
        if path := self.env.get("FAKE_MODE_FILE"):
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read().strip() or text
            except OSError:
                pass
        return text.strip().lower() if text.strip().lower() in MODES else "ok"

    def shutdown(self) -> None:
        self.stopping.set()
        super().shutdown()


def words(value: Any) -> int:
    """Crude token count: whitespace-separated words in (nested) strings and contents."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(words(v) for v in value)
    if isinstance(value, dict):
        return sum(words(v) for k, v in value.items() if k in ("content", "text"))
    return 0


def embedding(text: str, dim: int = 8) -> list[float]:
    vec = [b / 255.0 - 0.5 for b in hashlib.sha256(text.encode()).digest()[:dim]]
    norm = sum(x * x for x in vec) ** 0.5 or 1.0
    return [round(x / norm, 6) for x in vec]


class Handler(BaseHTTPRequestHandler):
    server: FakeServer
    protocol_version = "HTTP/1.1"
    status = 0

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"fake[{self.server.ident}] {format % args}\n")

    def do_GET(self) -> None:
        self.handle_request(None)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        self.handle_request(body if isinstance(body, dict) else {"model": None, "_bad": 1})

    def handle_request(self, body: dict[str, Any] | None) -> None:
        start, mode, self.status = time.monotonic(), self.server.mode(), 0
        path = self.path.split("?", 1)[0].rstrip("/")
        counted = path.startswith("/v1/")
        with self.server.lock:
            self.server.received[path] = self.server.received.get(path, 0) + 1
            self.server.in_flight += counted
        try:
            if mode == "stall" and counted:
                self.stall(body or {})
                return
            if mode == "hang" and (mode := self.hang()) == "hang":
                self.close_connection = True
                return
            delay = float(self.server.env.get("FAKE_DELAY_S") or 0)
            if delay > 0 and self.server.stopping.wait(delay):
                return
            self.route(body, mode)
        except (BrokenPipeError, ConnectionResetError):
            self.status = 499
        finally:
            with self.server.lock:
                self.server.in_flight -= counted
            ms, status = (time.monotonic() - start) * 1000, self.status or "-"
            self.log_message("%s %s %s %s %.0fms", self.command, self.path, status, mode, ms)

    def hang(self) -> str:
        """Leave the request unanswered until the client leaves, we stop, or the mode changes."""
        while not self.server.stopping.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.1)
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                break  # client went away
            if (mode := self.server.mode()) != "hang":
                return mode
        return "hang"

    def stall(self, body: dict[str, Any]) -> None:
        """Headers (and for a stream, its first byte of nothing), then silence."""
        if body.get("stream"):
            self.start_response(200, "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.start_response(200, "application/json")
            self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.flush()
        self.hang()
        self.close_connection = True

    def route(self, body: dict[str, Any] | None, mode: str) -> None:  # noqa: PLR0911 - one return per route
        path = self.path.split("?", 1)[0].rstrip("/")
        is_api = path.startswith("/v1/")
        if path == "/metrics" and body is None:
            return self.metrics()
        if path == "/fake/stats" and body is None:
            return self.send_json(200, {"received": self.server.received, "in_flight": self.server.in_flight})
        if mode == "error" and (is_api or path == "/health"):
            return self.fail(500, "fake: FAKE_MODE=error", "InternalServerError")
        if path == "/health" and body is None:
            return self.send_json(200, None)
        key = self.server.args.api_key
        if is_api and key and self.headers.get("Authorization") != f"Bearer {key}":
            return self.send_json(401, {"error": "Unauthorized"})
        handler = {
            ("GET", "/v1/models"): self.models,
            ("POST", "/v1/chat/completions"): self.chat,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/embeddings"): self.embeddings,
        }.get((self.command, path))
        if handler is None:
            return self.send_json(404, {"detail": "Not Found"})
        body = body or {}
        if body.get("_bad"):
            return self.fail(400, "request body is not a JSON object", "BadRequestError")
        if body.get("model") not in (None, *self.server.args.served_model_name):
            return self.fail(404, f"The model `{body['model']}` does not exist.", "NotFoundError")
        handler(body)

    def base(self, body: dict[str, Any], prefix: str, kind: str) -> dict[str, Any]:
        self.server.counter += 1
        model = body.get("model") or self.server.args.served_model_name[0]
        return {"id": f"{prefix}-fake{self.server.counter}", "object": kind,
                "created": int(time.time()), "model": model}  # fmt: skip

    def answer(self, body: dict[str, Any], prompt: Any) -> tuple[str, dict[str, int]] | None:
        """The reply text and usage, or None after sending vLLM's context-length 400."""
        tokens, limit = words(prompt), self.server.args.max_model_len
        wanted = tokens + int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)
        if limit is not None and wanted > limit:
            self.fail(400, f"This model's maximum context length is {limit} tokens. However, you "
                      f"requested {wanted} tokens ({tokens} in the messages, {wanted - tokens} in "
                      "the completion). Please reduce the length of the messages or completion.",
                      "BadRequestError")  # fmt: skip
            return None
        name = body.get("model") or self.server.args.served_model_name[0]
        usage = {"prompt_tokens": tokens, "completion_tokens": 1, "total_tokens": tokens + 1}
        return f"fake:{name}@{self.server.ident}", usage

    def metrics(self) -> None:
        name = self.server.args.served_model_name[0]
        running = max(self.server.in_flight, 0)
        text = (
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{name}"}} {running}.0\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="{name}"}} 0.0\n'
        ).encode()
        self.start_response(200, "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def models(self, _body: dict[str, Any]) -> None:
        args = self.server.args
        info = {"object": "model", "created": int(time.time()), "owned_by": "vllm"}
        info.update(root=args.model, parent=None, max_model_len=args.max_model_len or 32768)
        data = [{"id": name, **info} for name in args.served_model_name]
        self.send_json(200, {"object": "list", "data": data})

    def chat(self, body: dict[str, Any]) -> None:
        if (answer := self.answer(body, body.get("messages"))) is None:
            return
        text, usage = answer
        if not body.get("stream"):
            msg = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": msg, "finish_reason": "stop", "logprobs": None}
            out = self.base(body, "chatcmpl", "chat.completion")
            return self.send_json(200, {**out, "choices": [choice], "usage": usage})
        chunk = self.base(body, "chatcmpl", "chat.completion.chunk")
        deltas: list[dict[str, str]] = [{"role": "assistant", "content": ""}, {"content": text}, {}]
        events = [{**chunk, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
                  for d in deltas]  # fmt: skip
        events[-1]["choices"][0]["finish_reason"] = "stop"
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**chunk, "choices": [], "usage": usage})
        self.send_sse(events)

    def completions(self, body: dict[str, Any]) -> None:
        if (answer := self.answer(body, body.get("prompt"))) is None:
            return
        choice = {"index": 0, "text": answer[0], "finish_reason": "stop", "logprobs": None}
        out = {**self.base(body, "cmpl", "text_completion"), "choices": [choice]}
        if body.get("stream"):
            return self.send_sse([out])
        self.send_json(200, {**out, "usage": answer[1]})

    def embeddings(self, body: dict[str, Any]) -> None:
        raw = body.get("input", "")
        inputs = [raw] if isinstance(raw, str) else list(raw)
        data = [{"object": "embedding", "index": i, "embedding": embedding(str(x))}
                for i, x in enumerate(inputs)]  # fmt: skip
        usage = {"prompt_tokens": words(inputs), "total_tokens": words(inputs)}
        out = {**self.base(body, "embd", "list"), "data": data, "usage": usage}
        self.send_json(200, out)

    def fail(self, status: int, message: str, kind: str) -> None:
        err = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
        self.send_json(status, err)

    def start_response(self, status: int, content_type: str | None) -> None:
        self.status = status
        self.send_response_only(status)
        self.send_header("x-fake-server", self.server.ident)
        if content_type:
            self.send_header("Content-Type", content_type)

    def send_json(self, status: int, payload: Any) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.start_response(status, None if payload is None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_sse(self, events: list[dict[str, Any]]) -> None:
        self.start_response(200, "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for item in [*(json.dumps(e) for e in events), "[DONE]"]:
            data = f"data: {item}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


def make_server(argv: list[str], env: Mapping[str, str] | None = None) -> FakeServer:
    return FakeServer(parse_args(argv), os.environ if env is None else env)


def serve_in_thread(argv: list[str], env: Mapping[str, str] | None = None) -> tuple[FakeServer, threading.Thread]:
    """Serve in a daemon thread; ``--port 0`` picks a free port (``server.server_address``).
    Stop with ``server.shutdown(); server.server_close()``."""
    server = make_server(argv, env)
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    return server, thread


def main(argv: list[str] | None = None) -> int:
    server = make_server(sys.argv[1:] if argv is None else argv)

    def on_term(_signum: int, _frame: object) -> None:
        server.stopping.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    names, port = server.args.served_model_name, server.server_address[1]
    sys.stderr.write(f"fake[{server.ident}] serving {names} on {server.args.host}:{port}\n")
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stopping.set()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
