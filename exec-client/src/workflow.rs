//! Workflow files: what models a run needs and what steps it performs.
//!
//! ```toml
//! name = "search"
//! [variables]
//! query = "A man is eating pasta."                  # --set query="..." overrides
//! [models.minilm]
//! repo = "sentence-transformers/all-MiniLM-L6-v2"   # or: path = "some/local/dir"
//! [[steps]]
//! name = "docs"
//! task = "embed"
//! model = "minilm"
//! texts_file = "corpus.txt"                         # or: texts = ["...", ...]
//! [[steps]]
//! name = "q"
//! task = "embed"
//! model = "minilm"
//! texts = ["{{ query }}"]
//! [[steps]]
//! name = "best"
//! task = "rank"
//! query = "{{ steps.q }}"
//! corpus = "{{ steps.docs }}"
//! top_k = 3
//! ```
//!
//! Everything is checked here, before any model is loaded: key sets are
//! closed (a misspelt key is an error with its line and column), variables
//! are typed by their defaults, and every reference names a declared
//! variable or an earlier step. docs/workflow.md describes every key.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use mora_common::manifest::WeightDType;
use mora_common::protocol::DeviceSpec;
use mora_common::units::KeepAlive;
use mora_common::ModelSource;

/// A workflow error, located in its file where it can be.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error("cannot read workflow {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}:{column}: {message}", path.display())]
    At { path: PathBuf, line: usize, column: usize, message: String },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowFile {
    name: String,
    description: Option<String>,
    #[serde(default)]
    variables: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    models: BTreeMap<String, Spanned<ModelDecl>>,
    #[serde(default)]
    steps: Vec<Spanned<StepDecl>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelDecl {
    repo: Option<String>,
    revision: Option<String>,
    path: Option<PathBuf>,
    dtype: Option<Spanned<String>>,
    device: Option<Spanned<String>>,
    keep_alive: Option<Spanned<KeepAliveDecl>>,
}

/// `keep_alive = "10m"`, or the integers `-1` (forever) and `0` (at once).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum KeepAliveDecl {
    Int(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepDecl {
    name: Spanned<String>,
    task: Spanned<String>,
    model: Option<Spanned<String>>,
    texts: Option<Vec<String>>,
    texts_file: Option<String>,
    query: Option<Spanned<String>>,
    corpus: Option<Spanned<String>>,
    top_k: Option<Spanned<IntDecl>>,
    output: Option<String>,
}

/// An integer written as one, or as a string with `{{ variable }}`s.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum IntDecl {
    Int(i64),
    Text(String),
}

/// A variable's value; its type is the type of its default.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Bool(_) => "a boolean (true or false)",
        }
    }

    /// `text` converted to this value's type.
    fn with(&self, text: &str) -> Option<Value> {
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

/// A model a workflow declares.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub source: ModelSource,
    pub dtype: WeightDType,
    /// Where the weights are held and the model runs: `cpu`, `cuda:N`, or
    /// `auto` (the default: the first GPU when there is one).
    pub device: DeviceSpec,
    /// Asked of the daemon with every acquire; `None` keeps the daemon's.
    pub keep_alive: Option<KeepAlive>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Sentence embeddings: BERT, then the model's pooling and normalisation.
    Embed {
        /// Key into [`Workflow::models`].
        model: String,
        texts: Texts,
    },
    /// Cosine top-k of each text of one embed step against another's.
    Rank {
        /// Names of earlier embed steps.
        query: String,
        corpus: String,
        top_k: usize,
    },
}

/// `top_k` of a rank step that gives none.
pub const DEFAULT_TOP_K: usize = 5;

#[derive(Debug, Clone, PartialEq)]
pub enum Texts {
    Inline(Vec<String>),
    /// One text per line; resolved against the workflow's directory.
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub name: String,
    pub task: Task,
    /// Relative to the run's output directory (unless absolute).
    pub output: PathBuf,
}

