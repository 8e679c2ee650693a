"""A local HTTPS mock of the OpenAI and Anthropic APIs for end-to-end tests.

Served by hypercorn: HTTP/1.1 and HTTP/2 (chosen by ALPN), with fixed, known usage so
a test can compare Gauge's metrics with what was served. Streams are server-sent
events. JSON responses are gzip-compressed when the client accepts gzip.

Usage: llm_server.py CERT KEY PORT_FILE (the server binds a free port itself, so
concurrent tests cannot race for one, and writes it to PORT_FILE once listening)
Models with special behaviour:
  "fail-once-*": the first request with a given body gets 429 (retry-after-ms: 10).
  "always-429-*": every request gets 429 (retry-after-ms: 10).
Every complete request is counted by model in PORT_FILE.received (JSON), so a test
can tell what reached the provider.
"""
import asyncio
import base64
import gzip
import json
import struct
import sys

CHAT_USAGE = {"prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28,
              "prompt_tokens_details": {"cached_tokens": 5, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 0}}
# Responses name the model asked for plus a dated suffix, so that concurrent tests
# can tell their calls apart by the model label.
CHAT_SUFFIX = "-2024-07-18"
MESSAGES_USAGE = {"input_tokens": 9, "cache_creation_input_tokens": 3,
                  "cache_read_input_tokens": 4, "output_tokens": 11}
MESSAGES_SUFFIX = "-20250929"

RESPONSES_USAGE = {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 10},
                   "output_tokens": 12, "output_tokens_details": {"reasoning_tokens": 5}, "total_tokens": 32}
EMBEDDINGS_USAGE = {"prompt_tokens": 8, "total_tokens": 8}
GEMINI_USAGE = {"promptTokenCount": 12, "cachedContentTokenCount": 2, "candidatesTokenCount": 4,
                "thoughtsTokenCount": 6, "totalTokenCount": 22}

seen_bodies = set()
received = {}
received_file = None


def count(model):
    received[model] = received.get(model, 0) + 1
    tmp = received_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(received, f)
    import os
    os.rename(tmp, received_file)


async def read_body(receive):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def send_json(send, status, payload, accept_gzip, headers=()):
    body = json.dumps(payload).encode()
    extra = [(b"x-request-id", b"req_mock")] + [(k.encode(), v.encode()) for k, v in headers]
    if accept_gzip:
        body = gzip.compress(body)
        extra.append((b"content-encoding", b"gzip"))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + extra})
    await send({"type": "http.response.body", "body": body})


async def send_sse(send, events):
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
    for event in events:
        await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        await asyncio.sleep(0.001)
    await send({"type": "http.response.body", "body": b""})


def chat_events(request):
    include_usage = (request.get("stream_options") or {}).get("include_usage")
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": request["model"] + CHAT_SUFFIX}
    events = []
    for word in ["Hel", "lo", "!"]:
        chunk = dict(base, choices=[{"index": 0, "delta": {"content": word}, "finish_reason": None}])
        if include_usage:
            chunk["usage"] = None
        events.append("data: %s\n\n" % json.dumps(chunk))
    if include_usage:
        events.append("data: %s\n\n" % json.dumps(dict(base, choices=[], usage=CHAT_USAGE)))
    events.append("data: [DONE]\n\n")
    return events


def message_events(request):
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": request["model"] + MESSAGES_SUFFIX,
               "content": [], "stop_reason": None, "stop_sequence": None}
    events = [
        ("message_start", {"type": "message_start", "message": dict(message, usage=dict(MESSAGES_USAGE, output_tokens=1))}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi!"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": MESSAGES_USAGE["output_tokens"]}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return ["event: %s\ndata: %s\n\n" % (name, json.dumps(data)) for name, data in events]


def response_object(model, status, usage):
    return {"id": "resp_1", "object": "response", "created_at": 0, "status": status, "model": model,
            "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": "Hi!", "annotations": []}]}],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": usage}


