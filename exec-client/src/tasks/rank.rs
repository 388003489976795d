//! `task = "rank"`: each text of one embed step against another's texts, by
//! cosine similarity, best first.

use std::time::Instant;

use serde::Deserialize;
use toml::Spanned;

use super::kind::Kind;
use super::report::{StepKind, StepReport};
use super::step::{write_json, Results, StepContext, StepRun};
use crate::template::IntDecl;
use crate::workflow::error::WorkflowError;
use crate::ExecError;

pub const KIND: Kind =
    Kind { name: "rank", keys: &[&["query"], &["corpus"], &["top_k"]], text_fields: &["top"], results: "matches" };

/// `top_k` of a rank step that gives none.
pub const DEFAULT_TOP_K: usize = 5;

#[derive(Debug, Clone, PartialEq)]
pub struct RankStep {
    /// Names of earlier embed steps.
    pub query: String,
    pub corpus: String,
    pub top_k: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Decl {
    query: Option<Spanned<String>>,
    corpus: Option<Spanned<String>>,
    top_k: Option<Spanned<IntDecl>>,
}

/// Why a `query` or `corpus` names no embed step's results.
#[derive(Debug, thiserror::Error)]
enum RefError {
    #[error("`{0}` is not a step reference: write \"{{{{ steps.NAME }}}}\"")]
    NotAReference(String),
    #[error("step `{step}` has no field `{field}` (an embed step gives `embeddings`)")]
    NoField { step: String, field: String },
}

/// The step a `"{{ steps.NAME }}"` (or `"{{ steps.NAME.embeddings }}"`) names.
fn step_ref(value: &str) -> Result<String, RefError> {
    let inner = value
        .trim()
        .strip_prefix("{{")
        .and_then(|v| v.strip_suffix("}}"))
        .map(str::trim)
        .and_then(|v| v.strip_prefix("steps."))
        .ok_or_else(|| RefError::NotAReference(value.to_string()))?;
    match inner.split_once('.') {
        None => Ok(inner.to_string()),
        Some((name, "embeddings")) => Ok(name.to_string()),
        Some((name, field)) => Err(RefError::NoField { step: name.to_string(), field: field.to_string() }),
    }
}

pub fn parse(cx: &StepContext, keys: Spanned<toml::de::DeValue<'_>>) -> Result<RankStep, WorkflowError> {
    if let Some(m) = cx.model {
        return Err(cx.err(Some(m.span()), "a rank step uses no model (it ranks the embeddings of earlier steps)".into()));
    }
    let d: Decl = cx.decode(keys)?;
    let mut refs = Vec::new();
    for (key, v) in [("query", &d.query), ("corpus", &d.corpus)] {
        let Some(v) = v else {
            return Err(cx.err(None, format!("a rank step needs `{key} = \"{{{{ steps.NAME }}}}\"`")));
        };
        let target = step_ref(v.get_ref()).map_err(|e| cx.err(Some(v.span()), format!("`{key}`: {e}")))?;
        match cx.earlier.get(&target) {
            Some(k) if k.name == "embed" => refs.push(target),
            Some(other) => {
                return Err(cx.err(
                    Some(v.span()),
                    format!("`{key}` names step `{target}`, a {} step; it takes an embed step", other.name),
                ))
            }
            None if target == cx.name || cx.all_names.contains(target.as_str()) => {
                return Err(cx.err(
                    Some(v.span()),
                    format!("`{key}` names step `{target}`, which does not come before it: a step can use only earlier steps' results"),
                ))
            }
            None => {
                let known: Vec<&str> = cx.earlier.keys().map(String::as_str).collect();
                return Err(cx.err(
                    Some(v.span()),
                    format!(
                        "`{key}` names no step `{target}` ({})",
                        if known.is_empty() { "no step comes before this one".into() } else { format!("earlier steps: {}", known.join(", ")) }
                    ),
                ));
            }
        }
    }
    let top_k = match &d.top_k {
        None => DEFAULT_TOP_K,
        Some(k) => cx.int("top_k", k, 1, "a whole number of at least 1")? as usize,
    };
    let corpus = refs.pop().expect("two references");
    let query = refs.pop().expect("two references");
    Ok(RankStep { query, corpus, top_k })
}

pub fn run(s: &RankStep, step: &StepRun, results: &mut Results) -> Result<StepReport, ExecError> {
    // The workflow was checked: both name earlier embed steps.
    let (q, c) = (&results.embedded[&s.query], &results.embedded[&s.corpus]);
    let start = Instant::now();
    let found: Vec<serde_json::Value> = q
        .0
        .iter()
        .zip(&q.1)
        .map(|(text, e)| {
            let matches: Vec<serde_json::Value> = top_matches(e, &c.1, s.top_k)
                .into_iter()
                .map(|(i, score)| serde_json::json!({ "index": i, "text": c.0[i], "score": score }))
                .collect();
            serde_json::json!({ "query": text, "matches": matches })
        })
        .collect();
    let run_ms = start.elapsed().as_millis() as u64;
    let (queries, corpus) = (q.0.len(), c.0.len());
    write_json(step.output, &serde_json::json!({ "results": found }))?;
    if let Some(best) = found.first().and_then(|r| r["matches"][0]["text"].as_str()) {
        results.texts.insert(step.name.to_string(), best.to_string());
    }
    Ok(StepReport {
        step: step.name.to_string(),
        items: queries,
        unit: "queries",
        output: step.output.to_path_buf(),
        run_ms,
        what: StepKind::Rank { corpus, top_k: s.top_k },
    })
}

/// Cosine similarity of two vectors (0 when either is all zeros).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// The `k` corpus entries most similar to `query`, best first, as (index,
/// cosine); ties keep corpus order.
pub fn top_matches(query: &[f32], corpus: &[Vec<f32>], k: usize) -> Vec<(usize, f32)> {
    let mut scored: Vec<(usize, f32)> = corpus.iter().map(|c| cosine(query, c)).enumerate().collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(k);
    scored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_matches_are_the_most_similar_best_first() {
        let corpus = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.6, 0.8], vec![0.0, 0.0], vec![2.0, 0.0]];
        let m = top_matches(&[1.0, 0.0], &corpus, 3);
        // Scale does not matter (cosine), ties keep corpus order.
        assert_eq!(m.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0, 4, 2]);
        assert!((m[2].1 - 0.6).abs() < 1e-6);
        assert_eq!(top_matches(&[1.0, 0.0], &corpus, 10).len(), 5);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