impl Step {
    /// The model this step runs, if it runs one.
    pub fn model(&self) -> Option<&str> {
        match &self.task {
            Task::Embed { model, .. } => Some(model),
            Task::Rank { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub name: String,
    pub description: Option<String>,
    pub path: PathBuf,
    /// Every declared variable, with `--set` applied.
    pub variables: BTreeMap<String, Value>,
    pub models: BTreeMap<String, ModelSpec>,
    pub steps: Vec<Step>,
}

/// Expands every `{{ variable }}` in `text`. Step results are not text:
/// `{{ steps.NAME }}` is an error here (see [`step_ref`]).
fn expand(text: &str, vars: &BTreeMap<String, Value>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or_else(|| format!("`{{{{` without a closing `}}}}` in \"{text}\""))?;
        let name = after[..close].trim();
        if name.starts_with("steps.") {
            return Err(format!(
                "`{{{{ {name} }}}}`: a step's results are not text; they can be used only as a whole `query` or `corpus` of a rank step"
            ));
        }
        match vars.get(name) {
            Some(v) => out.push_str(&v.to_string()),
            None if vars.is_empty() => {
                return Err(format!("unknown variable `{name}`: declare it in a [variables] table"))
            }
            None => {
                let known: Vec<&str> = vars.keys().map(String::as_str).collect();
                return Err(format!("unknown variable `{name}` (declared: {})", known.join(", ")));
            }
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The step a `"{{ steps.NAME }}"` (or `"{{ steps.NAME.embeddings }}"`) names.
fn step_ref(value: &str) -> Result<String, String> {
    let inner = value
        .trim()
        .strip_prefix("{{")
        .and_then(|v| v.strip_suffix("}}"))
        .map(str::trim)
        .and_then(|v| v.strip_prefix("steps."))
        .ok_or_else(|| format!("`{value}` is not a step reference: write \"{{{{ steps.NAME }}}}\""))?;
    match inner.split_once('.') {
        None => Ok(inner.to_string()),
        Some((name, "embeddings")) => Ok(name.to_string()),
        Some((name, field)) => Err(format!("step `{name}` has no field `{field}` (an embed step gives `embeddings`)")),
    }
}

fn valid_step_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, column)
}

impl Workflow {
    /// Reads and checks a workflow file.
    pub fn load(path: &Path) -> Result<Workflow, WorkflowError> {
        Self::load_with(path, &[])
    }

    /// Reads and checks a workflow file, with `NAME=VALUE` settings of its
    /// variables (`--set`).
    pub fn load_with(path: &Path, sets: &[String]) -> Result<Workflow, WorkflowError> {
        let src = std::fs::read_to_string(path).map_err(|source| WorkflowError::Read { path: path.to_path_buf(), source })?;
        Self::parse_with(&src, path, sets)
    }

    /// Parses `src` as if read from `path` (which anchors relative paths).
    pub fn parse(src: &str, path: &Path) -> Result<Workflow, WorkflowError> {
        Self::parse_with(src, path, &[])
    }

    /// [`Workflow::parse`] with `--set NAME=VALUE` settings.
    pub fn parse_with(src: &str, path: &Path, sets: &[String]) -> Result<Workflow, WorkflowError> {
        let at = |span: Option<Range<usize>>, message: String| match span {
            Some(span) => {
                let (line, column) = line_col(src, span.start);
                WorkflowError::At { path: path.to_path_buf(), line, column, message }
            }
            None => WorkflowError::Invalid { path: path.to_path_buf(), message },
        };
        let file: WorkflowFile = toml::from_str(src).map_err(|e| at(e.span(), e.message().trim().replace('\n', " ")))?;
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());

        if file.name.trim().is_empty() {
            return Err(at(None, "`name` must not be empty".into()));
        }
        let mut variables = BTreeMap::new();
        for (key, v) in &file.variables {
            let value = match v.get_ref() {
                toml::Value::String(s) => Value::Str(s.clone()),
                toml::Value::Integer(i) => Value::Int(*i),
                toml::Value::Float(f) => Value::Float(*f),
                toml::Value::Boolean(b) => Value::Bool(*b),
                other => {
                    return Err(at(
                        Some(v.span()),
                        format!("variable `{key}`: a default must be a string, integer, number or boolean, not {}", other.type_str()),
                    ))
                }
            };
            variables.insert(key.clone(), value);
        }
        for set in sets {
            let bad = |message: String| WorkflowError::Invalid { path: path.to_path_buf(), message: format!("--set {set}: {message}") };
            let (key, text) = set.split_once('=').ok_or_else(|| bad("expected NAME=VALUE".into()))?;
            let key = key.trim();
            let Some(default) = variables.get(key) else {
                let known: Vec<&str> = variables.keys().map(String::as_str).collect();
                return Err(bad(if known.is_empty() {
                    "the workflow declares no variables".into()
                } else {
                    format!("no variable `{key}` (declared: {})", known.join(", "))
                }));
            };
            let value = default.with(text).ok_or_else(|| {
                bad(format!("`{key}` is {} (default {default}), and `{text}` is not one", default.type_name()))
            })?;
            variables.insert(key.to_string(), value);
        }
        let mut models = BTreeMap::new();
        for (key, decl) in &file.models {
            let span = Some(decl.span());
            let decl = decl.get_ref();
            let source = match (&decl.repo, &decl.path) {
                (Some(repo), None) => ModelSource::hf_repo(repo, decl.revision.as_deref()),
                (None, Some(p)) => {
                    if decl.revision.is_some() {
                        return Err(at(span, format!("model `{key}`: `revision` applies to `repo`, not to `path`")));
                    }
                    ModelSource::Dir { path: base.join(p) }
                }
                (Some(_), Some(_)) => {
                    return Err(at(span, format!("model `{key}` gives both `repo` and `path`: keep one")))
                }
                (None, None) => {
                    return Err(at(span, format!("model `{key}` needs `repo = \"OWNER/NAME\"` or `path = \"DIR\"`")))
                }
            };
            let dtype = match &decl.dtype {
                Some(d) => d.get_ref().parse().map_err(|e: String| at(Some(d.span()), format!("model `{key}`: {e}")))?,
                None => WeightDType::default(),
            };
            let device = match &decl.device {
                Some(d) => d.get_ref().parse().map_err(|e: String| at(Some(d.span()), format!("model `{key}`: {e}")))?,
                None => DeviceSpec::default(),
            };
            let keep_alive = match &decl.keep_alive {
                None => None,
                Some(k) => {
                    let text = match k.get_ref() {
                        KeepAliveDecl::Int(i) => i.to_string(),
                        KeepAliveDecl::Text(t) => t.clone(),
                    };
                    Some(KeepAlive::parse(&text).map_err(|e| at(Some(k.span()), format!("model `{key}`: keep_alive {e}")))?)
                }
            };
            models.insert(key.clone(), ModelSpec { source, dtype, device, keep_alive });
        }

        if file.steps.is_empty() {
            return Err(at(None, "no `[[steps]]`: nothing to run".into()));
        }
        // Step name -> whether it is an embed step, for the steps before the current one.
        let mut earlier: BTreeMap<String, bool> = BTreeMap::new();
        let all_names: HashSet<&str> = file.steps.iter().map(|s| s.get_ref().name.get_ref().as_str()).collect();
        let mut steps = Vec::new();
        for step in &file.steps {
            let span = Some(step.span());
            let s = step.get_ref();
            let name = s.name.get_ref();
            if !valid_step_name(name) {
                return Err(at(
                    Some(s.name.span()),
                    format!("step name `{name}`: use letters, digits, `_` and `-` (steps are referred to as `steps.NAME`)"),
                ));
            }
            if earlier.contains_key(name) {
                return Err(at(span, format!("step name `{name}` is used twice")));
            }
            let step_err = |span: Option<Range<usize>>, m: String| at(span, format!("step `{name}`: {m}"));
            let task = match s.task.get_ref().as_str() {
                "embed" => {
                    for (key, given) in [("query", s.query.is_some()), ("corpus", s.corpus.is_some()), ("top_k", s.top_k.is_some())] {
                        if given {
                            return Err(step_err(span.clone(), format!("`{key}` belongs to rank steps, not embed")));
                        }
                    }
                    let Some(model) = &s.model else {
                        return Err(step_err(span, "an embed step needs `model = \"NAME\"`".into()));
                    };
                    if !models.contains_key(model.get_ref()) {
                        let known: Vec<&str> = models.keys().map(String::as_str).collect();
                        let hint = if known.is_empty() {
                            "no models are declared: add a [models.NAME] table".to_string()
                        } else {
                            format!("declared: {}", known.join(", "))
                        };
                        return Err(at(
                            Some(model.span()),
                            format!("step `{name}` uses unknown model `{}` ({hint})", model.get_ref()),
                        ));
                    }
                    let texts = match (&s.texts, &s.texts_file) {
                        (Some(t), None) if t.is_empty() => return Err(step_err(span, "`texts` is empty".into())),
                        (Some(t), None) => Texts::Inline(
                            t.iter().map(|t| expand(t, &variables)).collect::<Result<_, _>>().map_err(|e| step_err(span.clone(), e))?,
                        ),
                        (None, Some(f)) => Texts::File(base.join(expand(f, &variables).map_err(|e| step_err(span.clone(), e))?)),
                        (Some(_), Some(_)) => return Err(step_err(span, "gives both `texts` and `texts_file`: keep one".into())),
                        (None, None) => {
                            return Err(step_err(span, "needs `texts = [...]` or `texts_file = \"FILE\"`".into()))
                        }
                    };
                    Task::Embed { model: model.get_ref().clone(), texts }
                }
                "rank" => {
                    if let Some(m) = &s.model {
                        return Err(step_err(Some(m.span()), "a rank step uses no model (it ranks the embeddings of earlier steps)".into()));
                    }
                    if s.texts.is_some() || s.texts_file.is_some() {
                        return Err(step_err(span, "a rank step takes `query` and `corpus`, not texts".into()));
                    }
                    let mut refs = Vec::new();
                    for (key, v) in [("query", &s.query), ("corpus", &s.corpus)] {
                        let Some(v) = v else {
                            return Err(step_err(span, format!("a rank step needs `{key} = \"{{{{ steps.NAME }}}}\"`")));
                        };
                        let target = step_ref(v.get_ref()).map_err(|e| step_err(Some(v.span()), format!("`{key}`: {e}")))?;
                        match earlier.get(&target) {
                            Some(true) => refs.push(target),
                            Some(false) => {
                                return Err(step_err(
                                    Some(v.span()),
                                    format!("`{key}` names step `{target}`, a rank step; it takes an embed step"),
                                ))
                            }
                            None if target == *name || all_names.contains(target.as_str()) => {
                                return Err(step_err(
                                    Some(v.span()),
                                    format!("`{key}` names step `{target}`, which does not come before it: a step can use only earlier steps' results"),
                                ))
                            }
                            None => {
                                let known: Vec<&str> = earlier.keys().map(String::as_str).collect();
                                return Err(step_err(
                                    Some(v.span()),
                                    format!(
                                        "`{key}` names no step `{target}` ({})",
                                        if known.is_empty() { "no step comes before this one".into() } else { format!("earlier steps: {}", known.join(", ")) }
                                    ),
                                ));
                            }
                        }
                    }
                    let top_k = match &s.top_k {
                        None => DEFAULT_TOP_K,
                        Some(k) => {
                            let value = match k.get_ref() {
                                IntDecl::Int(i) => Some(*i),
                                IntDecl::Text(t) => {
                                    let text = expand(t, &variables).map_err(|e| step_err(Some(k.span()), e))?;
                                    text.trim().parse().ok()
                                }
                            };
                            match value {
                                Some(v) if v >= 1 => v as usize,
                                _ => return Err(step_err(Some(k.span()), "`top_k` must be a whole number of at least 1".into())),
                            }
                        }
                    };
                    let corpus = refs.pop().expect("two references");
                    let query = refs.pop().expect("two references");
                    Task::Rank { query, corpus, top_k }
                }
                other => {
                    return Err(at(Some(s.task.span()), format!("unknown task `{other}`: expected `embed` or `rank`")))
                }
            };
            let output = match &s.output {
                Some(o) => PathBuf::from(expand(o, &variables).map_err(|e| step_err(span.clone(), e))?),
                None => PathBuf::from(format!("{name}.json")),
            };
            earlier.insert(name.clone(), matches!(task, Task::Embed { .. }));
            steps.push(Step { name: name.clone(), task, output });
        }
        Ok(Workflow { name: file.name, description: file.description, path: path.to_path_buf(), variables, models, steps })
    }
}

impl Texts {
    /// The texts themselves: inline, or the non-empty lines of the file.
    pub fn load(&self) -> Result<Vec<String>, String> {
        match self {
            Texts::Inline(t) => Ok(t.clone()),
            Texts::File(p) => {
                let body = std::fs::read_to_string(p).map_err(|e| format!("cannot read texts_file {}: {e}", p.display()))?;
                let texts: Vec<String> = body.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect();
                if texts.is_empty() {
                    return Err(format!("texts_file {} holds no texts", p.display()));
                }
                Ok(texts)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "embed"
[models.minilm]
repo = "sentence-transformers/all-MiniLM-L6-v2"
[[steps]]
name = "embed"
task = "embed"
model = "minilm"
texts = ["a", "b"]
output = "embeddings.json"
"#;

    fn parse(src: &str) -> Result<Workflow, WorkflowError> {
        Workflow::parse(src, Path::new("/w/flow.toml"))
    }

    #[test]
    fn the_documented_example_parses() {
        let w = parse(GOOD).unwrap();
        assert_eq!(w.name, "embed");
        let m = &w.models["minilm"];
        assert_eq!(m.dtype, WeightDType::F32);
        assert!(matches!(&m.source, ModelSource::HfRepo { repo, revision, .. } if repo == "sentence-transformers/all-MiniLM-L6-v2" && revision == "main"));
        assert_eq!(w.steps[0].task, Task::Embed { model: "minilm".into(), texts: Texts::Inline(vec!["a".into(), "b".into()]) });
        assert_eq!(w.steps[0].output, PathBuf::from("embeddings.json"));
    }

    #[test]
    fn syntax_error_reports_line_and_column() {
        let err = parse("name = \"x\"\n[models.m\nrepo = 1\n").unwrap_err().to_string();
        assert!(err.starts_with("/w/flow.toml:2:"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn unknown_key_in_a_step_is_an_error_at_the_key() {
        let src = GOOD.replace("output = ", "outptu = ");
        let err = parse(&src).unwrap_err().to_string();
        assert!(err.contains("unknown field `outptu`"), "{err}");
        assert!(err.starts_with("/w/flow.toml:10:1:"), "{err}");
    }

    #[test]
    fn unknown_model_name_lists_the_declared_ones() {
        let src = GOOD.replace("model = \"minilm\"", "model = \"minlm\"");
        let err = parse(&src).unwrap_err().to_string();
        assert!(err.contains("unknown model `minlm` (declared: minilm)"), "{err}");
        assert!(err.starts_with("/w/flow.toml:8:9:"), "{err}");
    }

    #[test]
    fn local_path_is_anchored_at_the_workflow_directory() {
        let src = GOOD.replace("repo = \"sentence-transformers/all-MiniLM-L6-v2\"", "path = \"models/mini\"\ndtype = \"f16\"");
        let w = parse(&src).unwrap();
        assert_eq!(w.models["minilm"].source, ModelSource::Dir { path: PathBuf::from("/w/models/mini") });
        assert_eq!(w.models["minilm"].dtype, WeightDType::F16);
    }

    #[test]
    fn keep_alive_takes_durations_and_ollamas_integers() {
        let with = |v: &str| GOOD.replace("[models.minilm]\n", &format!("[models.minilm]\nkeep_alive = {v}\n"));
        assert_eq!(parse(&with("\"10m\"")).unwrap().models["minilm"].keep_alive, Some(KeepAlive::For(std::time::Duration::from_secs(600))));
        assert_eq!(parse(&with("-1")).unwrap().models["minilm"].keep_alive, Some(KeepAlive::Forever));
        assert_eq!(parse(&with("0")).unwrap().models["minilm"].keep_alive, Some(KeepAlive::For(std::time::Duration::ZERO)));
        assert_eq!(parse(GOOD).unwrap().models["minilm"].keep_alive, None);
        let err = parse(&with("\"soon\"")).unwrap_err().to_string();
        assert!(err.contains("keep_alive") && err.starts_with("/w/flow.toml:4:"), "{err}");
    }

    #[test]
    fn ambiguous_or_missing_sources_and_texts_are_refused() {
        let both = GOOD.replace("[models.minilm]\n", "[models.minilm]\npath = \"x\"\n");
        assert!(parse(&both).unwrap_err().to_string().contains("both `repo` and `path`"));
        let none = GOOD.replace("texts = [\"a\", \"b\"]\n", "");
        assert!(parse(&none).unwrap_err().to_string().contains("needs `texts = [...]`"));
        let bad_device = GOOD.replace("[models.minilm]\n", "[models.minilm]\ndevice = \"gpu0\"\n");
        let e = parse(&bad_device).unwrap_err().to_string();
        assert!(e.starts_with("/w/flow.toml:4:") && e.contains("unknown device `gpu0`: expected cpu, cuda:N or auto"), "{e}");
        let on = |d: &str| parse(&GOOD.replace("[models.minilm]\n", &format!("[models.minilm]\ndevice = \"{d}\"\n"))).unwrap();
        assert_eq!(on("cuda:1").models["minilm"].device, DeviceSpec::Cuda(1));
        assert_eq!(on("cpu").models["minilm"].device, DeviceSpec::Cpu);
        assert_eq!(parse(GOOD).unwrap().models["minilm"].device, DeviceSpec::Auto);
        let bad_dtype = GOOD.replace("[models.minilm]\n", "[models.minilm]\ndtype = \"f8\"\n");
        assert!(parse(&bad_dtype).unwrap_err().to_string().contains("unknown dtype `f8`"));
        let bad_task = GOOD.replace("task = \"embed\"", "task = \"generate\"");
        assert!(parse(&bad_task).unwrap_err().to_string().contains("unknown task `generate`"));
    }

    #[test]
    fn duplicate_step_names_are_refused() {
        let src = format!("{GOOD}\n[[steps]]\nname = \"embed\"\ntask = \"embed\"\nmodel = \"minilm\"\ntexts = [\"c\"]\n");
        assert!(parse(&src).unwrap_err().to_string().contains("used twice"));
    }

    #[test]
    fn texts_file_skips_blank_lines() {
        let dir = std::env::temp_dir().join(format!("mora-wf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("corpus.txt");
        std::fs::write(&f, "one\n\n two \nthree\n").unwrap();
        assert_eq!(Texts::File(f.clone()).load().unwrap(), vec!["one", " two ", "three"]);
        std::fs::write(&f, "\n\n").unwrap();
        assert!(Texts::File(f).load().unwrap_err().contains("holds no texts"));
    }

    const SEARCH: &str = r#"
name = "search"
description = "find the closest passage"
[variables]
query = "A man is eating pasta."
k = 2
file = "corpus"
[models.minilm]
repo = "sentence-transformers/all-MiniLM-L6-v2"
[[steps]]
name = "docs"
task = "embed"
model = "minilm"
texts_file = "{{ file }}.txt"
[[steps]]
name = "q"
task = "embed"
model = "minilm"
texts = ["{{query}}", "again: {{ query }}"]
[[steps]]
name = "best"
task = "rank"
query = "{{ steps.q }}"
corpus = "{{ steps.docs.embeddings }}"
top_k = "{{ k }}"
output = "ranked-{{ k }}.json"
"#;

    fn with_sets(src: &str, sets: &[&str]) -> Result<Workflow, WorkflowError> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Workflow::parse_with(src, Path::new("/w/flow.toml"), &sets)
    }

    #[test]
    fn variables_expand_in_texts_files_and_outputs_and_rank_names_earlier_steps() {
        let w = parse(SEARCH).unwrap();
        assert_eq!(w.description.as_deref(), Some("find the closest passage"));
        assert_eq!(w.steps[0].task, Task::Embed { model: "minilm".into(), texts: Texts::File("/w/corpus.txt".into()) });
        assert_eq!(
            w.steps[1].task,
            Task::Embed {
                model: "minilm".into(),
                texts: Texts::Inline(vec!["A man is eating pasta.".into(), "again: A man is eating pasta.".into()])
            }
        );
        assert_eq!(w.steps[2].task, Task::Rank { query: "q".into(), corpus: "docs".into(), top_k: 2 });
        assert_eq!(w.steps[2].output, PathBuf::from("ranked-2.json"));
        assert_eq!(w.steps[2].model(), None);
        assert_eq!(w.steps[0].output, PathBuf::from("docs.json"));
    }

    #[test]
    fn set_converts_to_the_defaults_type_or_says_why_not() {
        let w = with_sets(SEARCH, &["k=4", "query=Who plays drums?"]).unwrap();
        assert_eq!(w.variables["k"], Value::Int(4));
        assert!(matches!(&w.steps[2].task, Task::Rank { top_k: 4, .. }));
        assert!(matches!(&w.steps[1].task, Task::Embed { texts: Texts::Inline(t), .. } if t[0] == "Who plays drums?"));
        let e = with_sets(SEARCH, &["k=many"]).unwrap_err().to_string();
        assert_eq!(e, "/w/flow.toml: --set k=many: `k` is an integer (default 2), and `many` is not one");
        let e = with_sets(SEARCH, &["qurey=x"]).unwrap_err().to_string();
        assert!(e.contains("--set qurey=x: no variable `qurey` (declared: file, k, query)"), "{e}");
        let e = with_sets(GOOD, &["x=1"]).unwrap_err().to_string();
        assert!(e.contains("the workflow declares no variables"), "{e}");
        let e = with_sets(SEARCH, &["k"]).unwrap_err().to_string();
        assert!(e.contains("--set k: expected NAME=VALUE"), "{e}");
        let flag = SEARCH.replace("k = 2\n", "k = 2\nverbose = false\nscale = 0.5\n");
        assert_eq!(with_sets(&flag, &["verbose=true", "scale=2"]).unwrap().variables["scale"], Value::Float(2.0));
        assert!(with_sets(&flag, &["verbose=yes"]).unwrap_err().to_string().contains("a boolean"));
        let table = SEARCH.replace("k = 2\n", "k = [2]\n");
        assert!(parse(&table).unwrap_err().to_string().contains("variable `k`: a default must be"));
    }

    #[test]
    fn every_bad_reference_is_found_before_anything_runs() {
        let e = parse(&SEARCH.replace("{{query}}", "{{ qeury }}")).unwrap_err().to_string();
        assert!(e.contains("step `q`: unknown variable `qeury` (declared: file, k, query)"), "{e}");
        let e = parse(&SEARCH.replace("{{query}}", "{{ query ")).unwrap_err().to_string();
        assert!(e.contains("without a closing"), "{e}");
        let e = parse(&SEARCH.replace("{{query}}", "{{ steps.docs }}")).unwrap_err().to_string();
        assert!(e.contains("a step's results are not text"), "{e}");
        // A later step, the step itself, an unknown one, a rank step, an unknown field.
        let e = parse(&SEARCH.replace("query = \"{{ steps.q }}\"", "query = \"{{ steps.best }}\"")).unwrap_err().to_string();
        assert!(e.contains("names step `best`, which does not come before it"), "{e}");
        assert!(e.starts_with("/w/flow.toml:23:9:"), "{e}");
        let later = SEARCH.replace("query = \"{{ steps.q }}\"", "query = \"{{ steps.last }}\"")
            + "[[steps]]\nname = \"last\"\ntask = \"embed\"\nmodel = \"minilm\"\ntexts = [\"x\"]\n";
        assert!(parse(&later).unwrap_err().to_string().contains("names step `last`, which does not come before it"));
        let e = parse(&SEARCH.replace("{{ steps.q }}", "{{ steps.qq }}")).unwrap_err().to_string();
        assert!(e.contains("names no step `qq` (earlier steps: docs, q)"), "{e}");
        let twice = SEARCH.to_string()
            + "[[steps]]\nname = \"again\"\ntask = \"rank\"\nquery = \"{{ steps.best }}\"\ncorpus = \"{{ steps.docs }}\"\n";
        assert!(parse(&twice).unwrap_err().to_string().contains("names step `best`, a rank step; it takes an embed step"));
        let e = parse(&SEARCH.replace("{{ steps.docs.embeddings }}", "{{ steps.docs.vectors }}")).unwrap_err().to_string();
        assert!(e.contains("step `docs` has no field `vectors`"), "{e}");
        let e = parse(&SEARCH.replace("\"{{ steps.q }}\"", "\"q\"")).unwrap_err().to_string();
        assert!(e.contains("`query`: `q` is not a step reference"), "{e}");
    }

    #[test]
    fn rank_and_embed_keys_do_not_mix() {
        let e = parse(&SEARCH.replace("top_k = \"{{ k }}\"", "top_k = 0")).unwrap_err().to_string();
        assert!(e.contains("`top_k` must be a whole number of at least 1"), "{e}");
        let e = parse(&SEARCH.replace("task = \"rank\"\n", "task = \"rank\"\nmodel = \"minilm\"\n")).unwrap_err().to_string();
        assert!(e.contains("a rank step uses no model"), "{e}");
        let e = parse(&SEARCH.replace("corpus = \"{{ steps.docs.embeddings }}\"\n", "")).unwrap_err().to_string();
        assert!(e.contains("a rank step needs `corpus = \"{{ steps.NAME }}\"`"), "{e}");
        let e = parse(&GOOD.replace("output =", "top_k = 3\noutput =")).unwrap_err().to_string();
        assert!(e.contains("`top_k` belongs to rank steps"), "{e}");
        let e = parse(&GOOD.replace("name = \"embed\"\ntask", "name = \"two words\"\ntask")).unwrap_err().to_string();
        assert!(e.contains("step name `two words`: use letters"), "{e}");
        let no_top_k = SEARCH.replace("top_k = \"{{ k }}\"\n", "");
        assert!(matches!(parse(&no_top_k).unwrap().steps[2].task, Task::Rank { top_k: DEFAULT_TOP_K, .. }));
    }
}
