//! What every task's parser and run share: the context a step is parsed
//! in, the models and inputs it runs on, earlier steps' results, and how
//! results are written. A leaf under the task modules: they use it, it uses
//! none of them.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::kind::Kind;
use crate::template::{self, FloatDecl, IntDecl, Value};
use crate::weights::Weights;
use crate::workflow::decl::{lora_specs, LoraDecl, LoraSpec, ModelSpec};
use crate::workflow::error::WorkflowError;
use crate::{ExecError, OutputError};

/// The models a step runs on.
pub enum StepModels<'a> {
    None,
    /// One model's weights, and whether an earlier step acquired them.
    One(&'a Weights, bool),
    /// A pipeline's configs and its components' weights (component, weights, reused).
    Pipeline(Box<mora_models::image::pipeline::PipelineConfig>, Vec<(&'static str, &'a Weights, bool)>),
}

/// What a step read before the run began.
pub enum Inputs {
    None,
    Texts(Vec<String>),
    /// An image step's starting picture.
    Image(mora_models::image::pipeline::RgbImage),
}

/// The step being run: its name and where its output goes.
pub struct StepRun<'a> {
    pub name: &'a str,
    pub output: &'a Path,
    /// The LoRA adapters the step applies, read before any lease.
    pub loras: &'a [crate::lora::Applied],
}

/// Earlier steps' results, by step name.
#[derive(Default)]
pub struct Results {
    /// An embed step's texts and their embeddings, in order.
    pub embedded: BTreeMap<String, (Vec<String>, Vec<Vec<f32>>)>,
    /// Text results (a rank step's best match, a generate step's text), for prompts.
    pub texts: BTreeMap<String, String>,
    /// An image step's PNG files, in order.
    pub images: BTreeMap<String, Vec<PathBuf>>,
}

/// What a task's parser may use: the step's name and common keys, the
/// workflow's variables, models and earlier steps, and error positions.
pub struct StepContext<'a> {
    pub name: &'a str,
    /// The whole step, for errors about a missing key.
    pub span: Range<usize>,
    pub task: &'a str,
    pub model: Option<&'a Spanned<String>>,
    pub variables: &'a BTreeMap<String, Value>,
    pub models: &'a BTreeMap<String, ModelSpec>,
    /// Steps before this one, by name, with their kinds.
    pub earlier: &'a BTreeMap<String, &'static Kind>,
    /// Every task (`tasks::KINDS`), for errors that list them.
    pub kinds: &'a [&'static Kind],
    /// Every step's name, earlier or not.
    pub all_names: &'a std::collections::HashSet<&'a str>,
    /// The workflow file's directory, which anchors relative paths.
    pub base: &'a Path,
    /// The workflow's `seed` (0 when it gives none).
    pub seed: u64,
    pub(crate) at: &'a dyn Fn(Option<Range<usize>>, String) -> WorkflowError,
}

