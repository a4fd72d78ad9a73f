//! The `llm` step's client: one OpenAI-compatible chat completion per call.
//!
//! `POST {KIMI_BASE_URL}/chat/completions` with `KIMI_MODEL` and a bearer
//! `KIMI_API_KEY`, bounded by `VM_LLM_TIMEOUT_MS`. Failures are classified for
//! the queue: timeouts, connection failures, 408/429/5xx are transient (retried
//! with backoff, honouring `Retry-After`); any other 4xx is permanent (the run
//! fails with the status in its reason). Neither the key nor response bodies
//! ever reach an error message.
//!
//! Without a key in local mode the built-in offline model answers instead:
//! deterministic, instant, and clearly labelled, so runs work offline.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{LlmMode, Secret, Settings};
use crate::metrics::{Dependency, Metrics};
use crate::steps::StepError;

/// Model name reported by the offline model.
pub const OFFLINE_MODEL: &str = "vm-offline-echo";

/// What an `llm` step asks.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    /// User message.
    pub prompt: String,
    /// Optional system message.
    pub system: Option<String>,
    /// Optional completion length limit.
    pub max_tokens: Option<u32>,
    /// Optional sampling temperature.
    pub temperature: Option<f32>,
}

/// The step's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmReply {
    /// The assistant's message.
    pub text: String,
    /// The model that answered.
    pub model: String,
    /// Why generation stopped, as reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Token usage, as reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<serde_json::Value>,
}

/// How `llm` steps are answered.
#[derive(Clone)]
pub enum LlmBackend {
    /// The configured endpoint.
    Remote(LlmClient),
    /// The deterministic built-in model.
    Offline,
    /// No endpoint configured; every call fails permanently.
    Unavailable,
}

impl LlmBackend {
    /// Chooses the backend the settings call for.
    pub fn from_settings(settings: &Settings) -> Result<Self, reqwest::Error> {
        Ok(match settings.llm_mode() {
            LlmMode::Remote => LlmBackend::Remote(LlmClient::new(
                &settings.llm.base_url,
                &settings.llm.model,
                settings.llm.api_key.clone(),
                settings.llm.timeout,
            )?),
            LlmMode::Offline => LlmBackend::Offline,
            LlmMode::Unavailable => LlmBackend::Unavailable,
        })
    }

    /// Answers one request.
    pub async fn complete(&self, request: &LlmRequest) -> Result<LlmReply, StepError> {
        match self {
            LlmBackend::Remote(client) => client.complete(request).await,
            LlmBackend::Offline => Ok(offline_reply(request)),
            LlmBackend::Unavailable => Err(StepError::permanent(
                "llm endpoint not configured: set KIMI_API_KEY",
            )),
        }
    }
}

/// A token count in the usual rule of thumb (about four characters a token),
/// at least one: what the offline model reports as its usage.
fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

/// The offline model: echoes a digest of the prompt, deterministically, in
/// the same shape as a remote answer (`text`, `model`, `finish_reason` and an
/// OpenAI-style `usage` estimated from the text), so templates and clients
/// written against one work with the other.
pub fn offline_reply(request: &LlmRequest) -> LlmReply {
    let words: Vec<&str> = request.prompt.split_whitespace().collect();
    let head: Vec<&str> = words.iter().take(24).copied().collect();
    let text = format!(
        "[offline model] {} word(s) received: {}{}",
        words.len(),
        head.join(" "),
        if words.len() > head.len() { " …" } else { "" }
    );
    let prompt_tokens =
        estimate_tokens(&request.prompt) + request.system.as_deref().map_or(0, estimate_tokens);
    let completion_tokens = estimate_tokens(&text);
    LlmReply {
        text,
        model: OFFLINE_MODEL.to_string(),
        finish_reason: Some("stop".to_string()),
        usage: Some(json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        })),
    }
}

/// Client for an OpenAI-compatible chat-completions endpoint.
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    url: String,
    model: String,
    api_key: Option<Secret>,
    metrics: Option<std::sync::Arc<Metrics>>,
}

