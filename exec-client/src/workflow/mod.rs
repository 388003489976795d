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

pub mod decl;
pub mod error;

use crate::tasks::kind::Kind;
use crate::tasks::step::StepContext;
use crate::tasks::{self, Task};
use crate::template::{expand, int_of, IntDecl};
use crate::template::Value;
use decl::{ModelDecl, ModelSpec};
use error::{line_col, WorkflowError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowFile {
    name: String,
    description: Option<String>,
    seed: Option<Spanned<IntDecl>>,
    #[serde(default)]
    variables: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    models: BTreeMap<String, Spanned<ModelDecl>>,
}

/// What every step has, whatever its task; the task's own keys are read
/// by its module in [`crate::tasks`].
#[derive(Debug, Deserialize)]
struct StepHead {
    name: Spanned<String>,
    task: Spanned<String>,
    model: Option<Spanned<String>>,
    output: Option<String>,
}

const COMMON_KEYS: [&str; 4] = ["name", "task", "model", "output"];

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
        self.task.model()
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

fn valid_step_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
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
        let toml_err = |e: toml::de::Error| at(e.span(), e.message().trim().replace('\n', " "));
        let mut root = toml::de::DeTable::parse(src).map_err(toml_err)?;
        // Steps are read one by one below, each task reading its own keys.
        let steps_value = root.get_mut().remove("steps");
        let file = {
            use serde::de::IntoDeserializer;
            WorkflowFile::deserialize(root.into_deserializer()).map_err(toml_err)?
        };
        let step_values = match steps_value {
            None => Vec::new(),
            Some(v) => {
                let span = v.span();
                match v.into_inner() {
                    toml::de::DeValue::Array(items) => items.into_iter().collect::<Vec<_>>(),
                    _ => return Err(at(Some(span), "`steps` must be a list of tables: write each step as [[steps]]".into())),
                }
            }
        };
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());

        if file.name.trim().is_empty() {
            return Err(at(None, "`name` must not be empty".into()));
        }
        let mut variables = read_variables(&file.variables, &at)?;
        apply_sets(&mut variables, sets, path)?;
        let mut models = BTreeMap::new();
        for (key, decl) in &file.models {
            models.insert(key.clone(), decl::model_spec(key, decl, &base, &at)?);
        }

        if step_values.is_empty() {
            return Err(at(None, "no `[[steps]]`: nothing to run".into()));
        }
        let seed = match &file.seed {
            None => 0,
            Some(sd) => match int_of(sd.get_ref(), &variables).map_err(|e| at(Some(sd.span()), e.to_string()))? {
                Some(v) if v >= 0 => v as u64,
                _ => return Err(at(Some(sd.span()), "`seed` must be a whole number of at least 0".into())),
            },
        };
        // The common keys of every step first, so that names are known.
        let heads = step_values.into_iter().map(|value| read_head(value, &at, &toml_err)).collect::<Result<Vec<_>, _>>()?;
        // Step name -> its task, for the steps before the current one.
        let mut earlier: BTreeMap<String, &'static Kind> = BTreeMap::new();
        let all_names: HashSet<&str> = heads.iter().map(|h| h.head.name.get_ref().as_str()).collect();
        let mut steps = Vec::new();
        for StepValue { span, head, own } in &heads {
            let name = head.name.get_ref();
            if !valid_step_name(name) {
                return Err(at(
                    Some(head.name.span()),
                    format!("step name `{name}`: use letters, digits, `_` and `-` (steps are referred to as `steps.NAME`)"),
                ));
            }
            if earlier.contains_key(name) {
                return Err(at(Some(span.clone()), format!("step name `{name}` is used twice")));
            }
            let kind = step_kind(head, own, span, &at)?;
            let cx = StepContext {
                name,
                span: span.clone(),
                task: kind.name,
                model: head.model.as_ref(),
                variables: &variables,
                models: &models,
                earlier: &earlier,
                kinds: tasks::KINDS,
                all_names: &all_names,
                base: &base,
                seed,
                at: &at,
            };
            let task = Task::parse(kind, &cx, own.clone())?;
            let output = match &head.output {
                Some(o) => PathBuf::from(expand(o, &variables).map_err(|e| cx.err(None, e.to_string()))?),
                None => PathBuf::from(format!("{name}.json")),
            };
            earlier.insert(name.clone(), kind);
            steps.push(Step { name: name.clone(), task, output });
        }
        Ok(Workflow { name: file.name, description: file.description, path: path.to_path_buf(), variables, models, steps })
    }
}