impl StepContext<'_> {
    /// An error about this step at `span` (the step itself when None).
    pub fn err(&self, span: Option<Range<usize>>, message: String) -> WorkflowError {
        (self.at)(Some(span.unwrap_or_else(|| self.span.clone())), format!("step `{}`: {message}", self.name))
    }

    /// An error at `span` that names the step itself.
    pub fn at(&self, span: Range<usize>, message: String) -> WorkflowError {
        (self.at)(Some(span), message)
    }

    /// The task's own keys, typed; an unknown key is an error at that key.
    pub fn decode<'de, T: Deserialize<'de>>(&self, keys: Spanned<toml::de::DeValue<'de>>) -> Result<T, WorkflowError> {
        use serde::de::IntoDeserializer;
        T::deserialize(keys.into_deserializer()).map_err(|e| (self.at)(e.span(), e.message().trim().replace('\n', " ")))
    }

    /// The declared model this step names with `model = "NAME"`.
    pub fn model(&self) -> Result<String, WorkflowError> {
        let Some(model) = self.model else {
            return Err(self.err(None, format!("a {} step needs `model = \"NAME\"`", self.task)));
        };
        if !self.models.contains_key(model.get_ref()) {
            let known: Vec<&str> = self.models.keys().map(String::as_str).collect();
            let hint = if known.is_empty() {
                "no models are declared: add a [models.NAME] table".to_string()
            } else {
                format!("declared: {}", known.join(", "))
            };
            return Err(self.at(model.span(), format!("step `{}` uses unknown model `{}` ({hint})", self.name, model.get_ref())));
        }
        Ok(model.get_ref().clone())
    }

    /// The step's `loras`, or its model's when it gives none.
    pub(crate) fn loras(&self, model: &str, decl: &Option<Vec<Spanned<LoraDecl>>>) -> Result<Vec<LoraSpec>, WorkflowError> {
        match decl {
            Some(d) => lora_specs(&format!("step `{}`", self.name), d, self.base, self.at),
            None => Ok(self.models.get(model).map(|m| m.loras.clone()).unwrap_or_default()),
        }
    }

    /// A whole-number key of at least `min`, written as one or as `{{ variable }}`s.
    pub fn int(&self, key: &str, decl: &Spanned<IntDecl>, min: i64, what: &str) -> Result<i64, WorkflowError> {
        match template::int_of(decl.get_ref(), self.variables).map_err(|e| self.err(Some(decl.span()), e.to_string()))? {
            Some(v) if v >= min => Ok(v),
            _ => Err(self.err(Some(decl.span()), format!("`{key}` must be {what}"))),
        }
    }

    /// A number key accepted by `ok`, written as one or as `{{ variable }}`s.
    pub fn float(&self, key: &str, decl: &Spanned<FloatDecl>, ok: impl Fn(f64) -> bool, what: &str) -> Result<f64, WorkflowError> {
        match template::float_of(decl.get_ref(), self.variables).map_err(|e| self.err(Some(decl.span()), e.to_string()))? {
            Some(v) if ok(v) => Ok(v),
            _ => Err(self.err(Some(decl.span()), format!("`{key}` must be {what}"))),
        }
    }
}

/// Drops `v` on a thread of its own. Freeing a model's tokenizer (two maps of
/// tens of thousands of strings for a BERT vocabulary) takes 3 to 5 ms after
/// the result is written: a `mora-exec run` exits after its last step without
/// waiting for it, and a long-lived process (the REPL, `watch`) still frees
/// it, off the path to its next result. For a model on the CPU only: GPU
/// tensors over a lent IPC handle must go before the handle closes, which the
/// run does right after the step (`run.rs`).
pub fn drop_later<T: Send + 'static>(v: T) {
    // If no thread can be started, the closure, and `v` with it, is dropped here.
    let _ = std::thread::Builder::new().name("mora-drop".into()).spawn(move || drop(v));
}

/// Writes text via a temporary file and a rename, so a reader never sees
/// half a file; a newline ends it.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ExecError> {
    let mut text = bytes.to_vec();
    text.push(b'\n');
    write_bytes_atomically(path, &text)
}

/// Writes `bytes` exactly, via a temporary file and a rename.
pub fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> Result<(), ExecError> {
    use std::io::Write;
    let fail = |source| ExecError::Output(OutputError::Write { path: path.to_path_buf(), source });
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(fail)?;
    f.write_all(bytes).map_err(fail)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(fail)
}

/// Writes a step's JSON result.
pub fn write_json(path: &Path, doc: &serde_json::Value) -> Result<(), ExecError> {
    write_atomically(path, serde_json::to_string(doc).expect("JSON of plain values").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_dropped_later_is_dropped_on_another_thread() {
        struct Tell(std::sync::mpsc::Sender<std::thread::ThreadId>);
        impl Drop for Tell {
            fn drop(&mut self) {
                let _ = self.0.send(std::thread::current().id());
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        drop_later(Tell(tx));
        let dropped_on = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("the value is dropped");
        assert_ne!(dropped_on, std::thread::current().id());
    }
}