#[derive(Deserialize)]
struct ChatResponse {
    model: Option<String>,
    choices: Vec<ChatChoice>,
    usage: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ChatChoice {
    message: ChatMessage,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    content: Option<String>,
}

impl LlmClient {
    /// A client for `{base_url}/chat/completions`.
    pub fn new(
        base_url: &str,
        model: &str,
        api_key: Option<Secret>,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        crate::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("vm-webapp/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            model: model.to_string(),
            api_key,
            metrics: None,
        })
    }

    /// Records latency and failures of every call in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Sends one chat completion and classifies the outcome.
    pub async fn complete(&self, request: &LlmRequest) -> Result<LlmReply, StepError> {
        let started = std::time::Instant::now();
        let result = self.call(request).await;
        if let Some(m) = &self.metrics {
            let outcome = match &result {
                Ok(_) => "ok",
                Err((outcome, _)) => outcome,
            };
            m.observe_llm(outcome, started.elapsed());
            if result.is_err() {
                m.dependency_failed(Dependency::llm);
            }
        }
        result.map_err(|(_, e)| e)
    }

    /// One call; errors carry a fixed outcome name for metrics.
    async fn call(&self, request: &LlmRequest) -> Result<LlmReply, (&'static str, StepError)> {
        let mut messages = Vec::new();
        if let Some(system) = &request.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": request.prompt}));
        let mut body = json!({"model": self.model, "messages": messages});
        if let Some(m) = request.max_tokens {
            body["max_tokens"] = json!(m);
        }
        if let Some(t) = request.temperature {
            body["temperature"] = json!(t);
        }
        let mut call = self.http.post(&self.url).json(&body);
        if let Some(key) = &self.api_key {
            call = call.bearer_auth(key.expose());
        }
        let response = call.send().await.map_err(|e| {
            if e.is_timeout() {
                ("timeout", StepError::transient("llm endpoint timed out"))
            } else {
                (
                    "unreachable",
                    StepError::transient("llm endpoint unreachable"),
                )
            }
        })?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s.min(3600)));
            let message = format!("llm endpoint answered {status}");
            let transient = status.is_server_error()
                || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                || status == reqwest::StatusCode::REQUEST_TIMEOUT;
            let outcome = if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                "status_429"
            } else if status.is_server_error() {
                "status_5xx"
            } else {
                "status_4xx"
            };
            return Err((
                outcome,
                if transient {
                    StepError::Transient {
                        message,
                        retry_after,
                    }
                } else {
                    StepError::Permanent { message }
                },
            ));
        }
        let parsed: ChatResponse = response.json().await.map_err(|e| {
            if e.is_timeout() {
                ("timeout", StepError::transient("llm endpoint timed out"))
            } else {
                (
                    "invalid_response",
                    StepError::permanent(
                        "llm endpoint returned a response that is not a chat completion",
                    ),
                )
            }
        })?;
        let Some(choice) = parsed.choices.into_iter().next() else {
            return Err((
                "invalid_response",
                StepError::permanent("llm endpoint returned no choices"),
            ));
        };
        Ok(LlmReply {
            text: choice.message.content.unwrap_or_default(),
            model: parsed.model.unwrap_or_else(|| self.model.clone()),
            finish_reason: choice.finish_reason,
            usage: parsed.usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README documents `{"text","model","finish_reason","usage"}`; an
    /// offline answer without `usage` broke templates reading it.
    #[test]
    fn the_offline_model_answers_in_the_remote_shape_with_a_plausible_usage() {
        let reply = offline_reply(&LlmRequest {
            prompt: "Write one line about HELLO, ADA!".into(),
            system: Some("Be brief.".into()),
            max_tokens: None,
            temperature: None,
        });
        let value = serde_json::to_value(&reply).expect("serializes");
        let mut keys: Vec<&str> = value
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["finish_reason", "model", "text", "usage"]);
        let usage = &value["usage"];
        let prompt = usage["prompt_tokens"].as_u64().expect("prompt_tokens");
        let completion = usage["completion_tokens"]
            .as_u64()
            .expect("completion_tokens");
        assert!(prompt >= 8 && completion >= 1, "{usage}");
        assert_eq!(usage["total_tokens"].as_u64(), Some(prompt + completion));
        assert_eq!(
            reply,
            offline_reply(&LlmRequest {
                prompt: "Write one line about HELLO, ADA!".into(),
                system: Some("Be brief.".into()),
                max_tokens: None,
                temperature: None,
            }),
            "deterministic"
        );
    }
}
