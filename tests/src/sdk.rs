//! Client programs driving the official SDKs against [`crate::mock::MockLlm`]; each
//! prints "ok" when every call succeeded. `GAUGE_TEST_PORT` names the mock's port.

/// openai (chat plain, streamed, 429-then-retry, stream without usage) and anthropic
/// (plain, streamed), over HTTP/1.1.
pub const SDK_CALLS: &str = r#"
import os, anthropic, openai
base = "https://127.0.0.1:%s" % os.environ["GAUGE_TEST_PORT"]
msgs = [{"role": "user", "content": "hi"}]
oa = openai.OpenAI(base_url=base + "/v1", api_key="sk-test-secret-0123456789abcdef")
oa.chat.completions.create(model="gpt-4o-mini", messages=msgs)
for _ in oa.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True, stream_options={"include_usage": True}):
    pass
oa.chat.completions.create(model="fail-once-a", messages=msgs)
for _ in oa.chat.completions.create(model="gpt-4o-mini-est", messages=msgs, stream=True):
    pass
an = anthropic.Anthropic(base_url=base, api_key="sk-ant-test-secret-0123456789abcdef")
an.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=msgs)
for _ in an.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=msgs, stream=True):
    pass
print("ok")
"#;

/// The same SDKs over HTTP/2 (httpx2 with `http2=True`).
pub const SDK_HTTP2: &str = r#"
import os, anthropic, httpx2 as httpx, openai
base = "https://127.0.0.1:%s" % os.environ["GAUGE_TEST_PORT"]
msgs = [{"role": "user", "content": "hi"}]
oa = openai.OpenAI(base_url=base + "/v1", api_key="sk-test-secret-0123456789abcdef", http_client=httpx.Client(http2=True))
oa.chat.completions.create(model="gpt-4o-mini-h2", messages=msgs)
for _ in oa.chat.completions.create(model="gpt-4o-mini-h2", messages=msgs, stream=True, stream_options={"include_usage": True}):
    pass
an = anthropic.Anthropic(base_url=base, api_key="sk-ant-test-secret-0123456789abcdef", http_client=httpx.Client(http2=True))
for _ in an.messages.create(model="claude-h2", max_tokens=64, messages=msgs, stream=True):
    pass
print("ok")
"#;

/// openai Responses (plain, streamed) and Embeddings; google-genai (plain, streamed).
pub const SDK_OTHER_APIS: &str = r#"
import os, openai
from google import genai
from google.genai import types
base = "https://127.0.0.1:%s" % os.environ["GAUGE_TEST_PORT"]
oa = openai.OpenAI(base_url=base + "/v1", api_key="sk-test-secret-0123456789abcdef")
oa.responses.create(model="gpt-5-mini", input="hi")
for _ in oa.responses.create(model="gpt-5-mini", input="hi", stream=True):
    pass
oa.embeddings.create(model="text-embedding-3-small", input="hi")
g = genai.Client(api_key="AIzaTestSecret0123456789abcdefghijklmno", http_options=types.HttpOptions(base_url=base))
g.models.generate_content(model="gemini-2.5-flash", contents="hi")
for _ in g.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"):
    pass
print("ok")
"#;

/// node's own `https` (OpenSSL linked into the executable): a streamed Anthropic
/// message with model `claude-node`. Waits for a line on stdin before connecting.
pub const NODE_ANTHROPIC_STREAM: &str = r#"
const https = require('https');
process.stdin.once('data', () => {
  const body = JSON.stringify({model: 'claude-node', max_tokens: 64, stream: true, messages: [{role: 'user', content: 'hi'}]});
  const req = https.request({host: '127.0.0.1', port: Number(process.env.GAUGE_TEST_PORT), path: '/v1/messages', method: 'POST',
    headers: {'content-type': 'application/json', 'x-api-key': 'sk-ant-test-secret-0123456789abcdef', 'anthropic-version': '2023-06-01'}}, res => {
    res.on('data', () => {}); res.on('end', () => { console.log('ok'); process.exit(0); });
  });
  req.end(body);
});
"#;