def responses_events(model):
    events = [
        ("response.created", {"type": "response.created", "sequence_number": 0,
                              "response": response_object(model, "in_progress", None)}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_1",
                                        "output_index": 0, "content_index": 0, "delta": "Hi!", "logprobs": []}),
        ("response.completed", {"type": "response.completed", "sequence_number": 2,
                                "response": response_object(model, "completed", RESPONSES_USAGE)}),
    ]
    return ["event: %s\ndata: %s\n\n" % (name, json.dumps(data)) for name, data in events]


def gemini_chunk(model, text, usage):
    return {"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}],
            "usageMetadata": usage, "modelVersion": model + "-001"}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    headers = dict(scope["headers"])
    accept_gzip = b"gzip" in headers.get(b"accept-encoding", b"")
    raw = await read_body(receive)
    request = json.loads(raw or b"{}")
    model = request.get("model", "")
    count(model)
    if model.startswith("always-429"):
        await send_json(send, 429, {"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}},
                        accept_gzip, headers=[("retry-after-ms", "10")])
        return
    if model.startswith("fail-once"):
        first = raw not in seen_bodies
        seen_bodies.add(raw)
        if first:
            await send_json(send, 429, {"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}},
                            accept_gzip, headers=[("retry-after-ms", "10")])
            return
    path = scope["path"]
    if ":generateContent" in path or ":streamGenerateContent" in path:
        gemini_model = path.split("/models/")[-1].split(":")[0]
        if ":streamGenerateContent" in path:
            partial = {"promptTokenCount": 12, "totalTokenCount": 12}
            await send_sse(send, ["data: %s\r\n\r\n" % json.dumps(gemini_chunk(gemini_model, "Hi", partial)),
                                  "data: %s\r\n\r\n" % json.dumps(gemini_chunk(gemini_model, "!", GEMINI_USAGE))])
        else:
            await send_json(send, 200, gemini_chunk(gemini_model, "Hi!", GEMINI_USAGE), accept_gzip)
    elif path.endswith("/responses"):
        if request.get("stream"):
            await send_sse(send, responses_events(model + CHAT_SUFFIX))
        else:
            await send_json(send, 200, response_object(model + CHAT_SUFFIX, "completed", RESPONSES_USAGE), accept_gzip)
    elif path.endswith("/embeddings"):
        vector = [0.25, 0.5]
        if request.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack("<2f", *vector)).decode()
        await send_json(send, 200, {"object": "list", "model": model + CHAT_SUFFIX, "usage": EMBEDDINGS_USAGE,
                                    "data": [{"object": "embedding", "index": 0, "embedding": vector}]}, accept_gzip)
    elif path.endswith("/chat/completions"):
        if request.get("stream"):
            await send_sse(send, chat_events(request))
        else:
            await send_json(send, 200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model + CHAT_SUFFIX,
                                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                                                     "finish_reason": "stop"}], "usage": CHAT_USAGE}, accept_gzip)
    elif path.endswith("/v1/messages"):
        if request.get("stream"):
            await send_sse(send, message_events(request))
        else:
            await send_json(send, 200, {"id": "msg_1", "type": "message", "role": "assistant", "model": model + MESSAGES_SUFFIX,
                                        "content": [{"type": "text", "text": "Hi!"}], "stop_reason": "end_turn",
                                        "stop_sequence": None, "usage": MESSAGES_USAGE}, accept_gzip)
    else:
        await send_json(send, 404, {"error": {"type": "not_found"}}, False)


def main():
    from hypercorn.asyncio import serve
    from hypercorn.config import Config
    import os
    import socket
    global received_file
    # CERT KEY PORT_FILE [PORT]; CERT "-" serves plain HTTP (as local model servers do).
    cert, key, port_file = sys.argv[1:4]
    port = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    received_file = port_file + ".received"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    config = Config()
    config.bind = ["fd://%d" % sock.fileno()]
    if cert != "-":
        config.certfile, config.keyfile = cert, key
        config.alpn_protocols = ["h2", "http/1.1"]
    config.accesslog = None
    # Kept-alive connections outlive a daemon's start (hypercorn's default is 5 s).
    config.keep_alive_timeout = 600
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(sock.getsockname()[1]))
    os.rename(tmp, port_file)
    asyncio.run(serve(app, config))


if __name__ == "__main__":
    main()
