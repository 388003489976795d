//! Loads a `tokenizer.json` as the `tokenizers` crate does, faster for
//! WordPiece (the BERT family's model).
//!
//! `Tokenizer::from_file` reads the model section through a
//! `serde_json::Value` (the crate tells the model kinds apart by a flattened
//! `type`), so MiniLM's 30 522-entry vocabulary is parsed into a tree of
//! values and converted again: about 25 ms of a 70 ms warm embedding run. Here
//! the file is split into its sections without parsing them
//! (`RawValue`), a WordPiece vocabulary goes straight into the map the model
//! keeps, and the tokenizer is assembled with the crate's own builder and
//! parts, in the order and with the checks of the crate's own deserializer
//! (`tokenizer/serialization.rs`). Any other model (BPE, Unigram, WordLevel),
//! or a file the fast path does not read, goes through `Tokenizer::from_file`
//! itself, so errors and results are the crate's.

use std::path::Path;

use serde::Deserialize;
use serde_json::value::RawValue;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer, TokenizerBuilder,
};

/// Reads `path` into a tokenizer; the error names the file.
pub fn load(path: &Path) -> Result<Tokenizer, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    match wordpiece(&text) {
        Some(t) => Ok(t),
        None => Tokenizer::from_bytes(text.as_bytes())
            .map_err(|e| format!("cannot load {}: {e}", path.display())),
    }
}

/// The top-level sections of `tokenizer.json`, unparsed.
#[derive(Deserialize)]
struct Sections<'a> {
    version: Option<&'a str>,
    #[serde(borrow)]
    truncation: Option<&'a RawValue>,
    #[serde(borrow)]
    padding: Option<&'a RawValue>,
    #[serde(borrow)]
    added_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    normalizer: Option<&'a RawValue>,
    #[serde(borrow)]
    pre_tokenizer: Option<&'a RawValue>,
    #[serde(borrow)]
    model: &'a RawValue,
    #[serde(borrow)]
    decoder: Option<&'a RawValue>,
    #[serde(borrow)]
    post_processor: Option<&'a RawValue>,
}

/// The model's kind.
#[derive(Deserialize)]
struct Kind<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a str>,
}

/// A WordPiece model: the four fields the crate requires.
#[derive(Deserialize)]
struct WordPieceFields {
    unk_token: String,
    continuing_subword_prefix: String,
    max_input_chars_per_word: usize,
    vocab: ahash::AHashMap<String, u32>,
}

/// The tokenizer, when its model is WordPiece and every section parses;
/// `None` sends the file to the crate's own reader.
fn wordpiece(text: &str) -> Option<Tokenizer> {
    let s: Sections = serde_json::from_str(text).ok()?;
    if s.version.is_some_and(|v| v != "1.0") {
        return None;
    }
    // Only an explicit WordPiece: the crate reads a model without `type` by
    // trying each kind in turn, which is left to it.
    if serde_json::from_str::<Kind>(s.model.get()).ok()?.kind != Some("WordPiece") {
        return None;
    }
    let w: WordPieceFields = serde_json::from_str(s.model.get()).ok()?;
    let model = WordPiece::builder()
        .vocab(w.vocab)
        .unk_token(w.unk_token)
        .continuing_subword_prefix(w.continuing_subword_prefix)
        .max_input_chars_per_word(w.max_input_chars_per_word)
        .build()
        .ok()?;
    fn part<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>) -> Option<Option<T>> {
        match raw {
            None => Some(None),
            Some(r) => serde_json::from_str(r.get()).ok(),
        }
    }
    let builder = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(ModelWrapper::WordPiece(model))
    .with_normalizer(part(s.normalizer)?)
    .with_pre_tokenizer(part(s.pre_tokenizer)?)
    .with_post_processor(part(s.post_processor)?)
    .with_decoder(part(s.decoder)?)
    .with_truncation(part(s.truncation)?)
    .with_padding(part(s.padding)?);
    let mut tokenizer: Tokenizer = builder.build().ok()?.into();
    // Each entry's saved `id` is not read: the crate only logs a warning
    // when it differs from the id the tokens get here, in the same order.
    let added: Vec<AddedToken> = part(s.added_tokens)?.unwrap_or_default();
    tokenizer.add_tokens(added).ok()?;
    Some(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixtures() -> Vec<PathBuf> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path().join("tokenizer.json"))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    }

    const TEXTS: &[&str] = &[
        "the cat sat on the mat",
        "Héllo, WORLD!! unaffable [MASK] [SEP]  tabs\tand\nnewlines",
        "数学 is 😀 ünïcödé; don't stop-believing... 12345.678",
        "",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ];

    /// Same tokenizer as the crate's reader: same serialised form (vocabulary,
    /// normaliser, pre-tokeniser, post-processor, decoder, added tokens,
    /// truncation, padding) and the same encodings, for every fixture.
    #[test]
    fn every_fixture_loads_as_the_crate_loads_it() {
        let mut fast = 0;
        for f in &fixtures() {
            let text = std::fs::read_to_string(f).unwrap();
            let ours = load(f).unwrap();
            let theirs = Tokenizer::from_file(f).unwrap();
            assert_eq!(
                serde_json::to_string(&ours).unwrap(),
                serde_json::to_string(&theirs).unwrap(),
                "{}",
                f.display()
            );
            let is_wordpiece = serde_json::from_str::<serde_json::Value>(&text).unwrap()["model"]
                ["type"]
                == "WordPiece";
            assert_eq!(wordpiece(&text).is_some(), is_wordpiece, "{}", f.display());
            fast += usize::from(is_wordpiece);
            for t in TEXTS {
                for special in [true, false] {
                    let (a, b) = (
                        ours.encode(*t, special).unwrap(),
                        theirs.encode(*t, special).unwrap(),
                    );
                    assert_eq!(
                        (a.get_ids(), a.get_offsets(), a.get_type_ids()),
                        (b.get_ids(), b.get_offsets(), b.get_type_ids()),
                        "{}: {t:?}",
                        f.display()
                    );
                }
            }
        }
        assert!(fast >= 2, "the fixtures hold {fast} WordPiece tokenizers");
    }

    #[test]
    fn a_wordpiece_file_the_fast_path_cannot_read_gets_the_crate_s_error() {
        let d = mora_common::scratch::Scratch::new("tok");
        // WordPiece without its vocabulary: the crate names the missing field.
        let p = d.join("tokenizer.json");
        std::fs::write(
            &p,
            r#"{"version": "1.0", "model": {"type": "WordPiece", "unk_token": "[UNK]"}}"#,
        )
        .unwrap();
        let e = load(&p).unwrap_err();
        assert!(
            e.starts_with(&format!("cannot load {}: ", p.display())) && e.contains("missing field"),
            "{e}"
        );
        std::fs::write(&p, "{").unwrap();
        assert!(load(&p).unwrap_err().contains("EOF"));
        assert!(load(&d.join("absent.json"))
            .unwrap_err()
            .contains("No such file"));
    }
}
