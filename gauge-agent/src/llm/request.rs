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

    /// Takes `user` and `metadata` from a parsed request body.
    pub fn read_body(&mut self, body: &serde_json::Value) {
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
