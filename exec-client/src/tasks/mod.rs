//! The tasks a workflow step can perform. Each task is a module that owns its
//! keys (their parsing and validation, with the line and column of a bad one),
//! what it reads before any weight is, and its run; `template` keeps the
//! `{{ }}` text every task shares, `workflow` the reading of the file, and
//! `run` the order of steps and the leases on models.
//!
//! A new task is a new module here: its `KIND` (name, keys, which text
//! results it gives), its step type as a variant of [`Task`], and its arms
//! in the dispatching `match`es below. The task modules use `kind`, `step`
//! and `report` beside them, never this module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::Spanned;

use mora_models::image::pipeline::PipelineConfig;

use crate::workflow::decl::ModelSpec;
use crate::workflow::error::WorkflowError;
use crate::{ExecError, InputError, OutputError};

pub mod embed;
pub mod generate;
pub mod image;
pub mod kind;
pub mod rank;
pub mod report;
pub mod step;

use kind::Kind;
use report::StepReport;
use step::{Inputs, Results, StepContext, StepModels, StepRun};

/// Every task, in the order errors list them.
pub const KINDS: &[&Kind] = &[&embed::KIND, &rank::KIND, &generate::KIND, &image::KIND];

pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().copied().find(|k| k.name == name)
}

/// A parsed step's task.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    Embed(embed::EmbedStep),
    Rank(rank::RankStep),
    Generate(generate::GenerateStep),
    Image(image::ImageStep),
}

impl Task {
    /// Parses a step of task `kind` from its own keys.
    pub fn parse(kind: &Kind, cx: &StepContext, keys: Spanned<toml::de::DeValue<'_>>) -> Result<Task, WorkflowError> {
        Ok(match kind.name {
            "embed" => Task::Embed(embed::parse(cx, keys)?),
            "rank" => Task::Rank(rank::parse(cx, keys)?),
            "generate" => Task::Generate(generate::parse(cx, keys)?),
            "image" => Task::Image(image::parse(cx, keys)?),
            other => unreachable!("`{other}` is not in KINDS"),
        })
    }

    pub fn kind(&self) -> &'static Kind {
        match self {
            Task::Embed(_) => &embed::KIND,
            Task::Rank(_) => &rank::KIND,
            Task::Generate(_) => &generate::KIND,
            Task::Image(_) => &image::KIND,
        }
    }

    /// The `[models.NAME]` this step runs, if it runs one.
    pub fn model(&self) -> Option<&str> {
        match self {
            Task::Embed(s) => Some(&s.model),
            Task::Generate(s) => Some(&s.model),
            Task::Image(s) => Some(&s.model),
            Task::Rank(_) => None,
        }
    }

    /// The LoRA adapters this step applies (its own `loras`, or its model's).
    pub fn loras(&self) -> &[crate::workflow::decl::LoraSpec] {
        match self {
            Task::Generate(s) => &s.loras,
            Task::Image(s) => &s.loras,
            Task::Embed(_) | Task::Rank(_) => &[],
        }
    }

    /// Files this step reads besides models (what `watch` watches).
    pub fn input_files(&self) -> Vec<PathBuf> {
        match self {
            Task::Embed(s) => s.texts.file().into_iter().collect(),
            Task::Image(s) => s.input_files(),
            Task::Rank(_) | Task::Generate(_) => Vec::new(),
        }
    }

    /// Reads this step's inputs: done for every step before any model is
    /// acquired, so that a bad input fails fast (and in `check`).
    pub fn read_inputs(&self) -> Result<Inputs, InputError> {
        match self {
            Task::Embed(s) => Ok(Inputs::Texts(s.texts.load()?)),
            Task::Image(s) => s.read_inputs(),
            Task::Rank(_) | Task::Generate(_) => Ok(Inputs::None),
        }
    }

    /// Refuses an output this task cannot write (an image step writes PNG).
    pub fn check_output(&self, output: &Path) -> Result<(), OutputError> {
        match self {
            Task::Image(_) if !output.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) => {
                Err(OutputError::NotPng(output.to_path_buf()))
            }
            _ => Ok(()),
        }
    }

    /// What this step reads before any weight is, so that a model it
    /// cannot run is refused before any lease (by `check` and `run`): a
    /// generate step's decoder config and chat template; an image step's
    /// pipeline, returned, since its components are the step's weights.
    pub fn prepare(&self, models: &BTreeMap<String, ModelSpec>) -> Result<Option<PipelineConfig>, ExecError> {
        match self {
            Task::Generate(s) => generate::check_model(s, &models[&s.model]).map(|()| None),
            Task::Image(s) => image::pipeline_config(s, &models[&s.model]).map(Some),
            Task::Embed(_) | Task::Rank(_) => Ok(None),
        }
    }

    /// Runs the step. `model` is the step's model's weights and whether an
    /// earlier step of this run acquired them (for a pipeline, each
    /// component's); `results` holds earlier steps'.
    pub fn run(&self, step: &StepRun, model: StepModels<'_>, inputs: Inputs, results: &mut Results) -> Result<StepReport, ExecError> {
        match (self, model) {
            (Task::Embed(s), StepModels::One(w, reused)) => embed::run(s, step, (w, reused), inputs, results),
            (Task::Rank(s), _) => rank::run(s, step, results),
            (Task::Generate(s), StepModels::One(w, reused)) => generate::run(s, step, (w, reused), results),
            (Task::Image(s), StepModels::Pipeline(config, parts)) => image::run(s, step, *config, &parts, inputs, results),
            _ => unreachable!("run hands each task the models it declares"),
        }
    }
}

