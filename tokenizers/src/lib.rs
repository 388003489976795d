//! Loads a `tokenizer.json` as the `tokenizers` crate does, faster for
//! WordPiece (the BERT family's model), BPE (the byte-level BPE of every
//! decoder family) and Unigram (the multilingual encoders' SentencePiece).
//!
//! `Tokenizer::from_file` reads the model section through a
//! `serde_json::Value` (the crate tells the model kinds apart by a flattened
//! `type`), so a vocabulary is parsed into a tree of values and converted
//! again, and its models then build maps of owned strings both ways (and a
//! Unigram, a byte trie with a hash map in every node): about 25 ms of a warm
//! embedding run for MiniLM's 30 522 tokens, 0.4 s for a 128 000-token BPE
//! with its merges, 0.9 s for a 250 000-piece Unigram. Here the file is split
//! into its sections without parsing them (`RawValue`), the model section
//! into its fields in the same pass, and a WordPiece, BPE or Unigram model
//! is read into Mora's own model of that kind (`wordpiece.rs`, `bpe.rs`,
//! `unigram.rs`, over `vocab.rs`), each of which
//! tokenizes as the crate's does, step for step; their tests compare them
//! with the crate's models on random vocabularies and texts. Everything
//! else (normaliser, pre-tokeniser, post-processor, decoder, added tokens,
//! truncation, padding) is the crate's, assembled with its builders in the
//! order and with the checks of its own deserializers
//! (`tokenizer/serialization.rs`, `models/*/serialization.rs`). A model Mora's
//! leaves to the crate (a BPE with dropout, a vocabulary with a token or an
//! id listed twice) is built by the crate's builder; any other model
//! (WordLevel), or a file the fast path does not read, goes through the
//! crate's reader itself, so errors and results are the crate's.
//!
//! Also here: [`vocab`], the vocabulary as one block of words that the
//! daemon prepares once and lends, so a client reads it in place; and
//! [`clip`], CLIP's BPE tokenizer as Stable Diffusion pipelines ship it.
//! The crate knows nothing of workflows or of the daemon: a prepared
//! vocabulary is a block of words, wherever it was mapped from.

mod bpe;
pub mod clip;
mod unigram;
pub mod vocab;
mod wordpiece;

use crate::vocab::{Prepared, Vocabulary};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Token, TokenizerBuilder, TokenizerImpl,
};

/// The crate's tokenizer around a `Model`: it encodes and decodes with the
/// crate's methods.
pub type Tokenizer =
    TokenizerImpl<Model, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>;

/// A tokenizer's model: Mora's BPE, Unigram or WordPiece, or one of the
/// crate's where Mora's leaves it to the crate.
#[derive(Clone, Debug)]
pub enum Model {
    Crate(ModelWrapper),
    Bpe(bpe::Bpe),
    Unigram(unigram::Unigram),
    WordPiece(wordpiece::WordPiece),
}

/// `$call` on whichever model `$model` holds, named `$m`.
macro_rules! each {
    ($model:expr, $m:ident => $call:expr) => {
        match $model {
            Model::Crate($m) => $call,
            Model::Bpe($m) => $call,
            Model::Unigram($m) => $call,
            Model::WordPiece($m) => $call,
        }
    };
}

impl tokenizers::Model for Model {
    type Trainer = tokenizers::models::TrainerWrapper;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        each!(self, m => m.tokenize(sequence))
    }
    fn token_to_id(&self, token: &str) -> Option<u32> {
        each!(self, m => m.token_to_id(token))
    }
    fn id_to_token(&self, id: u32) -> Option<String> {
        each!(self, m => m.id_to_token(id))
    }
    fn get_vocab(&self) -> HashMap<String, u32> {
        each!(self, m => m.get_vocab())
    }
    fn get_vocab_size(&self) -> usize {
        each!(self, m => m.get_vocab_size())
    }
    fn save(&self, folder: &Path, prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        each!(self, m => m.save(folder, prefix))
    }
    fn get_trainer(&self) -> Self::Trainer {
        each!(self, m => m.get_trainer())
    }
}

/// Serialised as the crate serialises the model.
impl Serialize for Model {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        each!(self, m => m.serialize(serializer))
    }
}

