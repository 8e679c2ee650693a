//! What a request says about who it is for: the headers attribution may match on,
//! and the body's user and metadata fields. Credentials never enter it.

use crate::http::Headers;

/// Header fields kept per call, and bytes per value: enough for any agent or
/// workflow marker, bounded against hostile clients.
const MAX_HEADERS: usize = 64;
const MAX_VALUE: usize = 512;
const MAX_METADATA: usize = 16;

/// Headers that carry credentials or session state: never kept.
const SECRET_HEADERS: [&str; 8] =
    ["authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie", "set-cookie", "openai-organization"];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestContext {
    /// Lower-case names; credential headers left out.
    pub headers: Vec<(String, String)>,
    /// OpenAI's `user` field.
    pub user: Option<String>,
    /// String values of the body's `metadata` object (OpenAI, Anthropic `user_id`).
    pub metadata: Vec<(String, String)>,
    /// Hash of the tool calls the model made last in this conversation (the latest
    /// assistant turn the request carries): the same value request after request
    /// means the agent keeps calling the same tool with the same arguments.
    pub last_tool_calls: Option<u64>,
}

impl RequestContext {
    pub fn from_headers(headers: &Headers) -> Self {
        let headers = headers
            .0
            .iter()
            .filter(|(name, _)| !SECRET_HEADERS.contains(&name.as_str()))
            .filter_map(|(name, value)| Some((name.clone(), bounded(std::str::from_utf8(value).ok()?.trim()))))
            .take(MAX_HEADERS)
            .collect();
        Self { headers, ..Self::default() }
    }

    /// Takes `user`, `metadata` and the last tool calls from a parsed request body.
    pub fn read_body(&mut self, body: &serde_json::Value) {
        self.last_tool_calls = last_tool_calls(body);
        self.user = body.get("user").and_then(|u| u.as_str()).map(bounded);
        if let Some(metadata) = body.get("metadata").and_then(|m| m.as_object()) {
            self.metadata = metadata
                .iter()
                .filter_map(|(k, v)| Some((bounded(k), bounded(v.as_str()?))))
                .take(MAX_METADATA)
                .collect();
        }
    }

    /// A header's value; names compare case-insensitively; `""` names none.
    pub fn header(&self, name: &str) -> Option<&str> {
        if name.is_empty() {
            return None;
        }
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// The tool calls of the latest assistant turn in a request: OpenAI chat
/// (`messages[].tool_calls[].function`), Anthropic (`messages[].content[]` of type
/// `tool_use`), OpenAI Responses (`input[]` items of type `function_call`).
fn last_tool_calls(body: &serde_json::Value) -> Option<u64> {
    use std::hash::{DefaultHasher, Hash as _, Hasher as _};
    let mut hasher = DefaultHasher::new();
    let mut any = false;
    let mut add = |name: &serde_json::Value, args: &serde_json::Value| {
        name.to_string().hash(&mut hasher);
        args.to_string().hash(&mut hasher);
        any = true;
    };
    if let Some(messages) = body.get("messages").and_then(|m| m.as_array()) {
        let last = messages.iter().rev().find(|m| m.get("role").and_then(|r| r.as_str()) == Some("assistant"))?;
        for call in last.get("tool_calls").and_then(|c| c.as_array()).into_iter().flatten() {
            let function = &call["function"];
            add(&function["name"], &function["arguments"]);
        }
        for block in last.get("content").and_then(|c| c.as_array()).into_iter().flatten() {
            if block.get("type").and_then(|t| t.as_str()) == Some("tool_use") {
                add(&block["name"], &block["input"]);
            }
        }
    } else if let Some(items) = body.get("input").and_then(|i| i.as_array()) {
        // The latest run of function calls, after the last user message.
        let turn = items.iter().rposition(|i| i.get("role").and_then(|r| r.as_str()) == Some("user")).map_or(0, |p| p + 1);
        for item in &items[turn..] {
            if item.get("type").and_then(|t| t.as_str()) == Some("function_call") {
                add(&item["name"], &item["arguments"]);
            }
        }
    }
    any.then(|| hasher.finish())
}

fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_VALUE);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_never_kept_and_markers_are() {
        let headers = Headers(vec![
            ("authorization".into(), b"Bearer sk-secret".to_vec()),
            ("x-api-key".into(), b"sk-ant-secret".to_vec()),
            ("x-gauge-workflow".into(), b" triage ".to_vec()),
        ]);
        let context = RequestContext::from_headers(&headers);
        assert_eq!(context.headers, vec![("x-gauge-workflow".to_owned(), "triage".to_owned())]);
        assert_eq!(context.header("X-Gauge-Workflow"), Some("triage"));
        assert_eq!(context.header(""), None);
    }

    #[test]
    fn the_last_tool_calls_name_a_pattern_across_requests() {
        let turn = |history: &str, args: &str| {
            let body = serde_json::json!({"messages": [
                {"role": "user", "content": history},
                {"role": "assistant", "tool_calls": [{"id": history, "type": "function", "function": {"name": "lookup", "arguments": args}}]},
                {"role": "tool", "tool_call_id": history, "content": "not found"},
            ]});
            let mut c = RequestContext::default();
            c.read_body(&body);
            c.last_tool_calls
        };
        assert!(turn("a", "{\"id\":1}").is_some());
        assert_eq!(turn("a", "{\"id\":1}"), turn("a much longer history", "{\"id\":1}"), "call ids and history do not count");
        assert_ne!(turn("a", "{\"id\":1}"), turn("a", "{\"id\":2}"));
        let anthropic = serde_json::json!({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "x", "name": "lookup", "input": {"id": 1}}]}]});
        let mut c = RequestContext::default();
        c.read_body(&anthropic);
        assert!(c.last_tool_calls.is_some());
        let plain = serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
        c.read_body(&plain);
        assert_eq!(c.last_tool_calls, None);
    }

    #[test]
    fn body_user_and_metadata_are_read_and_bounded() {
        let mut context = RequestContext::default();
        let long = "é".repeat(400);
        let body = serde_json::json!({"user": long, "metadata": {"user_id": "cust-7", "n": 3}});
        context.read_body(&body);
        assert_eq!(context.metadata("user_id"), Some("cust-7"));
        assert_eq!(context.metadata("n"), None);
        assert_eq!(context.user.as_deref().map(str::len), Some(512));
    }
}
