"""Fake OpenAI-compatible server standing in for vLLM in tests (stdlib only).

Takes vLLM's ``api_server`` arguments (other flags are ignored), e.g.::

    python tests/fakes/fake_openai.py --port 18001 --served-model-name Qwen/Qwen2.5-7B-Instruct-AWQ

GET /health, GET /v1/models, POST /v1/chat/completions (``stream`` too), /v1/completions,
/v1/embeddings. Answers say who answered: ``fake:<served-name>@<FAKE_NAME or host:port>``
(also the ``x-fake-server`` header). Like vLLM: an unknown ``model`` gets 404; with
``--api-key`` /v1/* needs ``Authorization: Bearer <key>``; with ``--max-model-len`` a prompt
whose word count plus ``max_tokens`` exceeds it gets 400 "maximum context length".
``--served-model-name '*'`` takes any ``model`` (a stand-in for OpenAI itself, answering
every model it is asked for under that model's name).

GET /metrics serves vLLM's load gauges (``vllm:num_requests_running`` / ``_waiting``: the
requests in flight, of which those beyond ``--max-num-seqs`` wait for a slot); GET /fake/stats
counts what was received per path (``received``) and lists the last API requests
(``requests``: ``{"n", "path", "model", "words", "status"}``, ``n`` counting from 1, the last
1,000 kept; a test tells its own long prompt from the proxy's short health probes by
``words``); GET /fake/mode shows the mode, POST /fake/mode ``{"mode": "hang"}`` sets it
(written to FAKE_MODE_FILE when set). /fake/* ignores the mode.

Environment: FAKE_MODE=ok|hang|error|stall (hang: read the request, never answer; error: 500
on /health and /v1/*; stall: /v1/* answers its headers, then nothing), FAKE_DELAY_S (added
latency), FAKE_MODE_FILE (mode re-read from it on every request, and every 0.1 s by hanging
requests, which answer once it changes), FAKE_NAME, FAKE_TOKEN_DELAY_S (when > 0: a
completion generates ``max_tokens`` (default 16) tokens, this many seconds each, streamed one
chunk per token), FAKE_LOAD_S (command line only: like vLLM loading its model, the port stays
closed this long, with vLLM's log lines "Starting to load model", "Loading safetensors
checkpoint shards: N% Completed", then "Loading model weights took ...").
One line per request on stderr. SIGTERM exits 0.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODES = ("ok", "hang", "error", "stall")
DEFAULT_MAX_TOKENS = 16
KEPT_REQUESTS = 1000


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
    p.add_argument("--max-num-seqs", type=int, default=256)
    if argv[:1] == ["serve"]:  # `vllm serve MODEL ...`
        argv = argv[1:]
    if argv and not argv[0].startswith("-"):
        argv = ["--model", *argv]
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
        self.waiting = 0
        self.slots = threading.BoundedSemaphore(max(1, args.max_num_seqs))
        self.received: dict[str, int] = {}
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=KEPT_REQUESTS)
        self.seen = 0  # API requests received, the ``n`` of the last one in ``requests``
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

    def set_mode(self, mode: str) -> None:
        if path := self.env.get("FAKE_MODE_FILE"):
            tmp = f"{path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(mode + "\n")
            os.replace(tmp, path)
        else:
            self.env["FAKE_MODE"] = mode

    def token_delay(self) -> float:
        return max(float(self.env.get("FAKE_TOKEN_DELAY_S") or 0), 0.0)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """A generation slot (vLLM's ``--max-num-seqs``); the others wait and count as waiting."""
        with self.lock:
            self.waiting += 1
        try:
            self.slots.acquire()
        finally:
            with self.lock:
                self.waiting -= 1
        try:
            yield
        finally:
            self.slots.release()

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
        if path.startswith("/fake/"):
            self.fake_api(path, body)
            return
        counted = path.startswith("/v1/")
        entry: dict[str, Any] = {}
        with self.server.lock:
            self.server.received[path] = self.server.received.get(path, 0) + 1
            self.server.in_flight += counted
            if counted:
                self.server.seen += 1
                got = body or {}
                prompt = got.get("messages", got.get("prompt", got.get("input")))
                entry = {"n": self.server.seen, "path": path, "model": got.get("model"), "words": words(prompt)}
                entry["status"] = None
                self.server.requests.append(entry)
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
                if entry:
                    entry["status"] = self.status or None
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
        served = self.server.args.served_model_name
        if "*" not in served and body.get("model") not in (None, *served):
            return self.fail(404, f"The model `{body['model']}` does not exist.", "NotFoundError")
        with self.server.slot():
            handler(body)

    def fake_api(self, path: str, body: dict[str, Any] | None) -> None:
        """The fake's own controls; they answer whatever the mode."""
        server = self.server
        if path == "/fake/stats" and body is None:
            with server.lock:
                stats = {"received": dict(server.received), "in_flight": server.in_flight,
                         "requests": [dict(e) for e in server.requests]}  # fmt: skip
            return self.send_json(200, stats)
        if path == "/fake/mode" and body is None:
            return self.send_json(200, {"mode": server.mode()})
        if path == "/fake/mode" and (mode := (body or {}).get("mode")) in MODES:
            server.set_mode(str(mode))
            return self.send_json(200, {"mode": server.mode()})
        if path == "/fake/mode":
            return self.fail(400, f"mode must be one of {', '.join(MODES)}", "BadRequestError")
        self.send_json(404, {"detail": "Not Found"})

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
        text, produced = f"fake:{name}@{self.server.ident}", 1
        if self.server.token_delay() > 0:
            produced = max(int(body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS), 1)
            text += "".join(f" {i}" for i in range(1, produced))
        usage = {"prompt_tokens": tokens, "completion_tokens": produced, "total_tokens": tokens + produced}
        return text, usage

    def tokens_of(self, text: str) -> list[str]:
        """The pieces a stream sends: the whole text, or one per token when generating slowly."""
        if self.server.token_delay() <= 0:
            return [text]
        first, *rest = text.split(" ")
        return [first, *(f" {t}" for t in rest)]

    def generate(self, count: int) -> bool:
        """Wait as long as ``count`` tokens take; False when the server stops meanwhile."""
        delay = self.server.token_delay() * count
        return not (delay > 0 and self.server.stopping.wait(delay))

    def metrics(self) -> None:
        name = self.server.args.served_model_name[0]
        waiting = max(self.server.waiting, 0)
        running = max(self.server.in_flight - waiting, 0)
        text = (
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{name}"}} {running}.0\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="{name}"}} {waiting}.0\n'
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
            if not self.generate(usage["completion_tokens"]):
                return None
            msg = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": msg, "finish_reason": "stop", "logprobs": None}
            out = self.base(body, "chatcmpl", "chat.completion")
            return self.send_json(200, {**out, "choices": [choice], "usage": usage})
        chunk = self.base(body, "chatcmpl", "chat.completion.chunk")
        pieces = [{"content": t} for t in self.tokens_of(text)]
        deltas: list[dict[str, str]] = [{"role": "assistant", "content": ""}, *pieces, {}]
        events = [{**chunk, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
                  for d in deltas]  # fmt: skip
        events[-1]["choices"][0]["finish_reason"] = "stop"
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**chunk, "choices": [], "usage": usage})
        self.send_sse(events, paced=range(1, len(pieces) + 1) if len(pieces) > 1 else range(0))

    def completions(self, body: dict[str, Any]) -> None:
        if (answer := self.answer(body, body.get("prompt"))) is None or not self.generate(
            answer[1]["completion_tokens"]
        ):
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

    def send_sse(self, events: list[dict[str, Any]], paced: range = range(0)) -> None:
        """Server-sent events; those at the ``paced`` indexes wait one token's delay each."""
        self.start_response(200, "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for index, item in enumerate([*(json.dumps(e) for e in events), "[DONE]"]):
            if index in paced and not self.generate(1):
                return
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


def vllm_log(message: str) -> None:
    """A line in vLLM's log format (the agent reads the loading stage from these)."""
    sys.stderr.write(f"INFO {time.strftime('%m-%d %H:%M:%S')} fake_vllm.py] {message}\n")
    sys.stderr.flush()


def load_model(args: argparse.Namespace, seconds: float) -> None:
    """Like vLLM before it listens: the port stays closed while the model loads."""
    vllm_log(f"Starting to load model {args.model}...")
    start, steps = time.monotonic(), 4
    for step in range(1, steps + 1):
        time.sleep(seconds / steps)
        vllm_log(f"Loading safetensors checkpoint shards: {100 * step // steps}% Completed | {step}/{steps}")
    vllm_log(f"Loading model weights took 0.0000 GB and {time.monotonic() - start:.6f} seconds")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def on_term(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    load_s = float(os.environ.get("FAKE_LOAD_S") or 0)
    if load_s > 0:
        load_model(parse_args(argv), load_s)
    server = make_server(argv)
    names, port = server.args.served_model_name, server.server_address[1]
    sys.stderr.write(f"fake[{server.ident}] serving {names} on {server.args.host}:{port}\n")
    vllm_log(f"Uvicorn running on http://{server.args.host}:{port} (Press CTRL+C to quit)")
    try:
        server.serve_forever(poll_interval=0.1)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.stopping.set()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
