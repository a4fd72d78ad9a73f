//! The small template language of step texts.
//!
//! `{{ path }}` is replaced by a value; everything else is literal text. Paths:
//! `input` (the run's input), `steps.N.output` (the output of step N, which must
//! come earlier), and `prev` (the previous step's output), each optionally
//! followed by `.key` or `.index` segments. Strings render as themselves, other
//! values as compact JSON. There are no loops or conditionals on purpose.

use std::fmt;

use serde_json::Value;

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Ref(Reference),
}

/// Where a reference points.
#[derive(Debug, Clone, PartialEq)]
enum Root {
    Input,
    Step(usize),
    Prev,
}

#[derive(Debug, Clone, PartialEq)]
struct Reference {
    source: String,
    root: Root,
    path: Vec<String>,
}

/// A template that cannot be parsed, or a reference that cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{{` without `}}`.
    #[error("unclosed `{{{{` at byte {0}")]
    Unclosed(usize),
    /// A reference that is not `input…`, `steps.N.output…` or `prev…`.
    #[error(
        "invalid reference `{0}`: expected input, steps.N.output or prev, optionally followed by .key"
    )]
    Invalid(String),
    /// A reference to this step or a later one.
    #[error("reference `{0}` points at a step that has not run yet")]
    Forward(String),
    /// A path that does not exist in the value it points into.
    #[error("reference `{0}` not found")]
    Missing(String),
    /// The rendered text would be longer than [`MAX_RENDERED_BYTES`]: a
    /// template that repeats a reference (`{{prev}}{{prev}}…`) multiplies
    /// its text at every step.
    #[error(
        "the rendered text would be longer than {MAX_RENDERED_BYTES} bytes (a reference repeated, or a value too large to render)"
    )]
    TooLarge,
}

/// Longest text a template may render to, in bytes (4 MiB). A template of
/// 64 KiB may hold 8,000 references, so without a bound three steps of
/// `{{prev}}` repeated turn one small request into gigabytes of memory in
/// the worker and in the database; rendering stops as soon as the text
/// would pass it.
pub const MAX_RENDERED_BYTES: usize = 4 * 1024 * 1024;

/// What references resolve against while a step runs.
pub struct TemplateContext<'a> {
    /// The run's input.
    pub input: &'a Value,
    /// Outputs of steps recorded so far, by step index.
    pub outputs: &'a [(usize, Value)],
}

impl Template {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        let mut offset = 0;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                return Err(TemplateError::Unclosed(offset + start));
            };
            parts.push(Part::Ref(parse_reference(after[..end].trim())?));
            let consumed = start + 2 + end + 2;
            offset += consumed;
            rest = &rest[consumed..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Self { parts })
    }

    /// Whether the template refers to anything at all (else it renders to
    /// itself and needs no context).
    pub fn has_references(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Ref(_)))
    }

    /// Checks, before the run is accepted, that the template of step `index`
    /// only points at earlier steps and at paths that exist in `input`.
    pub fn check_references(&self, index: usize, input: &Value) -> Result<(), TemplateError> {
        for part in &self.parts {
            let Part::Ref(r) = part else { continue };
            match r.root {
                Root::Input => {
                    lookup(input, &r.path)
                        .ok_or_else(|| TemplateError::Missing(r.source.clone()))?;
                }
                Root::Step(n) if n >= index => {
                    return Err(TemplateError::Forward(r.source.clone()));
                }
                Root::Prev if index == 0 => return Err(TemplateError::Forward(r.source.clone())),
                _ => {}
            }
        }
        Ok(())
    }

    /// Renders the template of step `index`.
    ///
    /// Errors: [`TemplateError::Missing`] for a reference that does not
    /// resolve; [`TemplateError::TooLarge`] once the text would pass
    /// [`MAX_RENDERED_BYTES`] (checked before each part is added, so the
    /// text never grows past it).
    pub fn render(&self, index: usize, ctx: &TemplateContext<'_>) -> Result<String, TemplateError> {
        let mut out = String::new();
        let push = |out: &mut String, text: &str| {
            if out.len() + text.len() > MAX_RENDERED_BYTES {
                return Err(TemplateError::TooLarge);
            }
            out.push_str(text);
            Ok(())
        };
        for part in &self.parts {
            match part {
                Part::Text(t) => push(&mut out, t)?,
                Part::Ref(r) => {
                    let base = match r.root {
                        Root::Input => Some(ctx.input),
                        Root::Step(n) => step_output(ctx, n),
                        Root::Prev => index.checked_sub(1).and_then(|n| step_output(ctx, n)),
                    };
                    let value = base
                        .and_then(|b| lookup(b, &r.path))
                        .ok_or_else(|| TemplateError::Missing(r.source.clone()))?;
                    match value {
                        Value::String(s) => push(&mut out, s)?,
                        other => push(&mut out, &other.to_string())?,
                    }
                }
            }
        }
        Ok(out)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                Part::Text(t) => f.write_str(t)?,
                Part::Ref(r) => write!(f, "{{{{{}}}}}", r.source)?,
            }
        }
        Ok(())
    }
}