/// Read by the crate's own deserializer, for the files the fast path
/// leaves to it.
impl<'de> Deserialize<'de> for Model {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ModelWrapper::deserialize(deserializer).map(Model::Crate)
    }
}

/// [`load`], or with `lent`, the tokenizer the daemon prepared from this
/// file (`vocab`), its vocabulary read in place and only the
/// rest of the file parsed, from the prepared skeleton: the same tokenizer,
/// without parsing and hashing the vocabulary again. A prepared tokenizer of
/// another file, or of this one before it changed, is not used. True when
/// the lent one was.
pub fn load_lent(path: &Path, lent: Option<&Prepared>) -> Result<(Tokenizer, bool), LoadError> {
    if let Some(p) = lent.filter(|p| p.is_of(path)) {
        if let Some(t) = fast(p.skeleton(), Some(p)) {
            return Ok((t, true));
        }
    }
    load(path).map(|t| (t, false))
}

/// Why a `tokenizer.json` cannot be loaded; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// The `tokenizers` crate's reader refused the file.
    #[error("cannot load {}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// Reads `path` into a tokenizer; the error names the file.
pub fn load(path: &Path) -> Result<Tokenizer, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: path.to_path_buf(), source })?;
    match fast(&text, None) {
        Some(t) => Ok(t),
        None => Tokenizer::from_bytes(text.as_bytes())
            .map_err(|e| LoadError::Invalid { path: path.to_path_buf(), message: e.to_string() }),
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
    model: ModelFields<'a>,
    #[serde(borrow)]
    decoder: Option<&'a RawValue>,
    #[serde(borrow)]
    post_processor: Option<&'a RawValue>,
}

/// The model section, read in the same pass as the rest of the file: its
/// `type` and every field a WordPiece, BPE or Unigram reads, each kept
/// unparsed (`null` included) until the kind says how to read it. The
/// vocabulary is then parsed once; reading the `type` first and the fields
/// after would scan it three times.
#[derive(Deserialize)]
struct ModelFields<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "present")]
    vocab: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    merges: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    unk_token: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    continuing_subword_prefix: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    max_input_chars_per_word: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    end_of_word_suffix: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    dropout: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    fuse_unk: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    byte_fallback: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    ignore_merges: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    unk_id: Option<&'a RawValue>,
}

/// A field that is there, unparsed, `null` included (`Option<&RawValue>`
/// alone reads `null` as absent).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// A field the model requires (`null` only where `T` accepts it).
fn required<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>) -> Option<T> {
    serde_json::from_str(raw?.get()).ok()
}

/// An optional field: absent or `null` is `Some(None)`; `None` when it does
/// not parse.
fn optional<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>) -> Option<Option<T>> {
    match raw {
        None => Some(None),
        Some(r) => serde_json::from_str(r.get()).ok(),
    }
}

/// A WordPiece model: Mora's, or the crate's where Mora's leaves the
/// vocabulary to it. The four fields the crate requires. With `lent`, the
/// model's vocabulary (the file's is then `{}`).
fn wordpiece_model(m: &ModelFields, lent: Option<&Vocabulary>) -> Option<Model> {
    let unk: String = required(m.unk_token)?;
    let prefix: String = required(m.continuing_subword_prefix)?;
    let max: usize = required(m.max_input_chars_per_word)?;
    let vocab = match lent {
        Some(v) => Some(v.clone()),
        None => Vocabulary::new(required(m.vocab)?),
    };
    if let Some(vocab) = vocab {
        return Some(Model::WordPiece(wordpiece::WordPiece::new(vocab, unk, prefix, max)));
    }
    let vocab: ahash::AHashMap<String, u32> = required(m.vocab)?;
    let model = WordPiece::builder()
        .vocab(vocab)
        .unk_token(unk)
        .continuing_subword_prefix(prefix)
        .max_input_chars_per_word(max)
        .build()
        .ok()?;
    Some(Model::Crate(ModelWrapper::WordPiece(model)))
}

/// A BPE model's fields: every one the crate reads
/// (`models/bpe/serialization.rs`); a null or absent one leaves the
/// builder's default.
struct BpeFields {
    dropout: Option<f32>,
    unk_token: Option<String>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: Option<bool>,
    byte_fallback: Option<bool>,
    ignore_merges: Option<bool>,
}

