//! Workflow files: what models a run needs and what steps it performs.
//!
//! ```toml
//! name = "embed"
//! [models.minilm]
//! repo = "sentence-transformers/all-MiniLM-L6-v2"   # or: path = "some/local/dir"
//! [[steps]]
//! name = "embed"
//! task = "embed"
//! model = "minilm"
//! texts = ["A man is eating food."]                 # or: texts_file = "corpus.txt"
//! output = "embeddings.json"                        # relative to -o DIR
//! ```
//!
//! Key sets are closed: a misspelt key is an error with its line and column,
//! never silently ignored.

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
    name: String,
    task: Spanned<String>,
    model: Spanned<String>,
    texts: Option<Vec<String>>,
    texts_file: Option<PathBuf>,
    output: Option<PathBuf>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Sentence embeddings: BERT, then the model's pooling and normalisation.
    Embed,
}

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
    /// Key into [`Workflow::models`].
    pub model: String,
    pub texts: Texts,
    /// Relative to the run's output directory (unless absolute).
    pub output: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub name: String,
    pub path: PathBuf,
    pub models: BTreeMap<String, ModelSpec>,
    pub steps: Vec<Step>,
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
        let src = std::fs::read_to_string(path).map_err(|source| WorkflowError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&src, path)
    }

    /// Parses `src` as if read from `path` (which anchors relative paths).
    pub fn parse(src: &str, path: &Path) -> Result<Workflow, WorkflowError> {
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
        let mut names = HashSet::new();
        let mut steps = Vec::new();
        for step in &file.steps {
            let span = Some(step.span());
            let s = step.get_ref();
            if !names.insert(s.name.clone()) {
                return Err(at(span, format!("step name `{}` is used twice", s.name)));
            }
            let task = match s.task.get_ref().as_str() {
                "embed" => Task::Embed,
                other => return Err(at(Some(s.task.span()), format!("unknown task `{other}`: expected `embed`"))),
            };
            let model = s.model.get_ref();
            if !models.contains_key(model) {
                let known: Vec<&str> = models.keys().map(String::as_str).collect();
                let hint = if known.is_empty() {
                    "no models are declared: add a [models.NAME] table".to_string()
                } else {
                    format!("declared: {}", known.join(", "))
                };
                return Err(at(Some(s.model.span()), format!("step `{}` uses unknown model `{model}` ({hint})", s.name)));
            }
            let texts = match (&s.texts, &s.texts_file) {
                (Some(t), None) if t.is_empty() => {
                    return Err(at(span, format!("step `{}`: `texts` is empty", s.name)))
                }
                (Some(t), None) => Texts::Inline(t.clone()),
                (None, Some(f)) => Texts::File(base.join(f)),
                (Some(_), Some(_)) => {
                    return Err(at(span, format!("step `{}` gives both `texts` and `texts_file`: keep one", s.name)))
                }
                (None, None) => {
                    return Err(at(span, format!("step `{}` needs `texts = [...]` or `texts_file = \"FILE\"`", s.name)))
                }
            };
            let output = s.output.clone().unwrap_or_else(|| PathBuf::from(format!("{}.json", s.name)));
            steps.push(Step { name: s.name.clone(), task, model: model.clone(), texts, output });
        }
        Ok(Workflow { name: file.name, path: path.to_path_buf(), models, steps })
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
        assert_eq!(w.steps[0].texts, Texts::Inline(vec!["a".into(), "b".into()]));
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
}
