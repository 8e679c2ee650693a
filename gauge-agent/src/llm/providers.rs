//! The provider table: which request is an LLM API call, of which provider and API.
//! Recognition is by path shape (so OpenAI-compatible servers are seen wherever they
//! run) and the provider label comes from the host when it is a known one.

use crate::http::RequestHead;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    OpenAi,
    AzureOpenAi,
    Anthropic,
    Gemini,
    OpenRouter,
    Groq,
    Mistral,
    DeepSeek,
    Ollama,
    /// A server speaking an OpenAI API at a host Gauge does not know (vLLM, LiteLLM...).
    OpenAiCompatible,
}

impl Provider {
    pub fn label(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::AzureOpenAi => "azure_openai",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
            Self::OpenRouter => "openrouter",
            Self::Groq => "groq",
            Self::Mistral => "mistral",
            Self::DeepSeek => "deepseek",
            Self::Ollama => "ollama",
            Self::OpenAiCompatible => "openai_compatible",
        }
    }
}

/// The API a call uses; it decides how usage is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ChatCompletions,
    Responses,
    Embeddings,
    Messages,
    GenerateContent,
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Responses => "responses",
            Self::Embeddings => "embeddings",
            Self::Messages => "messages",
            Self::GenerateContent => "generate_content",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recognized {
    pub provider: Provider,
    pub endpoint: Endpoint,
    /// Model named in the path (Gemini, Azure deployments), if any.
    pub path_model: Option<String>,
    /// The path itself asks for a stream (Gemini's `streamGenerateContent`).
    pub path_stream: bool,
}

/// Hosts with a provider label of their own (suffix match, port ignored).
const HOSTS: [(&str, Provider); 9] = [
    ("api.openai.com", Provider::OpenAi),
    (".openai.azure.com", Provider::AzureOpenAi),
    ("api.anthropic.com", Provider::Anthropic),
    ("generativelanguage.googleapis.com", Provider::Gemini),
    ("openrouter.ai", Provider::OpenRouter),
    ("api.groq.com", Provider::Groq),
    ("api.mistral.ai", Provider::Mistral),
    ("api.deepseek.com", Provider::DeepSeek),
    (":11434", Provider::Ollama),
];

fn host_provider(host: &str) -> Option<Provider> {
    let host = host.to_ascii_lowercase();
    if host.ends_with(":11434") {
        return Some(Provider::Ollama);
    }
    let name = host.split(':').next().unwrap_or("");
    HOSTS.iter().find(|(suffix, _)| name.ends_with(suffix)).map(|(_, p)| *p)
}