/// A BPE model: Mora's, or the crate's where merges have a dropout (they
/// are then random) or Mora's leaves the vocabulary to the crate. With
/// `lent`, the model's vocabulary (the file's is then `{}`) and its merges
/// when they were prepared (the file's are then `[]`), and never the
/// crate's model, which would read the file's.
fn bpe_model(m: &ModelFields, lent: Option<&Prepared>) -> Option<Model> {
    let b = BpeFields {
        dropout: optional(m.dropout)?,
        unk_token: optional(m.unk_token)?,
        continuing_subword_prefix: optional(m.continuing_subword_prefix)?,
        end_of_word_suffix: optional(m.end_of_word_suffix)?,
        fuse_unk: optional(m.fuse_unk)?,
        byte_fallback: optional(m.byte_fallback)?,
        ignore_merges: optional(m.ignore_merges)?,
    };
    let merges = vocab::merge_list(m.merges?.get())?;
    if b.dropout.is_none() {
        let options = bpe::Options {
            unk_token: b.unk_token.clone(),
            continuing_subword_prefix: b.continuing_subword_prefix.clone(),
            end_of_word_suffix: b.end_of_word_suffix.clone(),
            fuse_unk: b.fuse_unk.unwrap_or(false),
            byte_fallback: b.byte_fallback.unwrap_or(false),
            ignore_merges: b.ignore_merges.unwrap_or(false),
        };
        let prefix_len = b.continuing_subword_prefix.as_ref().map_or(0, String::len);
        let vocab = match lent {
            Some(p) => Some(p.vocabulary().clone()),
            None => Vocabulary::new(required(m.vocab)?),
        };
        let model = vocab.and_then(|v| {
            let merges = match lent.and_then(Prepared::merges) {
                Some(lent) => lent.clone(),
                None => vocab::Merges::new(&v, &merges, prefix_len)?,
            };
            Some(bpe::Bpe::new(v, merges, options))
        });
        if let Some(model) = model {
            return Some(Model::Bpe(model));
        }
    }
    if lent.is_some() {
        return None;
    }
    let vocab: ahash::AHashMap<String, u32> = required(m.vocab)?;
    let merges = merges.into_iter().map(|(a, b)| (a.0.into_owned(), b.0.into_owned())).collect();
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges);
    if let Some(p) = b.dropout {
        builder = builder.dropout(p);
    }
    if let Some(t) = b.unk_token {
        builder = builder.unk_token(t);
    }
    if let Some(p) = b.continuing_subword_prefix {
        builder = builder.continuing_subword_prefix(p);
    }
    if let Some(s) = b.end_of_word_suffix {
        builder = builder.end_of_word_suffix(s);
    }
    if let Some(f) = b.fuse_unk {
        builder = builder.fuse_unk(f);
    }
    if let Some(f) = b.byte_fallback {
        builder = builder.byte_fallback(f);
    }
    if let Some(f) = b.ignore_merges {
        builder = builder.ignore_merges(f);
    }
    Some(Model::Crate(ModelWrapper::BPE(builder.build().ok()?)))
}

/// Mora's Unigram model, where the crate's `Unigram::from` would succeed:
/// the fields the crate reads (`models/unigram/serialization.rs`);
/// `byte_fallback` may be absent, not null, as there.
/// With `lent`, the pieces and scores (the file's `vocab` is then `[]`).
fn unigram_model(m: &ModelFields, lent: Option<&Prepared>) -> Option<Model> {
    let unk_id: Option<usize> = optional(m.unk_id)?;
    let byte_fallback: bool = match m.byte_fallback {
        None => false,
        raw => required(raw)?,
    };
    let (pieces, scores) = match lent {
        Some(p) => (p.vocabulary().clone(), p.scores()?.clone()),
        None => {
            let list: Vec<(vocab::Text, f64)> = required(m.vocab)?;
            Vocabulary::pieces(&list)?
        }
    };
    Some(Model::Unigram(unigram::Unigram::new(pieces, scores, unk_id, byte_fallback)?))
}

