//! Step kinds: what a run is made of, how a request's steps are validated, and
//! how a worker executes one.
//!
//! Kinds:
//! - `template`: renders a text template (`{{input.name}}`, `{{steps.0.output}}`,
//!   `{{prev}}`), deterministic.
//! - `transform`: applies a text operation (`uppercase`, `lowercase`, `trim`,
//!   `reverse`, `word_count`, `length`) to a rendered template, deterministic.
//! - `delay`: waits a number of milliseconds (pacing, and a slow step for drills).
//! - `llm`: one chat completion against the configured OpenAI-compatible endpoint.
//! - `approval`: renders a prompt and waits, without a worker or a lease, for
//!   a person's decision or its deadline (see `store::approvals`).

pub mod llm;
pub mod template;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::steps::llm::{LlmBackend, LlmRequest};
use crate::steps::template::{Template, TemplateContext};

/// Longest accepted template or prompt, in bytes.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Longest accepted `delay`.
pub const MAX_DELAY_MS: u64 = 300_000;
/// Most steps in one run.
pub const MAX_STEPS: usize = 50;
/// Names of the step kinds, as accepted in requests.
pub const KINDS: [&str; 5] = ["template", "transform", "delay", "llm", "approval"];
/// Shortest accepted approval `timeout_s`, seconds.
pub const MIN_APPROVAL_TIMEOUT_S: u64 = 1;
/// Longest accepted approval `timeout_s`, seconds (30 days).
pub const MAX_APPROVAL_TIMEOUT_S: u64 = 30 * 86_400;
/// The approval `timeout_s` when the step does not say (one day).
pub const DEFAULT_APPROVAL_TIMEOUT_S: u64 = 86_400;

/// What an approval step's deadline does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// The step is rejected (then `on_reject` applies). The default.
    #[default]
    Reject,
    /// The step is approved.
    Approve,
}

/// What a rejection of an approval step does to its run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnReject {
    /// The run fails with reason `rejected`. The default.
    #[default]
    Fail,
    /// The step succeeds with `approved: false` and the run goes on.
    Continue,
}

/// Text operations of the `transform` step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransformOp {
    /// Upper-cases the text.
    Uppercase,
    /// Lower-cases the text.
    Lowercase,
    /// Removes surrounding whitespace.
    Trim,
    /// Reverses the characters.
    Reverse,
    /// Counts whitespace-separated words (a number).
    WordCount,
    /// Counts characters (a number).
    Length,
}

/// One step of a run, as accepted from clients and stored with the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StepSpec {
    /// Renders `template`.
    Template {
        /// The text template.
        template: String,
    },
    /// Renders `input`, then applies `op`.
    Transform {
        /// The operation.
        op: TransformOp,
        /// The text template to transform; defaults to `{{prev}}`.
        #[serde(default = "default_transform_input")]
        input: String,
    },
    /// Sleeps `ms` milliseconds, then outputs `null`.
    Delay {
        /// How long.
        ms: u64,
    },
    /// One chat completion.
    Llm {
        /// The user message (a template).
        prompt: String,
        /// Optional system message (a template).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        system: Option<String>,
        /// Optional completion length limit.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_tokens: Option<u32>,
        /// Optional sampling temperature, 0 to 2.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        temperature: Option<f32>,
    },
    /// Waits for a person to approve or reject `prompt` (rendered), or for
    /// `timeout_s` to pass. Output: `{"approved", "by", "comment"}`.
    Approval {
        /// What the approver is asked (a template).
        prompt: String,
        /// Seconds to wait for a decision, 1 to 2,592,000 (default 86,400).
        #[serde(default = "default_approval_timeout")]
        timeout_s: u64,
        /// What the deadline does: `reject` (default) or `approve`.
        #[serde(default)]
        on_timeout: OnTimeout,
        /// What a rejection does: `fail` the run (default) or `continue`.
        #[serde(default)]
        on_reject: OnReject,
    },
}

fn default_approval_timeout() -> u64 {
    DEFAULT_APPROVAL_TIMEOUT_S
}

fn default_transform_input() -> String {
    "{{prev}}".to_string()
}