/// Where a workflow error is: a span of the file, or the file as a whole.
type Locate<'a> = dyn Fn(Option<Range<usize>>, String) -> WorkflowError + 'a;

/// `[variables]`: each default's value, typed by the default.
fn read_variables(decls: &BTreeMap<String, Spanned<toml::Value>>, at: &Locate) -> Result<BTreeMap<String, Value>, WorkflowError> {
    let mut variables = BTreeMap::new();
    for (key, v) in decls {
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
    Ok(variables)
}

/// `--set NAME=VALUE`s over the defaults: each names a declared variable
/// and gives a value of its default's type.
fn apply_sets(variables: &mut BTreeMap<String, Value>, sets: &[String], path: &Path) -> Result<(), WorkflowError> {
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
        let value = default
            .with(text)
            .ok_or_else(|| bad(format!("`{key}` is {} (default {default}), and `{text}` is not one", default.type_name())))?;
        variables.insert(key.to_string(), value);
    }
    Ok(())
}

/// A `[[steps]]` table cut in two: the keys every step has, decoded, and
/// the task's own keys, left for its module to read.
struct StepValue<'s> {
    span: Range<usize>,
    head: StepHead,
    own: Spanned<toml::de::DeValue<'s>>,
}

fn read_head<'s>(
    value: Spanned<toml::de::DeValue<'s>>,
    at: &Locate,
    toml_err: &dyn Fn(toml::de::Error) -> WorkflowError,
) -> Result<StepValue<'s>, WorkflowError> {
    let span = value.span();
    let toml::de::DeValue::Table(table) = value.get_ref() else {
        return Err(at(Some(span), "a step must be a table: write each step as [[steps]]".into()));
    };
    let (mut head, mut own) = (toml::de::DeTable::new(), toml::de::DeTable::new());
    for (k, v) in table.iter() {
        let side = if COMMON_KEYS.contains(&k.get_ref().as_ref()) { &mut head } else { &mut own };
        side.insert(k.clone(), v.clone());
    }
    let head = {
        use serde::de::IntoDeserializer;
        StepHead::deserialize(Spanned::new(span.clone(), toml::de::DeValue::Table(head)).into_deserializer()).map_err(toml_err)?
    };
    Ok(StepValue { span: span.clone(), head, own: Spanned::new(span, toml::de::DeValue::Table(own)) })
}

