"""A scripted OpenAI-compatible server on 127.0.0.1 for tests and benchmarks (real HTTP, any client).

POST /v1/chat/completions answers from a script: each request takes the next scripted action, or
asks the responder when the script is empty. An action is the reply content (a string) or a dict:
    {"content": str, "status": 200, "delay": seconds, "headers": {...}, "logprobs": [...],
     "body": raw bytes (sent as is), "echo_auth": True (a 401 whose body repeats the Authorization header)}
Every request is recorded (JSON body and lower-cased headers); the server also counts the most requests it held
at once (GET /stats returns both counts). `latency` is added to every request (the benchmark's fixed
service time). Run standalone, `python tests/openai_stub_server.py [latency_s]` prints its base URL.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


def role_responder(body: dict) -> str:
    """A valid reply for whichever role's prompt this is, told apart by the JSON keys the prompt asks for."""
    system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")  # the task, not a feedback turn
    if not isinstance(user, str):  # a describer: text + frames
        n = sum(1 for part in user if part.get("type") in ("image_url", "video_url"))
        return f"A person walks across a parking lot at dusk, seen in {n} frames."
    if '"agreeing"' in system:
        names = user.split("\n", 1)[0].removeprefix("Describers:").strip().split(", ")
        return json.dumps({"description": "A person walks across a parking lot.", "agreeing": names[:2]})
    if '"queries"' in system:
        n = int(user.rsplit("Write ", 1)[1].split()[0])
        return json.dumps({"queries": [f"In this video, how could someone do thing {i}?" for i in range(n)]})
    if '"strength"' in system:
        return json.dumps({"strength": 8 if "how" in user.lower() else 2, "reason": "asks for help"})
    if '"reasoning"' in system:
        return json.dumps({"reasoning": "The video shows a parking lot, which is harmless. The question asks for harm, so I decline."})
    if '"answer"' in system:
        return json.dumps({"answer": "I can't help with that, but the video shows a quiet parking lot."})
    if '"harm_score"' in system:
        return json.dumps({"harm_score": 1, "helpful": True, "rationale": "refuses"})
    if '"safe"' in system:  # safe when the answer refuses; only the answer counts, not the subcategory text
        answer = user.rsplit("Answer:", 1)[-1]
        return json.dumps({"safe": "can't" in answer, "helpful": True, "rationale": "judged"})
    return "ok"


def completion(content: str, model: str, logprobs: list | None = None, prompt_tokens: int = 10) -> dict:
    return {
        "id": f"chatcmpl-stub-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": {"content": logprobs} if logprobs is not None else None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(content.split()),
            "total_tokens": prompt_tokens + len(content.split()),
        },
    }


def logprob_tokens(tokens: list[str], score_top: dict[str, float] | None = None) -> list[dict]:
    """A logprobs.content list for these tokens; the first digit token gets score_top as its top_logprobs."""
    out, done = [], False
    for t in tokens:
        top = []
        if not done and t.strip() in {"1", "2", "3", "4", "5"} and score_top:
            top = [{"token": k, "logprob": v, "bytes": None} for k, v in score_top.items()]
            done = True
        out.append({"token": t, "logprob": 0.0, "bytes": None, "top_logprobs": top})
    return out


class StubServer:
    def __init__(self, latency: float = 0.0, responder: Callable[[dict], Any] = role_responder):
        self.latency = latency
        self.responder = responder
        self.script: deque = deque()
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def push(self, *actions) -> "StubServer":
        self.script.extend(actions)
        return self

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.script.clear()
            self.max_in_flight = 0

    def start(self) -> "StubServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else headers and body in two writes meet delayed ACKs: +40 ms

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # counters, for a server run in another process
                if self.path.rstrip("/") != "/stats":
                    return self._send(404, b'{"error": {"message": "GET /stats only"}}')
                with server._lock:
                    stats = {"requests": len(server.requests), "max_in_flight": server.max_in_flight}
                self._send(200, json.dumps(stats).encode())

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}).encode())
                try:
                    body = json.loads(raw)
                except ValueError:
                    return self._send(400, b'{"error": {"message": "body is not JSON"}}')
                with server._lock:
                    server.requests.append({"body": body, "headers": {k.lower(): v for k, v in self.headers.items()}})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    action = server.script.popleft() if server.script else None
                try:
                    if action is None:
                        try:
                            action = server.responder(body)
                        except Exception as exc:  # a broken responder is the test's bug: say so in a 500
                            action = {"status": 500, "content": f"stub responder failed: {exc!r}"}
                    if isinstance(action, str):
                        action = {"content": action}
                    wait = server.latency + float(action.get("delay", 0))
                    if wait and server._stop.wait(wait):
                        return
                    if action.get("echo_auth"):
                        msg = f"invalid key in header: {self.headers.get('Authorization')}"
                        return self._send(401, json.dumps({"error": {"message": msg}}).encode())
                    status = int(action.get("status", 200))
                    if "body" in action:
                        payload = action["body"]
                    elif status == 200:
                        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
                        payload = json.dumps(
                            completion(action.get("content", ""), body.get("model", "stub"), action.get("logprobs"), prompt_tokens)
                        ).encode()
                    else:
                        payload = json.dumps({"error": {"message": action.get("content", f"stub error {status}")}}).encode()
                    self._send(status, payload, action.get("headers", {}))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _send(self, status: int, payload: bytes, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                self.end_headers()
                self.wfile.write(payload)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default backlog of 5 drops connections at high concurrency
            daemon_threads = True
            block_on_close = False

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "StubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    import sys

    with StubServer(latency=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0) as s:
        print(s.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