/// Recognises an LLM API request from its head, or `None` for other traffic.
pub fn recognize(head: &RequestHead) -> Option<Recognized> {
    if head.method != "POST" {
        return None;
    }
    let path = head.path.split('?').next().unwrap_or("");
    let host = head.headers.get("host").or_else(|| head.headers.get(":authority")).unwrap_or("");
    let known = host_provider(host);
    if let Some((model, stream)) = gemini_path(path) {
        return Some(Recognized {
            provider: Provider::Gemini,
            endpoint: Endpoint::GenerateContent,
            path_model: Some(model),
            path_stream: stream,
        });
    }
    let (endpoint, default) = if path.ends_with("/chat/completions") {
        (Endpoint::ChatCompletions, Provider::OpenAiCompatible)
    } else if path.ends_with("/responses") {
        (Endpoint::Responses, Provider::OpenAiCompatible)
    } else if path.ends_with("/embeddings") {
        (Endpoint::Embeddings, Provider::OpenAiCompatible)
    } else if path.ends_with("/v1/messages") {
        (Endpoint::Messages, Provider::Anthropic)
    } else {
        return None;
    };
    // Azure: /openai/deployments/{deployment}/chat/completions
    let path_model = path
        .split("/deployments/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .map(str::to_owned);
    let provider = match (known, endpoint) {
        // Anthropic's own host also serves an OpenAI-compatible API; label by host.
        (Some(p), _) => p,
        (None, _) if path_model.is_some() => Provider::AzureOpenAi,
        (None, _) => default,
    };
    Some(Recognized { provider, endpoint, path_model, path_stream: false })
}

/// Recognises an LLM request by its JSON body alone, for HTTP/2 streams whose headers
/// could not be decoded (attached mid-connection). The endpoint is a best guess:
/// `messages` is taken for chat completions until the response shows Anthropic's
/// envelope (see `CallTracker`).
pub fn recognize_body(body: &serde_json::Value) -> Option<Recognized> {
    let fields = body.as_object()?;
    let (provider, endpoint) = if fields.contains_key("contents") {
        (Provider::Gemini, Endpoint::GenerateContent)
    } else if !fields.contains_key("model") {
        return None;
    } else if fields.contains_key("messages") {
        (Provider::OpenAiCompatible, Endpoint::ChatCompletions)
    } else if fields.contains_key("input") && fields.get("input").is_some_and(|i| !i.is_string() || fields.len() > 2) {
        (Provider::OpenAiCompatible, Endpoint::Responses)
    } else if fields.contains_key("input") {
        (Provider::OpenAiCompatible, Endpoint::Embeddings)
    } else {
        return None;
    };
    Some(Recognized { provider, endpoint, path_model: None, path_stream: false })
}

/// `/v1beta/models/{model}:generateContent` or `:streamGenerateContent`.
fn gemini_path(path: &str) -> Option<(String, bool)> {
    let (before, action) = path.rsplit_once(':')?;
    let stream = match action {
        "generateContent" => false,
        "streamGenerateContent" => true,
        _ => return None,
    };
    let model = before.rsplit_once("/models/")?.1;
    Some((model.to_owned(), stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Headers;

    fn head(path: &str, host: &str) -> RequestHead {
        RequestHead {
            method: "POST".into(),
            path: path.into(),
            headers: Headers(vec![("host".into(), host.as_bytes().to_vec())]),
        }
    }

    #[test]
    fn the_table_recognises_each_provider_shape() {
        let cases = [
            ("/v1/chat/completions", "api.openai.com", Provider::OpenAi, Endpoint::ChatCompletions),
            ("/v1/responses", "api.openai.com", Provider::OpenAi, Endpoint::Responses),
            ("/v1/embeddings", "api.openai.com", Provider::OpenAi, Endpoint::Embeddings),
            ("/v1/messages", "api.anthropic.com", Provider::Anthropic, Endpoint::Messages),
            ("/v1/messages", "127.0.0.1:8443", Provider::Anthropic, Endpoint::Messages),
            ("/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21", "x.openai.azure.com", Provider::AzureOpenAi, Endpoint::ChatCompletions),
            ("/api/v1/chat/completions", "openrouter.ai", Provider::OpenRouter, Endpoint::ChatCompletions),
            ("/openai/v1/chat/completions", "api.groq.com", Provider::Groq, Endpoint::ChatCompletions),
            ("/v1/chat/completions", "localhost:11434", Provider::Ollama, Endpoint::ChatCompletions),
            ("/v1/chat/completions", "10.0.0.5:8000", Provider::OpenAiCompatible, Endpoint::ChatCompletions),
            ("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", "generativelanguage.googleapis.com", Provider::Gemini, Endpoint::GenerateContent),
        ];
        for (path, host, provider, endpoint) in cases {
            let r = recognize(&head(path, host)).unwrap_or_else(|| panic!("{path} at {host}"));
            assert_eq!((r.provider, r.endpoint), (provider, endpoint), "{path} at {host}");
        }
        let gemini = recognize(&head("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", "g")).expect("gemini");
        assert_eq!(gemini.path_model.as_deref(), Some("gemini-2.5-flash"));
        assert!(gemini.path_stream);
    }

    #[test]
    fn other_traffic_is_not_an_llm_call() {
        assert_eq!(recognize(&head("/v1/models", "api.openai.com")), None);
        assert_eq!(recognize(&head("/index.html", "example.com")), None);
        let mut get = head("/v1/chat/completions", "api.openai.com");
        get.method = "GET".into();
        assert_eq!(recognize(&get), None);
    }
}
