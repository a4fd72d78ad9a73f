//! A local fake of an OpenAI-compatible chat-completions endpoint, scripted
//! per test: each request takes the next scripted answer (the last repeats).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Answer {
    /// 200 with this assistant message.
    Text(&'static str),
    /// This status with an error body.
    Status(u16),
    /// Wait, then answer 200 (to exceed the client's timeout).
    Slow(Duration),
}

#[derive(Default)]
struct Inner {
    script: VecDeque<Answer>,
    last: Option<Answer>,
    requests: Vec<(Option<String>, Value)>,
}

/// A running fake server.
#[derive(Clone)]
pub struct FakeLlm {
    pub base_url: String,
    inner: Arc<Mutex<Inner>>,
}

impl FakeLlm {
    /// Starts the server with a script.
    pub async fn start(script: Vec<Answer>) -> FakeLlm {
        let inner = Arc::new(Mutex::new(Inner {
            script: script.into(),
            ..Inner::default()
        }));
        let app = Router::new()
            .route("/v1/chat/completions", post(answer))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake llm");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeLlm {
            base_url: format!("http://{addr}/v1"),
            inner,
        }
    }

    /// Requests received so far: (Authorization header, JSON body).
    pub fn requests(&self) -> Vec<(Option<String>, Value)> {
        self.inner.lock().expect("lock").requests.clone()
    }
}

async fn answer(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let next = {
        let mut inner = inner.lock().expect("lock");
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        inner.requests.push((auth, body.clone()));
        let next = inner.script.pop_front().or_else(|| inner.last.clone());
        inner.last = next.clone();
        next.unwrap_or(Answer::Text("ok"))
    };
    let reply = |text: &str| {
        Json(json!({
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        }))
        .into_response()
    };
    match next {
        Answer::Text(t) => reply(t),
        Answer::Status(code) => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Json(json!({"error": {"message": "scripted failure", "type": "test"}})),
        )
            .into_response(),
        Answer::Slow(d) => {
            tokio::time::sleep(d).await;
            reply("slow")
        }
    }
}