impl StepSpec {
    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        match self {
            StepSpec::Template { .. } => "template",
            StepSpec::Transform { .. } => "transform",
            StepSpec::Delay { .. } => "delay",
            StepSpec::Llm { .. } => "llm",
            StepSpec::Approval { .. } => "approval",
        }
    }

    /// Whether executing the step needs the run's input or earlier outputs;
    /// when not, the worker skips reading them.
    pub fn needs_context(&self) -> bool {
        self.templates()
            .iter()
            .any(|(_, text)| Template::parse(text).map_or(true, |t| t.has_references()))
    }

    fn templates(&self) -> Vec<(&'static str, &str)> {
        match self {
            StepSpec::Template { template } => vec![("template", template)],
            StepSpec::Transform { input, .. } => vec![("input", input)],
            StepSpec::Delay { .. } => vec![],
            StepSpec::Llm { prompt, system, .. } => {
                let mut t = vec![("prompt", prompt.as_str())];
                if let Some(s) = system {
                    t.push(("system", s.as_str()));
                }
                t
            }
            StepSpec::Approval { prompt, .. } => vec![("prompt", prompt)],
        }
    }
}

/// Why a request's steps were refused; `code` is the stable API error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StepValidationError {
    /// `unknown_step_kind` or `invalid_step`.
    pub code: &'static str,
    /// What is wrong, starting with the step's position (`steps[2].kind: …`).
    pub message: String,
}

impl StepValidationError {
    fn invalid(message: String) -> Self {
        Self {
            code: "invalid_step",
            message,
        }
    }
}

/// Parses and validates the `steps` array of a create request against its `input`.
///
/// Checks everything that can be known before execution: kinds, fields, sizes,
/// template syntax, and that every template reference points at the input or at
/// an earlier step.
pub fn parse_steps(raw: &[Value], input: &Value) -> Result<Vec<StepSpec>, StepValidationError> {
    if raw.is_empty() {
        return Err(StepValidationError::invalid(
            "steps: at least one step is required".into(),
        ));
    }
    if raw.len() > MAX_STEPS {
        return Err(StepValidationError::invalid(format!(
            "steps: at most {MAX_STEPS} steps are allowed, got {}",
            raw.len()
        )));
    }
    raw.iter()
        .enumerate()
        .map(|(i, v)| parse_step(i, v, input))
        .collect()
}