fn step_output<'a>(ctx: &TemplateContext<'a>, n: usize) -> Option<&'a Value> {
    ctx.outputs.iter().find(|(i, _)| *i == n).map(|(_, v)| v)
}

fn parse_reference(source: &str) -> Result<Reference, TemplateError> {
    let invalid = || TemplateError::Invalid(source.chars().take(80).collect());
    let segments: Vec<&str> = source.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(invalid());
    }
    let (root, rest) = match segments.as_slice() {
        ["input", rest @ ..] => (Root::Input, rest),
        ["prev", rest @ ..] => (Root::Prev, rest),
        ["steps", n, "output", rest @ ..] => (Root::Step(n.parse().map_err(|_| invalid())?), rest),
        _ => return Err(invalid()),
    };
    Ok(Reference {
        source: source.to_string(),
        root,
        path: rest.iter().map(|s| s.to_string()).collect(),
    })
}

fn lookup<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| match v {
        Value::Object(map) => map.get(key),
        Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(
        text: &str,
        index: usize,
        input: Value,
        outputs: &[(usize, Value)],
    ) -> Result<String, TemplateError> {
        let ctx = TemplateContext {
            input: &input,
            outputs,
        };
        Template::parse(text)?.render(index, &ctx)
    }

    #[test]
    fn renders_input_paths_step_outputs_and_prev() {
        let outputs = [
            (0, json!("first")),
            (1, json!({"text": "second", "n": [1, 2]})),
        ];
        let out = render(
            "{{input.name}}|{{ steps.0.output }}|{{prev.text}}|{{prev.n.1}}|{{input}}",
            2,
            json!({"name": "Ada"}),
            &outputs,
        )
        .unwrap();
        assert_eq!(out, "Ada|first|second|2|{\"name\":\"Ada\"}");
    }

    #[test]
    fn unclosed_and_invalid_references_are_syntax_errors() {
        assert_eq!(
            Template::parse("a {{input").unwrap_err(),
            TemplateError::Unclosed(2)
        );
        assert!(matches!(
            Template::parse("{{ env.HOME }}"),
            Err(TemplateError::Invalid(_))
        ));
        assert!(matches!(
            Template::parse("{{steps.x.output}}"),
            Err(TemplateError::Invalid(_))
        ));
        assert!(matches!(
            Template::parse("{{input..a}}"),
            Err(TemplateError::Invalid(_))
        ));
    }

    #[test]
    fn a_missing_output_path_fails_at_render_time() {
        let err = render("{{prev.nope}}", 1, json!({}), &[(0, json!({"a": 1}))]).unwrap_err();
        assert_eq!(err, TemplateError::Missing("prev.nope".into()));
    }

    #[test]
    fn a_repeated_reference_cannot_render_past_the_bound() {
        // 64 KiB of text, referenced 100 times: 6.4 MB, past the bound.
        let outputs = [(0, json!("x".repeat(64 * 1024)))];
        let err = render(&"{{prev}}".repeat(100), 1, json!({}), &outputs).unwrap_err();
        assert_eq!(err, TemplateError::TooLarge);
        // Exactly at the bound renders.
        let outputs = [(0, json!("y".repeat(MAX_RENDERED_BYTES / 4)))];
        let out = render(&"{{prev}}".repeat(4), 1, json!({}), &outputs).unwrap();
        assert_eq!(out.len(), MAX_RENDERED_BYTES);
        let err = render(
            &format!("{}z", "{{prev}}".repeat(4)),
            1,
            json!({}),
            &outputs,
        )
        .unwrap_err();
        assert_eq!(err, TemplateError::TooLarge);
    }

    #[test]
    fn display_round_trips() {
        let t = Template::parse("a {{ input.x }} b").unwrap();
        assert_eq!(t.to_string(), "a {{input.x}} b");
    }
}
