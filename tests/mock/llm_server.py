"""A local HTTPS mock of the OpenAI and Anthropic APIs for end-to-end tests.

Serves HTTP/1.1 over TLS with fixed, known usage so a test can compare Gauge's
metrics with what was served. Streams use chunked server-sent events.

Usage: llm_server.py CERT KEY PORT_FILE
Models with special behaviour:
  "fail-once-*": the first request with a given body gets 429 (retry-after-ms: 10).
"""
import json
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHAT_USAGE = {"prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28,
              "prompt_tokens_details": {"cached_tokens": 5, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 0}}
CHAT_MODEL = "gpt-4o-mini-2024-07-18"
MESSAGES_USAGE = {"input_tokens": 9, "cache_creation_input_tokens": 3,
                  "cache_read_input_tokens": 4, "output_tokens": 11}
MESSAGES_MODEL = "claude-sonnet-4-5-20250929"

seen_bodies = set()
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, status, payload, headers=()):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-request-id", "req_mock")
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def send_sse(self, events):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in events:
            data = event.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        request = json.loads(raw or b"{}")
        model = request.get("model", "")
        if model.startswith("fail-once"):
            with lock:
                first = raw not in seen_bodies
                seen_bodies.add(raw)
            if first:
                self.send_json(429, {"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}},
                               headers=[("retry-after-ms", "10")])
                return
        if self.path.endswith("/chat/completions"):
            self.chat(request)
        elif self.path.endswith("/v1/messages"):
            self.messages(request)
        else:
            self.send_json(404, {"error": {"type": "not_found"}})

    def chat(self, request):
        if not request.get("stream"):
            self.send_json(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": CHAT_MODEL,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                                              "finish_reason": "stop"}],
                                 "usage": CHAT_USAGE})
            return
        include_usage = (request.get("stream_options") or {}).get("include_usage")
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": CHAT_MODEL}
        events = []
        for word in ["Hel", "lo", "!"]:
            chunk = dict(base, choices=[{"index": 0, "delta": {"content": word}, "finish_reason": None}])
            if include_usage:
                chunk["usage"] = None
            events.append("data: %s\n\n" % json.dumps(chunk))
        if include_usage:
            events.append("data: %s\n\n" % json.dumps(dict(base, choices=[], usage=CHAT_USAGE)))
        events.append("data: [DONE]\n\n")
        self.send_sse(events)

    def messages(self, request):
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": MESSAGES_MODEL,
                   "stop_reason": "end_turn", "stop_sequence": None}
        if not request.get("stream"):
            self.send_json(200, dict(message, content=[{"type": "text", "text": "Hi!"}], usage=MESSAGES_USAGE))
            return
        start_usage = dict(MESSAGES_USAGE, output_tokens=1)
        events = [
            ("message_start", {"type": "message_start", "message": dict(message, content=[], stop_reason=None, usage=start_usage)}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ("ping", {"type": "ping"}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi!"}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": MESSAGES_USAGE["output_tokens"]}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        self.send_sse(["event: %s\ndata: %s\n\n" % (name, json.dumps(data)) for name, data in events])


def main():
    cert, key, port_file = sys.argv[1:4]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with open(port_file, "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