fn parse_step(i: usize, value: &Value, input: &Value) -> Result<StepSpec, StepValidationError> {
    let Some(obj) = value.as_object() else {
        return Err(StepValidationError::invalid(format!(
            "steps[{i}]: expected an object with a `kind`"
        )));
    };
    let kind = match obj.get("kind") {
        Some(Value::String(k)) => k,
        Some(_) => {
            return Err(StepValidationError::invalid(format!(
                "steps[{i}].kind: expected a string"
            )));
        }
        None => {
            return Err(StepValidationError::invalid(format!(
                "steps[{i}]: missing field `kind`"
            )));
        }
    };
    if !KINDS.contains(&kind.as_str()) {
        return Err(StepValidationError {
            code: "unknown_step_kind",
            message: format!(
                "steps[{i}].kind: unknown step kind `{}`; expected one of {}",
                truncate(kind, 64),
                KINDS.join(", ")
            ),
        });
    }
    let step: StepSpec = serde_json::from_value(value.clone())
        .map_err(|e| StepValidationError::invalid(format!("steps[{i}]: {e}")))?;

    match &step {
        StepSpec::Delay { ms } if *ms > MAX_DELAY_MS => {
            return Err(StepValidationError::invalid(format!(
                "steps[{i}].ms: at most {MAX_DELAY_MS} is allowed"
            )));
        }
        StepSpec::Llm {
            max_tokens,
            temperature,
            ..
        } => {
            if matches!(max_tokens, Some(0)) || max_tokens.is_some_and(|m| m > 131_072) {
                return Err(StepValidationError::invalid(format!(
                    "steps[{i}].max_tokens: expected 1 to 131072"
                )));
            }
            if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
                return Err(StepValidationError::invalid(format!(
                    "steps[{i}].temperature: expected 0 to 2"
                )));
            }
        }
        StepSpec::Approval { timeout_s, .. }
            if !(MIN_APPROVAL_TIMEOUT_S..=MAX_APPROVAL_TIMEOUT_S).contains(timeout_s) =>
        {
            return Err(StepValidationError::invalid(format!(
                "steps[{i}].timeout_s: expected {MIN_APPROVAL_TIMEOUT_S} to {MAX_APPROVAL_TIMEOUT_S} seconds"
            )));
        }
        _ => {}
    }
    for (field, text) in step.templates() {
        if text.len() > MAX_TEXT_BYTES {
            return Err(StepValidationError::invalid(format!(
                "steps[{i}].{field}: at most {MAX_TEXT_BYTES} bytes are allowed"
            )));
        }
        if field != "system" && text.trim().is_empty() {
            return Err(StepValidationError::invalid(format!(
                "steps[{i}].{field}: must not be empty"
            )));
        }
        let template = Template::parse(text)
            .map_err(|e| StepValidationError::invalid(format!("steps[{i}].{field}: {e}")))?;
        template
            .check_references(i, input)
            .map_err(|e| StepValidationError::invalid(format!("steps[{i}].{field}: {e}")))?;
    }
    Ok(step)
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Why a step did not produce a result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepError {
    /// Worth retrying (endpoint overloaded, timed out, unreachable).
    #[error("{message}")]
    Transient {
        /// What happened.
        message: String,
        /// The server's own hint on when to come back.
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help (bad request, rejected credentials, bad reference).
    #[error("{message}")]
    Permanent {
        /// What happened.
        message: String,
    },
}

impl StepError {
    /// A permanent error with this message.
    pub fn permanent(message: impl Into<String>) -> Self {
        StepError::Permanent {
            message: message.into(),
        }
    }

    /// A transient error with this message.
    pub fn transient(message: impl Into<String>) -> Self {
        StepError::Transient {
            message: message.into(),
            retry_after: None,
        }
    }
}

/// Executes steps; shared by all worker tasks.
#[derive(Clone)]
pub struct StepRunner {
    llm: LlmBackend,
}

impl StepRunner {
    /// A runner whose `llm` steps use `llm`.
    pub fn new(llm: LlmBackend) -> Self {
        Self { llm }
    }

    /// Records LLM call latency and failures in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        if let LlmBackend::Remote(client) = self.llm {
            self.llm = LlmBackend::Remote(client.with_metrics(metrics));
        }
        self
    }

    /// Runs one step with the run's input and the outputs of earlier steps.
    pub async fn execute(
        &self,
        step: &StepSpec,
        index: usize,
        ctx: &TemplateContext<'_>,
    ) -> Result<Value, StepError> {
        let render = |text: &str| -> Result<String, StepError> {
            let template =
                Template::parse(text).map_err(|e| StepError::permanent(e.to_string()))?;
            template
                .render(index, ctx)
                .map_err(|e| StepError::permanent(e.to_string()))
        };
        match step {
            StepSpec::Template { template } => Ok(Value::String(render(template)?)),
            StepSpec::Transform { op, input } => Ok(apply_transform(*op, &render(input)?)),
            StepSpec::Delay { ms } => {
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                Ok(Value::Null)
            }
            StepSpec::Llm {
                prompt,
                system,
                max_tokens,
                temperature,
            } => {
                let request = LlmRequest {
                    prompt: render(prompt)?,
                    system: system.as_deref().map(render).transpose()?,
                    max_tokens: *max_tokens,
                    temperature: *temperature,
                };
                let reply = self.llm.complete(&request).await?;
                Ok(serde_json::to_value(reply).unwrap_or(Value::Null))
            }
            // The worker does not record this as the step's output: it is the
            // prompt the step then waits on (see `Store::await_approval`).
            StepSpec::Approval { prompt, .. } => Ok(Value::String(render(prompt)?)),
        }
    }
}

