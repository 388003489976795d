//! What a task is, before any step of it is parsed: what the workflow
//! reader and prompts need to know of every task. A leaf.

/// What a task is, before any step of it is parsed.
pub struct Kind {
    /// `task = "..."`.
    pub name: &'static str,
    /// Its own keys (beyond `name`, `task`, `model` and `output`), in groups
    /// that an error about a misplaced key names together.
    pub keys: &'static [&'static [&'static str]],
    /// Fields of its text results that a prompt may name: the first is what
    /// `{{ steps.NAME }}` alone means. Empty for a task whose results are not text.
    pub text_fields: &'static [&'static str],
    /// What its results are called, for errors ("embeddings").
    pub results: &'static str,
}