/// The tokenizer, when its model is WordPiece, BPE or Unigram and every
/// section parses; `None` sends the file to the crate's own reader. With
/// `lent`, `text` is its skeleton.
fn fast(text: &str, lent: Option<&Prepared>) -> Option<Tokenizer> {
    let s: Sections = serde_json::from_str(text).ok()?;
    if s.version.is_some_and(|v| v != "1.0") {
        return None;
    }
    // Only an explicit `type`: the crate reads a model without one by
    // trying each kind in turn, which is left to it.
    let model = match s.model.kind {
        Some("WordPiece") => wordpiece_model(&s.model, lent.map(Prepared::vocabulary))?,
        Some("BPE") => bpe_model(&s.model, lent)?,
        Some("Unigram") => unigram_model(&s.model, lent)?,
        _ => return None,
    };
    let builder = TokenizerBuilder::<
        Model,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(model)
    .with_normalizer(optional(s.normalizer)?)
    .with_pre_tokenizer(optional(s.pre_tokenizer)?)
    .with_post_processor(optional(s.post_processor)?)
    .with_decoder(optional(s.decoder)?)
    .with_truncation(optional(s.truncation)?)
    .with_padding(optional(s.padding)?);
    let mut tokenizer: Tokenizer = builder.build().ok()?;
    // Each entry's saved `id` is not read: the crate only logs a warning
    // when it differs from the id the tokens get here, in the same order.
    let added: Vec<AddedToken> = optional(s.added_tokens)?.unwrap_or_default();
    tokenizer.add_tokens(added).ok()?;
    Some(tokenizer)
}

