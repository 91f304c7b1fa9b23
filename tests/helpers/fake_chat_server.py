"""A tiny OpenAI-compatible chat-completions server (stdlib ``http.server``) for the server explainer's tests.

``FakeChatServer(mode)`` listens on 127.0.0.1 (a free port) in a thread; ``mode`` may be
changed while it runs:

    ok        answers ``text`` as the assistant message
    slow      sleeps ``delay`` seconds before answering (past the client's timeout)
    garbage   answers HTTP 200 with a body that is not JSON
    empty     answers a well-formed completion whose content is ""
    context   answers HTTP 400 ``context_length_exceeded`` (llama.cpp's server's body) when the
              prompt shows more than ``max_excerpts`` exemplars, else as ``ok``
    poison    answers HTTP 500 to a prompt that contains ``poison``, else as ``ok``
    number    answers a completion whose content is the number 7, not text
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeChatServer:
    def __init__(self, mode: str = "ok", text: str = "Explanation: the word \"Paris\"\nmore text", delay: float = 3.0):
        self.mode, self.text, self.delay = mode, text, delay
        self.max_excerpts = 3
        self.poison = "<< seven>>"
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, payload: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                owner.requests.append(body)
                if owner.mode == "slow":
                    time.sleep(owner.delay)
                user = body.get("messages", [{}])[-1].get("content", "")
                if owner.mode == "context" and user.count("Excerpt ") > owner.max_excerpts:
                    return self._send(400, json.dumps({"error": {
                        "message": "This model's maximum context length is 2048 tokens. However, you requested 3091 tokens.",
                        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}).encode())
                if owner.mode == "poison" and owner.poison in user:
                    return self._send(500, json.dumps({"error": {"message": "poisoned prompt", "type": "server_error"}}).encode())
                if owner.mode == "garbage":
                    return self._send(200, b"{this is not json")
                content: object = "" if owner.mode == "empty" else 7 if owner.mode == "number" else owner.text
                self._send(200, json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body.get("model", ""),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