/// The deterministic text operations.
pub fn apply_transform(op: TransformOp, text: &str) -> Value {
    match op {
        TransformOp::Uppercase => Value::String(text.to_uppercase()),
        TransformOp::Lowercase => Value::String(text.to_lowercase()),
        TransformOp::Trim => Value::String(text.trim().to_string()),
        TransformOp::Reverse => Value::String(text.chars().rev().collect()),
        TransformOp::WordCount => Value::from(text.split_whitespace().count()),
        TransformOp::Length => Value::from(text.chars().count()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_kind_is_reported_with_its_position_and_the_known_kinds() {
        let err = parse_steps(&[json!({"kind": "teleport"})], &json!({})).unwrap_err();
        assert_eq!(err.code, "unknown_step_kind");
        assert!(err.message.starts_with("steps[0].kind"), "{}", err.message);
        assert!(
            err.message
                .contains("template, transform, delay, llm, approval")
        );
    }

    #[test]
    fn missing_field_names_the_field() {
        let err = parse_steps(&[json!({"kind": "template"})], &json!({})).unwrap_err();
        assert_eq!(err.code, "invalid_step");
        assert!(
            err.message.contains("missing field `template`"),
            "{}",
            err.message
        );
    }

    #[test]
    fn unknown_fields_are_refused_so_typos_do_not_pass_silently() {
        let err =
            parse_steps(&[json!({"kind": "delay", "ms": 1, "msx": 2})], &json!({})).unwrap_err();
        assert!(
            err.message.contains("unknown field `msx`"),
            "{}",
            err.message
        );
    }

    #[test]
    fn references_to_later_steps_or_missing_input_are_refused_at_creation() {
        let err = parse_steps(
            &[
                json!({"kind": "template", "template": "{{steps.1.output}}"}),
                json!({"kind": "template", "template": "x"}),
            ],
            &json!({}),
        )
        .unwrap_err();
        assert!(err.message.contains("steps.1"), "{}", err.message);
        let err = parse_steps(
            &[json!({"kind": "template", "template": "{{input.name}}"})],
            &json!({"other": 1}),
        )
        .unwrap_err();
        assert!(err.message.contains("input.name"), "{}", err.message);
        let err =
            parse_steps(&[json!({"kind": "transform", "op": "trim"})], &json!({})).unwrap_err();
        assert!(err.message.contains("prev"), "{}", err.message);
    }

    #[test]
    fn limits_are_enforced() {
        let too_many: Vec<Value> = (0..=MAX_STEPS)
            .map(|_| json!({"kind": "delay", "ms": 0}))
            .collect();
        assert!(parse_steps(&too_many, &json!({})).is_err());
        assert!(parse_steps(&[], &json!({})).is_err());
        assert!(
            parse_steps(
                &[json!({"kind": "delay", "ms": MAX_DELAY_MS + 1})],
                &json!({})
            )
            .is_err()
        );
        assert!(
            parse_steps(
                &[json!({"kind": "llm", "prompt": "hi", "temperature": 3.0})],
                &json!({})
            )
            .is_err()
        );
    }

    #[test]
    fn only_steps_with_references_need_the_run_context() {
        let steps = parse_steps(
            &[
                json!({"kind": "template", "template": "constant"}),
                json!({"kind": "delay", "ms": 1}),
                json!({"kind": "transform", "op": "trim"}),
                json!({"kind": "llm", "prompt": "hi", "system": "{{input.x}}"}),
            ],
            &json!({"x": 1}),
        )
        .unwrap();
        let needs: Vec<bool> = steps.iter().map(StepSpec::needs_context).collect();
        assert_eq!(needs, [false, false, true, true]);
    }

    #[test]
    fn approval_steps_take_defaults_and_refuse_timeouts_out_of_bounds() {
        let steps = parse_steps(
            &[
                json!({"kind": "template", "template": "draft"}),
                json!({"kind": "approval", "prompt": "Publish {{prev}}?"}),
            ],
            &json!({}),
        )
        .unwrap();
        assert_eq!(
            steps[1],
            StepSpec::Approval {
                prompt: "Publish {{prev}}?".into(),
                timeout_s: DEFAULT_APPROVAL_TIMEOUT_S,
                on_timeout: OnTimeout::Reject,
                on_reject: OnReject::Fail,
            }
        );
        assert!(steps[1].needs_context());
        for timeout in [0, MAX_APPROVAL_TIMEOUT_S + 1] {
            let err = parse_steps(
                &[json!({"kind": "approval", "prompt": "ok?", "timeout_s": timeout})],
                &json!({}),
            )
            .unwrap_err();
            assert_eq!(err.code, "invalid_step");
            assert!(
                err.message.starts_with("steps[0].timeout_s"),
                "{}",
                err.message
            );
        }
        for bad in [
            json!({"kind": "approval", "prompt": "ok?", "on_timeout": "maybe"}),
            json!({"kind": "approval", "prompt": "ok?", "on_reject": "retry"}),
            json!({"kind": "approval", "prompt": "ok?", "timeout_s": -1}),
            json!({"kind": "approval", "prompt": "  "}),
            json!({"kind": "approval", "prompt": "{{prev}}"}),
        ] {
            let err = parse_steps(std::slice::from_ref(&bad), &json!({})).unwrap_err();
            assert_eq!(err.code, "invalid_step", "{bad}");
        }
    }

    #[test]
    fn transforms_are_deterministic() {
        assert_eq!(apply_transform(TransformOp::Uppercase, "abc"), json!("ABC"));
        assert_eq!(apply_transform(TransformOp::Reverse, "abc"), json!("cba"));
        assert_eq!(
            apply_transform(TransformOp::WordCount, " a b  c "),
            json!(3)
        );
        assert_eq!(apply_transform(TransformOp::Length, "héllo"), json!(5));
        assert_eq!(apply_transform(TransformOp::Trim, "  x "), json!("x"));
    }
}
