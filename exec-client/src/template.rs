//! Text a workflow writes with `{{ }}`: `{{ variable }}`s expanded when the
//! workflow is read, `{{ steps.NAME }}` in prompts kept for run time, and
//! keys written as a number or as a `{{ variable }}` string. A leaf: the
//! workflow reader and every task use it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tasks::kind::Kind;

/// A variable's value; its type is the type of its default.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Value {
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Bool(_) => "a boolean (true or false)",
        }
    }

    /// `text` converted to this value's type.
    pub(crate) fn with(&self, text: &str) -> Option<Value> {
        Some(match self {
            Value::Str(_) => Value::Str(text.to_string()),
            Value::Int(_) => Value::Int(text.trim().parse().ok()?),
            Value::Float(_) => Value::Float(text.trim().parse().ok().filter(|f: &f64| f.is_finite())?),
            Value::Bool(_) => Value::Bool(match text.trim() {
                "true" => true,
                "false" => false,
                _ => return None,
            }),
        })
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Str(s) => f.write_str(s),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// Why a `{{ }}` text does not expand; the workflow reader says where it is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TemplateError {
    #[error("`{{{{` without a closing `}}}}` in \"{0}\"")]
    Unclosed(String),
    /// `{{ steps.NAME }}` where only variables expand.
    #[error(
        "`{{{{ {0} }}}}`: a step's results are not text; they can be used only as a whole `query` or `corpus` of a rank step"
    )]
    StepResults(String),
    /// A variable, and the workflow declares none.
    #[error("unknown variable `{0}`: declare it in a [variables] table")]
    NoVariables(String),
    #[error("unknown variable `{name}` (declared: {})", declared.join(", "))]
    UnknownVariable { name: String, declared: Vec<String> },
    /// `reference`: what is between the braces.
    #[error("`{{{{ {reference} }}}}`: no earlier step `{step}` ({})", earlier_steps(.earlier))]
    NoEarlierStep { reference: String, step: String, earlier: Vec<String> },
    /// A step whose results (`results`) are not text.
    #[error("`{{{{ {reference} }}}}`: step `{step}` is an {task} step; its {results} are not text")]
    NotText { reference: String, step: String, task: &'static str, results: &'static str },
    /// `givers`: each task that gives text, and the field it gives.
    #[error("`{{{{ {reference} }}}}`: step `{step}` has no field `{field}` ({})", text_givers(.givers))]
    NoField { reference: String, step: String, field: String, givers: Vec<(&'static str, &'static str)> },
}

/// `earlier steps: a, b`, or that there are none.
fn earlier_steps(earlier: &[String]) -> String {
    if earlier.is_empty() {
        "no step comes before this one".into()
    } else {
        format!("earlier steps: {}", earlier.join(", "))
    }
}

/// `a rank step gives `top`, a generate step `text``.
fn text_givers(givers: &[(&str, &str)]) -> String {
    givers
        .iter()
        .enumerate()
        .map(|(i, (k, f))| format!("{} {k} step {}`{f}`", article(k), if i == 0 { "gives " } else { "" }))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Part of a prompt: text, or the text result of an earlier step.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    /// A rank step's best match (of its first query), or a generate step's text.
    StepText(String),
}

/// Expands every `{{ variable }}` in `text`. Step results are not text:
/// `{{ steps.NAME }}` is an error here (a rank step reads a whole reference itself).
pub fn expand(text: &str, vars: &BTreeMap<String, Value>) -> Result<String, TemplateError> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or_else(|| TemplateError::Unclosed(text.to_string()))?;
        let name = after[..close].trim();
        if name.starts_with("steps.") {
            return Err(TemplateError::StepResults(name.to_string()));
        }
        out.push_str(&variable(name, vars)?);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The value of the variable `name`, as text.
fn variable(name: &str, vars: &BTreeMap<String, Value>) -> Result<String, TemplateError> {
    match vars.get(name) {
        Some(v) => Ok(v.to_string()),
        None if vars.is_empty() => Err(TemplateError::NoVariables(name.to_string())),
        None => Err(TemplateError::UnknownVariable { name: name.to_string(), declared: vars.keys().cloned().collect() }),
    }
}

/// A prompt: `{{ variable }}`s expanded now, `{{ steps.NAME }}` (or
/// `.top` of a rank step, `.text` of a generate step) kept for run time.
/// `earlier` maps each earlier step to its task; `kinds` is every task, for
/// an error that says which gives text.
pub fn prompt_pieces(
    text: &str,
    vars: &BTreeMap<String, Value>,
    earlier: &BTreeMap<String, &'static Kind>,
    kinds: &[&Kind],
) -> Result<Vec<Piece>, TemplateError> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        literal.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or_else(|| TemplateError::Unclosed(text.to_string()))?;
        let inner = after[..close].trim();
        match inner.strip_prefix("steps.") {
            None => literal.push_str(&variable(inner, vars)?),
            Some(path) => {
                let (name, field) = path.split_once('.').map_or((path, None), |(n, f)| (n, Some(f)));
                let task = earlier.get(name).ok_or_else(|| TemplateError::NoEarlierStep {
                    reference: inner.to_string(),
                    step: name.to_string(),
                    earlier: earlier.keys().cloned().collect(),
                })?;
                if task.text_fields.is_empty() {
                    return Err(TemplateError::NotText {
                        reference: inner.to_string(),
                        step: name.to_string(),
                        task: task.name,
                        results: task.results,
                    });
                }
                if !field.is_none_or(|f| task.text_fields.contains(&f)) {
                    return Err(TemplateError::NoField {
                        reference: inner.to_string(),
                        step: name.to_string(),
                        field: field.unwrap_or_default().to_string(),
                        givers: kinds.iter().filter_map(|k| k.text_fields.first().map(|f| (k.name, *f))).collect(),
                    });
                }
                if !literal.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut literal)));
                }
                pieces.push(Piece::StepText(name.to_string()));
            }
        }
        rest = &after[close + 2..];
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        pieces.push(Piece::Text(literal));
    }
    Ok(pieces)
}

/// "a" or "an", for a task's name in an error.
fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// `a/b/../c` as `a/c`, without touching the file system (the path may not
/// exist yet), so that names in reports and `ps` read as people wrote them.
pub fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// A number written as one, or as a string with `{{ variable }}`s.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FloatDecl {
    Float(f64),
    Int(i64),
    Text(String),
}

/// An integer written as one, or as a string with `{{ variable }}`s.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum IntDecl {
    Int(i64),
    Text(String),
}

/// An integer key: written as one, or as a `{{ variable }}` string.
pub fn int_of(d: &IntDecl, vars: &BTreeMap<String, Value>) -> Result<Option<i64>, TemplateError> {
    Ok(match d {
        IntDecl::Int(i) => Some(*i),
        IntDecl::Text(t) => expand(t, vars)?.trim().parse().ok(),
    })
}

/// A number key: written as one, or as a `{{ variable }}` string.
pub fn float_of(d: &FloatDecl, vars: &BTreeMap<String, Value>) -> Result<Option<f64>, TemplateError> {
    Ok(match d {
        FloatDecl::Float(f) => Some(*f),
        FloatDecl::Int(i) => Some(*i as f64),
        FloatDecl::Text(t) => expand(t, vars)?.trim().parse().ok(),
    }
    .filter(|f: &f64| f.is_finite()))
}