/// The task a step names; a key of another task is an error that says whose
/// it is.
fn step_kind(head: &StepHead, own: &Spanned<toml::de::DeValue<'_>>, span: &Range<usize>, at: &Locate) -> Result<&'static Kind, WorkflowError> {
    let name = head.name.get_ref();
    let task_name = head.task.get_ref().as_str();
    let Some(kind) = tasks::kind(task_name) else {
        let names: Vec<String> = tasks::KINDS.iter().map(|k| format!("`{}`", k.name)).collect();
        let (last, rest) = names.split_last().expect("tasks");
        return Err(at(Some(head.task.span()), format!("unknown task `{task_name}`: expected {} or {last}", rest.join(", "))));
    };
    if let toml::de::DeValue::Table(keys) = own.get_ref() {
        for key in keys.keys() {
            let key = key.get_ref().as_ref();
            if kind.keys.iter().any(|group| group.contains(&key)) {
                continue;
            }
            let owner = tasks::KINDS
                .iter()
                .filter(|k| k.name != kind.name)
                .find_map(|k| k.keys.iter().find(|group| group.contains(&key)).map(|group| (k.name, group)));
            if let Some((owner, group)) = owner {
                let what = match group {
                    [one] => format!("`{one}` belongs"),
                    many => {
                        let quoted: Vec<String> = many.iter().map(|k| format!("`{k}`")).collect();
                        let (last, rest) = quoted.split_last().expect("a group");
                        format!("{} and {last} belong", rest.join(", "))
                    }
                };
                return Err(at(Some(span.clone()), format!("step `{name}`: {what} to {owner} steps, not {task_name}")));
            }
        }
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::Piece;
    use mora_common::manifest::WeightDType;
    use mora_common::protocol::DeviceSpec;
    use mora_common::units::KeepAlive;
    use mora_common::ModelSource;
    use crate::tasks::embed::{EmbedStep, Texts};
    use crate::tasks::generate::{GenerateStep, PromptDecl, DEFAULT_MAX_TOKENS};
    use crate::tasks::rank::{RankStep, DEFAULT_TOP_K};

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
        assert_eq!(w.steps[0].task, Task::Embed(EmbedStep { model: "minilm".into(), texts: Texts::Inline(vec!["a".into(), "b".into()]) }));
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
        assert_eq!(w.models["minilm"].source, ModelSource::Dir { path: PathBuf::from("/w/models/mini"), variant: None });
        let up = parse(&src.replace("models/mini", "./../shared/./mini")).unwrap();
        assert_eq!(up.models["minilm"].source, ModelSource::Dir { path: PathBuf::from("/shared/mini"), variant: None });
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
        let bad_task = GOOD.replace("task = \"embed\"", "task = \"summarize\"");
        assert!(parse(&bad_task).unwrap_err().to_string().contains("unknown task `summarize`: expected `embed`, `rank`, `generate` or `image`"));
    }

    #[test]
    fn duplicate_step_names_are_refused() {
        let src = format!("{GOOD}\n[[steps]]\nname = \"embed\"\ntask = \"embed\"\nmodel = \"minilm\"\ntexts = [\"c\"]\n");
        assert!(parse(&src).unwrap_err().to_string().contains("used twice"));
    }

    #[test]
    fn texts_file_skips_blank_lines() {
        let dir = mora_test_support::Scratch::new("wf");
        let f = dir.join("corpus.txt");
        std::fs::write(&f, "one\n\n two \nthree\n").unwrap();
        assert_eq!(Texts::File(f.clone()).load().unwrap(), vec!["one", " two ", "three"]);
        std::fs::write(&f, "\n\n").unwrap();
        assert!(Texts::File(f).load().unwrap_err().to_string().contains("holds no texts"));
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
        assert_eq!(w.steps[0].task, Task::Embed(EmbedStep { model: "minilm".into(), texts: Texts::File("/w/corpus.txt".into()) }));
        assert_eq!(
            w.steps[1].task,
            Task::Embed(EmbedStep {
                model: "minilm".into(),
                texts: Texts::Inline(vec!["A man is eating pasta.".into(), "again: A man is eating pasta.".into()])
            })
        );
        assert_eq!(w.steps[2].task, Task::Rank(RankStep { query: "q".into(), corpus: "docs".into(), top_k: 2 }));
        assert_eq!(w.steps[2].output, PathBuf::from("ranked-2.json"));
        assert_eq!(w.steps[2].model(), None);
        assert_eq!(w.steps[0].output, PathBuf::from("docs.json"));
    }

    #[test]
    fn set_converts_to_the_defaults_type_or_says_why_not() {
        let w = with_sets(SEARCH, &["k=4", "query=Who plays drums?"]).unwrap();
        assert_eq!(w.variables["k"], Value::Int(4));
        assert!(matches!(&w.steps[2].task, Task::Rank(RankStep { top_k: 4, .. })));
        assert!(matches!(&w.steps[1].task, Task::Embed(EmbedStep { texts: Texts::Inline(t), .. }) if t[0] == "Who plays drums?"));
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
        assert!(matches!(parse(&no_top_k).unwrap().steps[2].task, Task::Rank(RankStep { top_k: DEFAULT_TOP_K, .. })));
    }

    const PIPELINE: &str = r#"
name = "pipeline"
seed = 7
[variables]
query = "pasta"
tokens = 8
[models.minilm]
repo = "sentence-transformers/all-MiniLM-L6-v2"
[models.llm]
path = "llm"
[[steps]]
name = "docs"
task = "embed"
model = "minilm"
texts = ["a", "b"]
[[steps]]
name = "q"
task = "embed"
model = "minilm"
texts = ["{{ query }}"]
[[steps]]
name = "best"
task = "rank"
query = "{{ steps.q }}"
corpus = "{{ steps.docs }}"
[[steps]]
name = "answer"
task = "generate"
model = "llm"
prompt = "Context: {{ steps.best.top }}. Question about {{ query }}:"
max_tokens = "{{ tokens }}"
[[steps]]
name = "again"
task = "generate"
model = "llm"
prompt = "{{ steps.answer }}"
temperature = 0.7
top_p = 0.9
seed = 3
"#;

    #[test]
    fn generate_prompts_keep_step_results_for_run_time_and_seeds_go_most_specific_first() {
        let w = parse(PIPELINE).unwrap();
        assert_eq!(
            w.steps[3].task,
            Task::Generate(GenerateStep {
                model: "llm".into(),
                prompt: PromptDecl::Text(vec![
                    Piece::Text("Context: ".into()),
                    Piece::StepText("best".into()),
                    Piece::Text(". Question about pasta:".into())
                ]),
                max_tokens: 8,
                temperature: 0.0,
                top_p: None,
                seed: 7,
                loras: Vec::new(),
            })
        );
        assert!(matches!(&w.steps[4].task, Task::Generate(GenerateStep { seed: 3, top_p: Some(p), temperature, max_tokens: DEFAULT_MAX_TOKENS, .. }) if *p == 0.9 && *temperature == 0.7));
        let no_seed = PIPELINE.replace("seed = 7\n", "");
        assert!(matches!(parse(&no_seed).unwrap().steps[3].task, Task::Generate(GenerateStep { seed: 0, .. })));
    }

    #[test]
    fn generate_errors_name_the_key_and_the_reason() {
        let e = parse(&PIPELINE.replace("{{ steps.best.top }}", "{{ steps.docs }}")).unwrap_err().to_string();
        assert!(e.contains("step `docs` is an embed step; its embeddings are not text"), "{e}");
        let e = parse(&PIPELINE.replace("{{ steps.best.top }}", "{{ steps.best.score }}")).unwrap_err().to_string();
        assert!(e.contains("step `best` has no field `score`"), "{e}");
        let e = parse(&PIPELINE.replace("prompt = \"{{ steps.answer }}\"", "prompt = \"{{ steps.again }}\"")).unwrap_err().to_string();
        assert!(e.contains("no earlier step `again` (earlier steps: answer, best, docs, q)"), "{e}");
        let e = parse(&PIPELINE.replace("temperature = 0.7", "temperature = -1")).unwrap_err().to_string();
        assert!(e.contains("`temperature` must be a number of at least 0"), "{e}");
        let e = parse(&PIPELINE.replace("top_p = 0.9", "top_p = 1.5")).unwrap_err().to_string();
        assert!(e.contains("`top_p` must be a number above 0 and at most 1"), "{e}");
        let e = parse(&PIPELINE.replace("max_tokens = \"{{ tokens }}\"", "max_tokens = 0")).unwrap_err().to_string();
        assert!(e.contains("`max_tokens` must be a whole number of at least 1"), "{e}");
        let e = parse(&PIPELINE.replace("texts = [\"a\", \"b\"]", "texts = [\"a\"]\nseed = 1")).unwrap_err().to_string();
        assert!(e.contains("`temperature`, `top_p` and `seed` belong to generate steps, not embed"), "{e}");
        let e = parse(&PIPELINE.replace("max_tokens = \"{{ tokens }}\"\n", "")
            .replace("prompt = \"Context", "texts = [\"x\"]\nprompt = \"Context")).unwrap_err().to_string();
        assert!(e.contains("`texts` belongs to embed steps, not generate"), "{e}");
        let e = parse(&PIPELINE.replace("prompt = \"{{ steps.answer }}\"\n", "")).unwrap_err().to_string();
        assert!(e.contains("a generate step needs `prompt"), "{e}");
        let e = parse(&PIPELINE.replace("seed = 7", "seed = -2")).unwrap_err().to_string();
        assert!(e.contains("`seed` must be a whole number of at least 0"), "{e}");
    }

    #[test]
    fn chat_messages_take_variables_and_step_results_and_exclude_a_prompt() {
        let chat = PIPELINE.replace(
            "prompt = \"{{ steps.answer }}\"",
            "messages = [{ role = \"system\", content = \"About {{ query }}.\" }, { role = \"user\", content = \"{{ steps.answer }}\" }]",
        );
        let w = parse(&chat).unwrap();
        let Task::Generate(g) = &w.steps[4].task else { panic!() };
        assert_eq!(
            g.prompt,
            PromptDecl::Chat(vec![
                ("system".into(), vec![Piece::Text("About pasta.".into())]),
                ("user".into(), vec![Piece::StepText("answer".into())]),
            ])
        );
        let e = parse(&chat.replace("top_p = 0.9", "top_p = 0.9\nprompt = \"x\"")).unwrap_err().to_string();
        assert!(e.contains("gives both `prompt` and `messages`: keep one"), "{e}");
        let e = parse(&chat.replace("{{ steps.answer }}\" }]", "{{ steps.docs }}\" }]")).unwrap_err().to_string();
        assert!(e.contains("`messages`[1]: `{{ steps.docs }}`: step `docs` is an embed step"), "{e}");
        let e = parse(&chat.replace("role = \"system\", ", "")).unwrap_err().to_string();
        assert!(e.contains("missing field `role`"), "{e}");
        let e = parse(&chat.replace("content = \"About {{ query }}.\"", "content = \"x\", name = \"n\"")).unwrap_err().to_string();
        assert!(e.contains("unknown field `name`"), "{e}");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Lines a workflow is made of: real keys and typos, every value type,
        /// references good and bad, in any order.
        fn line() -> impl Strategy<Value = String> {
            prop::sample::select(vec![
                "name = \"w\"", "description = 3", "seed = -1", "seed = \"{{ s }}\"", "[variables]", "s = 4", "t = \"x\"",
                "u = [1]", "[models.m]", "repo = \"a/b\"", "path = \"p\"", "dtype = \"f16\"", "device = \"cuda:x\"",
                "keep_alive = 0", "keep_alive = \"soon\"", "[[steps]]", "name = \"e\"", "name = \"r\"", "name = \"a b\"",
                "task = \"embed\"", "task = \"rank\"", "task = \"generate\"", "model = \"m\"", "model = \"zz\"",
                "texts = [\"{{ t }}\"]", "texts = []", "texts_file = \"{{ nope }}\"", "query = \"{{ steps.e }}\"",
                "corpus = \"{{ steps.r.top }}\"", "top_k = \"{{ s }}\"", "top_k = 0", "prompt = \"{{ steps.e.text }} {{ t\"",
                "prompt = \"{{ steps.r }}\"", "max_tokens = 2", "temperature = \"hot\"", "top_p = 1.5", "output = \"../x\"",
                "outptu = 1", "[models]", "= =", "\u{0}",
            ])
            .prop_map(str::to_string)
        }

        proptest! {
            /// Any text at all: parsed or refused, never a panic; a refusal is
            /// one line that names the file.
            #[test]
            fn arbitrary_text_never_panics(src in ".{0,200}") {
                if let Err(e) = Workflow::parse(&src, Path::new("/w/flow.toml")) {
                    let e = e.to_string();
                    prop_assert!(e.starts_with("/w/flow.toml") && !e.contains('\n'), "{}", e);
                }
            }

            #[test]
            fn workflow_shaped_text_never_panics_and_errors_are_one_line(
                lines in prop::collection::vec(line(), 0..24),
                sets in prop::collection::vec(prop::sample::select(vec!["s=5", "s=x", "t=y", "v=1", "bad"]), 0..3),
            ) {
                let sets: Vec<String> = sets.into_iter().map(str::to_string).collect();
                if let Err(e) = Workflow::parse_with(&lines.join("\n"), Path::new("/w/flow.toml"), &sets) {
                    let e = e.to_string();
                    prop_assert!(e.starts_with("/w/flow.toml") && !e.contains('\n'), "{}", e);
                }
            }
        }
    }
}