/// Asserts that Mora's model and the crate's give the same tokens (ids,
/// texts, offsets) for `text`, or the same error: the check every model's
/// tests make.
#[cfg(test)]
fn same_tokens(ours: &impl tokenizers::Model, theirs: &impl tokenizers::Model, text: &str) {
    match (ours.tokenize(text), theirs.tokenize(text)) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "{text:?}"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{text:?}"),
        (a, b) => panic!("{text:?}: ours {a:?}, the crate's {b:?}"),
    }
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
    /// Asserts that `ours` is the tokenizer the crate reads from `f`.
    fn same_as_the_crate(ours: &Tokenizer, f: &Path) {
        let theirs = tokenizers::Tokenizer::from_file(f).unwrap();
        assert_eq!(
            serde_json::to_string(ours).unwrap(),
            serde_json::to_string(&theirs).unwrap(),
            "{}",
            f.display()
        );
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

    fn model_type(text: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        v["model"]["type"].as_str().unwrap_or_default().to_string()
    }

    #[test]
    fn every_fixture_loads_as_the_crate_loads_it() {
        let mut read_here = std::collections::BTreeMap::new();
        for f in &fixtures() {
            let text = std::fs::read_to_string(f).unwrap();
            same_as_the_crate(&load(f).unwrap(), f);
            let kind = model_type(&text);
            let expected = ["WordPiece", "BPE", "Unigram"].contains(&kind.as_str());
            assert_eq!(fast(&text, None).is_some(), expected, "{}", f.display());
            // And the model is Mora's, not the crate's.
            if let Some(t) = fast(&text, None) {
                assert!(matches!(t.get_model(), Model::WordPiece(_) | Model::Bpe(_) | Model::Unigram(_)), "{}", f.display());
            }
            *read_here.entry(kind).or_insert(0) += usize::from(expected);
        }
        assert!(read_here["WordPiece"] >= 2 && read_here["BPE"] >= 10 && read_here["Unigram"] >= 2, "{read_here:?}");
    }

    /// The tokenizer the daemon prepares from `f` (`Prepared::build`), as
    /// a client reads it from the sealed segment.
    fn prepared(f: &Path) -> Option<Prepared> {
        let words = Prepared::build(f).unwrap()?;
        let mut segment = mora_common::segment::SegmentWriter::create("mora-tokenizer", Prepared::bytes(&words).len() as u64).unwrap();
        segment.as_mut_slice().copy_from_slice(Prepared::bytes(&words));
        Prepared::read(std::sync::Arc::new(crate::vocab::WordBytes(segment.seal().unwrap().map().unwrap())))
    }

    #[test]
    fn a_tokenizer_the_daemon_prepared_loads_as_the_file_does() {
        // Every fixture (WordPiece, BPE, Unigram: the kinds the daemon
        // prepares): the lent blocks and skeleton give the crate's
        // tokenizer, with Mora's model, and nothing of the file is read.
        let mut n = 0;
        for f in &fixtures() {
            let kind = model_type(&std::fs::read_to_string(f).unwrap());
            let p = prepared(f).unwrap_or_else(|| panic!("{} not prepared", f.display()));
            assert!(p.is_of(f));
            // A BPE's merges came prepared too, cut out of the skeleton.
            assert_eq!(p.merges().is_some(), kind == "BPE", "{}", f.display());
            let ours = fast(p.skeleton(), Some(&p)).unwrap_or_else(|| panic!("{}", f.display()));
            assert!(matches!(ours.get_model(), Model::WordPiece(_) | Model::Bpe(_) | Model::Unigram(_)), "{}", f.display());
            same_as_the_crate(&ours, f);
            let (t, lent) = load_lent(f, Some(&p)).unwrap();
            assert!(lent, "{}", f.display());
            same_as_the_crate(&t, f);
            n += 1;
        }
        assert!(n >= 30, "{n} fixtures prepared");
    }

    #[test]
    fn a_prepared_tokenizer_of_another_or_a_changed_file_is_not_used() {
        let d = mora_test_support::Scratch::new("tok-prepared");
        let bert = fixtures().into_iter().find(|f| f.to_string_lossy().contains("bert-tf5")).unwrap();
        let gpt2 = fixtures().into_iter().find(|f| f.to_string_lossy().contains("gpt2-tf5")).unwrap();
        let p = d.join("tokenizer.json");
        std::fs::copy(&bert, &p).unwrap();
        let lent = prepared(&p).unwrap();
        assert!(load_lent(&p, Some(&lent)).unwrap().1);
        // Another file: its own tokenizer, not the lent one.
        let (t, used) = load_lent(&gpt2, Some(&lent)).unwrap();
        assert!(!used);
        same_as_the_crate(&t, &gpt2);
        // The same file, changed after the daemon prepared it.
        std::fs::copy(&gpt2, &p).unwrap();
        let (t, used) = load_lent(&p, Some(&lent)).unwrap();
        assert!(!used);
        same_as_the_crate(&t, &p);
    }

    #[test]
    fn a_prepared_bpe_whose_merges_mora_leaves_to_the_crate_is_read_from_the_file() {
        // Dropout makes merges random, so the crate's own model reads them;
        // it needs the file's vocabulary, which the skeleton lacks.
        let d = mora_test_support::Scratch::new("tok-dropout");
        let p = d.join("tokenizer.json");
        std::fs::write(&p, r#"{"version": "1.0", "model": {"type": "BPE", "dropout": 0.5, "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}}"#)
            .unwrap();
        let lent = prepared(&p).unwrap();
        assert!(fast(lent.skeleton(), Some(&lent)).is_none());
        let (t, used) = load_lent(&p, Some(&lent)).unwrap();
        assert!(!used);
        assert!(matches!(t.get_model(), Model::Crate(_)));
        assert_eq!(t.get_vocab_size(false), 3);
    }

    #[test]
    fn legacy_bpe_merges_load_as_the_crate_loads_them() {
        // The same BPE tokenizers with their merges as "a b" strings, the
        // form tokenizers wrote before 0.20, and a `#version` line.
        let d = mora_test_support::Scratch::new("tok-legacy");
        let mut n = 0;
        for f in &fixtures() {
            let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
            if v["model"]["type"] != "BPE" {
                continue;
            }
            let pairs = v["model"]["merges"].as_array().unwrap().clone();
            let mut lines = vec![serde_json::Value::from("#version: 0.2")];
            lines.extend(pairs.iter().map(|p| serde_json::Value::from(format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()))));
            v["model"]["merges"] = lines.into();
            let p = d.join(format!("legacy-{n}.json"));
            std::fs::write(&p, v.to_string()).unwrap();
            assert!(fast(&v.to_string(), None).is_some(), "{}", f.display());
            same_as_the_crate(&load(&p).unwrap(), &p);
            // And as the daemon prepares them: merges lent, cut from the skeleton.
            let lent = prepared(&p).unwrap();
            assert!(lent.merges().is_some(), "{}", f.display());
            let (t, used) = load_lent(&p, Some(&lent)).unwrap();
            assert!(used);
            same_as_the_crate(&t, &p);
            n += 1;
        }
        assert!(n >= 10, "{n} BPE fixtures");
    }

    #[test]
    fn a_model_section_with_its_type_last_or_nulls_the_crate_allows_loads_as_the_crate_loads_it() {
        // The model section is read in one pass, before its kind is known:
        // its `type` may come after the vocabulary, and BPE's optional
        // fields may be null.
        let d = mora_test_support::Scratch::new("tok-order");
        let mut kinds = std::collections::BTreeSet::new();
        for (n, f) in fixtures().iter().enumerate() {
            let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
            let model = v["model"].as_object_mut().unwrap();
            let kind = model.remove("type").unwrap();
            if kind == "BPE" {
                for key in ["unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", "byte_fallback", "ignore_merges"] {
                    model.entry(key).or_insert(serde_json::Value::Null);
                }
            }
            let fields = serde_json::to_string(model).unwrap();
            v["model"] = serde_json::Value::Null;
            let text = v.to_string().replace(r#""model":null"#, &format!(r#""model":{},"type":{kind}}}"#, &fields[..fields.len() - 1]));
            let p = d.join(format!("{n}.json"));
            std::fs::write(&p, &text).unwrap();
            let ours = fast(&text, None).unwrap_or_else(|| panic!("{}", f.display()));
            assert!(matches!(ours.get_model(), Model::WordPiece(_) | Model::Bpe(_) | Model::Unigram(_)), "{}", f.display());
            same_as_the_crate(&ours, &p);
            kinds.insert(kind.as_str().unwrap().to_string());
        }
        assert_eq!(kinds.into_iter().collect::<Vec<_>>(), ["BPE", "Unigram", "WordPiece"]);
    }

    #[test]
    fn a_bpe_or_unigram_file_the_fast_path_cannot_read_gets_the_crate_s_error() {
        let d = mora_test_support::Scratch::new("tok-bpe");
        let p = d.join("tokenizer.json");
        let write = |model: &str| std::fs::write(&p, format!(r#"{{"version": "1.0", "model": {model}}}"#)).unwrap();
        let crate_error = |p: &Path| format!("cannot load {}: {}", p.display(), tokenizers::Tokenizer::from_file(p).unwrap_err());
        for model in [
            // A merge of three parts, a merge of a token not in the vocabulary,
            // a dropout out of range, no merges.
            r#"{"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b c"]}"#,
            r#"{"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "c"]]}"#,
            r#"{"type": "BPE", "dropout": 2.0, "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}"#,
            r#"{"type": "BPE", "vocab": {"a": 0}}"#,
            // Unigram: an unknown id past the vocabulary, an empty
            // vocabulary with an unknown id, a null byte_fallback.
            r#"{"type": "Unigram", "unk_id": 5, "vocab": [["<unk>", 0.0], ["a", -1.0]]}"#,
            r#"{"type": "Unigram", "unk_id": 0, "vocab": []}"#,
            r#"{"type": "Unigram", "unk_id": 0, "byte_fallback": null, "vocab": [["<unk>", 0.0]]}"#,
        ] {
            write(model);
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(fast(&text, None).is_none(), "{model}");
            assert_eq!(load(&p).unwrap_err().to_string(), crate_error(&p), "{model}");
        }
    }

    #[test]
    fn a_wordpiece_file_the_fast_path_cannot_read_gets_the_crate_s_error() {
        let d = mora_test_support::Scratch::new("tok");
        // WordPiece without its vocabulary: the crate names the missing field.
        let p = d.join("tokenizer.json");
        std::fs::write(
            &p,
            r#"{"version": "1.0", "model": {"type": "WordPiece", "unk_token": "[UNK]"}}"#,
        )
        .unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot load {}: ", p.display())) && e.contains("missing field"),
            "{e}"
        );
        std::fs::write(&p, "{").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("EOF"));
        assert!(matches!(load(&d.join("absent.json")), Err(LoadError::Read { .. })));
        assert!(load(&d.join("absent.json")).unwrap_err().to_string().contains("No such file"));
    }
}
