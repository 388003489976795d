//! A Unigram model (SentencePiece's, as the multilingual encoders'
//! `tokenizer.json` holds it) that tokenizes exactly as the `tokenizers`
//! crate's `Unigram` does, without building the crate's byte trie.
//!
//! The crate's `Unigram::from` pushes every piece into a trie with a hash
//! map in every node: for XLM-RoBERTa's 250 002 pieces, about 0.8 s of a
//! warm run's start, spent again by every fresh process. Here the pieces are
//! a `Vocabulary` (`vocab`: the pieces' text once, an index of
//! piece to id as the crate keeps beside its trie, ids to pieces) with their
//! `Scores` beside it, both read from the file or lent by the daemon, and
//! the prefixes of the text that are pieces are found by looking up each
//! prefix up to the longest piece's length. A piece is valid UTF-8, so only
//! prefixes ending on a character boundary can be pieces, which are the
//! ones looked up. The search, the best path and what follows it (unknown
//! characters fused, byte fallback) are the crate's own `encode_optimized`
//! and `tokenize` (`models/unigram/model.rs`, tokenizers 0.23), step for
//! step, ties included: the tests compare both on random vocabularies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::vocab::{Scores, Vocabulary};
use serde::ser::{SerializeSeq, SerializeStruct};
use serde::{Serialize, Serializer};
use tokenizers::{Result, Token};

/// The crate's penalty below the lowest score for an unknown character.
const UNK_PENALTY: f64 = 10.0;

/// The crate's error when an unknown character meets a model without
/// `unk_id`, with its message.
#[derive(Debug, thiserror::Error)]
#[error("Encountered an unknown token but `unk_id` is missing")]
struct MissingUnkId;

#[derive(Clone, Debug)]
pub struct Unigram {
    /// Each piece by id, and the id of each piece (a piece listed twice
    /// has its last id, as in the crate's map).
    pieces: Vocabulary,
    /// Each piece's score, by id.
    scores: Scores,
    unk_id: Option<usize>,
    byte_fallback: bool,
    min_score: f64,
    /// The longest piece, in bytes: no longer prefix can be a piece.
    longest: usize,
}

impl Unigram {
    /// The model of `pieces` and their `scores` (`Vocabulary::pieces`, from
    /// the file or lent by the daemon), or `None` where the crate's
    /// `Unigram::from` fails (an empty vocabulary or an `unk_id` past it),
    /// so that the crate's reader gives its own error, or where the two do
    /// not match.
    pub fn new(pieces: Vocabulary, scores: Scores, unk_id: Option<usize>, byte_fallback: bool) -> Option<Unigram> {
        if unk_id.is_some_and(|u| u >= scores.len()) || pieces.len() != scores.len() {
            return None;
        }
        let mut min_score = f64::INFINITY;
        for id in 0..scores.len() {
            let score = scores.get(id)?;
            if score < min_score {
                min_score = score;
            }
        }
        let longest = pieces.longest();
        Some(Unigram { pieces, scores, unk_id, byte_fallback, min_score, longest })
    }

    /// The id of `piece`, as the crate's map gives it.
    fn id(&self, piece: &str) -> Option<u32> {
        self.pieces.id(piece)
    }

    fn score(&self, id: u32) -> f64 {
        self.scores.get(id as usize).unwrap_or(f64::NEG_INFINITY)
    }

    /// The best segmentation of `sentence` as byte ranges, consecutive
    /// unknown characters fused into one: the crate's `encode_optimized`.
    fn encode(&self, sentence: &str) -> Result<Vec<(usize, usize)>> {
        #[derive(Clone, Copy)]
        struct Best {
            id: usize,
            score: f64,
            starts_at: Option<usize>,
        }
        if sentence.is_empty() {
            return Ok(vec![]);
        }
        let size = sentence.len();
        let unk_score = self.min_score - UNK_PENALTY;
        let mut best = vec![Best { id: 0, score: 0.0, starts_at: None }; size + 1];
        let mut starts_at = 0;
        while starts_at < size {
            let rest = &sentence[starts_at..];
            let ends = rest.char_indices().map(|(i, c)| i + c.len_utf8());
            let mblen = rest.chars().next().map_or(1, char::len_utf8);
            let mut has_single_node = false;
            // Every prefix that is a piece, shortest first, as the trie
            // yields them.
            for end in ends.take_while(|&end| end <= self.longest) {
                if let Some(id) = self.id(&rest[..end]) {
                    let candidate = self.score(id) + best[starts_at].score;
                    let node = &mut best[starts_at + end];
                    if node.starts_at.is_none() || candidate > node.score {
                        *node = Best { id: id as usize, score: candidate, starts_at: Some(starts_at) };
                    }
                    has_single_node |= end == mblen;
                }
            }
            // The unknown id is needed, and its absence an error, only where
            // the unknown character would be on a better path than any
            // other (a piece over it may already end there).
            if !has_single_node {
                let candidate = unk_score + best[starts_at].score;
                let node = &mut best[starts_at + mblen];
                if node.starts_at.is_none() || candidate > node.score {
                    let unk = self.unk_id.ok_or(MissingUnkId)?;
                    *node = Best { id: unk, score: candidate, starts_at: Some(starts_at) };
                }
            }
            starts_at += mblen;
        }
        let mut pieces = Vec::new();
        let mut unknown: Option<(usize, usize)> = None;
        let mut ends_at = size;
        while ends_at > 0 {
            let node = best[ends_at];
            let starts_at = node.starts_at.expect("every character ends a path");
            if Some(node.id) == self.unk_id {
                unknown = Some((starts_at, unknown.map_or(ends_at, |(_, end)| end)));
            } else {
                pieces.extend(unknown.take());
                pieces.push((starts_at, ends_at));
            }
            ends_at = starts_at;
        }
        pieces.extend(unknown);
        pieces.reverse();
        Ok(pieces)
    }
}

impl tokenizers::Model for Unigram {
    type Trainer = tokenizers::models::TrainerWrapper;

    /// The crate's `Unigram::tokenize`: each piece's id looked up by its
    /// text; a fused run of unknown characters becomes its bytes'
    /// `<0xXX>` tokens where the model falls back to bytes and has them
    /// all, else the unknown id.
    fn tokenize(&self, sentence: &str) -> Result<Vec<Token>> {
        let pieces = self.encode(sentence)?;
        let mut tokens = Vec::with_capacity(pieces.len());
        for (start, end) in pieces {
            let text = &sentence[start..end];
            let id = match self.id(text) {
                Some(id) => id,
                None => {
                    if self.byte_fallback {
                        let bytes: Option<Vec<Token>> = text
                            .bytes()
                            .map(|b| {
                                let name = format!("<0x{b:02X}>");
                                self.id(&name).map(|id| Token::new(id, name, (start, end)))
                            })
                            .collect();
                        if let Some(bytes) = bytes {
                            tokens.extend(bytes);
                            continue;
                        }
                    }
                    self.unk_id.ok_or(MissingUnkId)? as u32
                }
            };
            tokens.push(Token::new(id, text.to_string(), (start, end)));
        }
        Ok(tokens)
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.pieces.token(id).map(str::to_string)
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        self.pieces.to_map()
    }

    fn get_vocab_size(&self) -> usize {
        self.scores.len()
    }

    /// Writes `[name-]unigram.json` as the crate's model does.
    fn save(&self, folder: &Path, name: Option<&str>) -> Result<Vec<PathBuf>> {
        let path = folder.join(match name {
            Some(name) => format!("{name}-unigram.json"),
            None => "unigram.json".to_string(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(self)?)?;
        Ok(vec![path])
    }

    fn get_trainer(&self) -> Self::Trainer {
        tokenizers::models::TrainerWrapper::UnigramTrainer(Default::default())
    }
}

/// The crate's serialised form of a Unigram model, field for field.
impl Serialize for Unigram {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut model = serializer.serialize_struct("Unigram", 4)?;
        model.serialize_field("type", "Unigram")?;
        model.serialize_field("unk_id", &self.unk_id)?;
        model.serialize_field("vocab", &InOrder(self))?;
        model.serialize_field("byte_fallback", &self.byte_fallback)?;
        model.end()
    }
}

/// The pieces and scores in id order, as the crate writes them.
struct InOrder<'a>(&'a Unigram);

impl Serialize for InOrder<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let u = self.0;
        let mut seq = serializer.serialize_seq(Some(u.scores.len()))?;
        for id in 0..u.scores.len() as u32 {
            seq.serialize_element(&(u.pieces.token(id).unwrap_or_default(), u.score(id)))?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::same_tokens as same;
    use crate::vocab::Text;
    use proptest::prelude::*;
    use std::borrow::Cow;
    use tokenizers::Model;

    /// Mora's model of `vocab`, as read from a file.
    fn of(vocab: &[(String, f64)], unk_id: Option<usize>, byte_fallback: bool) -> Option<Unigram> {
        let list: Vec<(Text, f64)> = vocab.iter().map(|(p, s)| (Text(Cow::Borrowed(p.as_str())), *s)).collect();
        let (pieces, scores) = Vocabulary::pieces(&list)?;
        Unigram::new(pieces, scores, unk_id, byte_fallback)
    }

    fn both(vocab: &[(String, f64)], unk_id: Option<usize>, byte_fallback: bool) -> (Unigram, tokenizers::models::unigram::Unigram) {
        (
            of(vocab, unk_id, byte_fallback).unwrap(),
            tokenizers::models::unigram::Unigram::from(vocab.to_vec(), unk_id, byte_fallback).unwrap(),
        )
    }

    fn pieces(list: &[(&str, f64)]) -> Vec<(String, f64)> {
        list.iter().map(|(p, s)| (p.to_string(), *s)).collect()
    }

    #[test]
    fn the_crate_s_own_examples_and_edge_cases() {
        let vocab = pieces(&[
            ("<unk>", 0.0), ("a", 0.0), ("b", 0.0), ("c", 0.0), ("d", 0.0),
            ("cd", 1.0), ("ab", 2.0), ("abc", 5.0), ("abcd", 10.0),
        ]);
        let (ours, theirs) = both(&vocab, Some(0), false);
        let words: Vec<String> = ours.tokenize("abcdacdxx").unwrap().into_iter().map(|t| t.value).collect();
        assert_eq!(words, ["abcd", "a", "cd", "xx"]);
        for text in ["", "x", "xx ab", "<unk>a<unk>", "äöü", "😀a😀", "dcba"] {
            same(&ours, &theirs, text);
        }
        // No unknown id: an unknown character is the crate's error, but only
        // where no piece covers it on a better path ("▁😀" over "😀").
        let (ours, theirs) = both(&pieces(&[("a", -1.0)]), None, false);
        same(&ours, &theirs, "ab");
        assert!(ours.tokenize("ab").unwrap_err().to_string().contains("`unk_id` is missing"));
        let (ours, theirs) = both(&pieces(&[("▁", -4.0), ("▁😀", -4.0)]), None, false);
        same(&ours, &theirs, "▁▁😀");
        assert_eq!(ours.tokenize("▁▁😀").unwrap().len(), 2);
        // Byte fallback: every byte of an unknown run, or the unknown id
        // where one byte has no token.
        let mut vocab = pieces(&[("<unk>", 0.0), ("a", -1.0), ("<0xC3>", -2.0), ("<0xA9>", -2.0)]);
        let (ours, theirs) = both(&vocab, Some(0), true);
        for text in ["aéa", "éé", "aöa"] {
            same(&ours, &theirs, text);
        }
        assert_eq!(ours.tokenize("é").unwrap().iter().map(|t| t.id).collect::<Vec<_>>(), [2, 3]);
        // A piece listed twice: its last id, as the crate's map has it.
        vocab.push(("a".into(), -0.5));
        let (ours, theirs) = both(&vocab, Some(0), true);
        same(&ours, &theirs, "aa");
        assert_eq!(ours.token_to_id("a"), Some(4));
        // Where the crate refuses the vocabulary, so does this model.
        assert!(of(&[], Some(0), false).is_none());
        assert!(of(&pieces(&[("a", 0.0)]), Some(1), false).is_none());
    }

    #[test]
    fn serialises_as_the_crate_s_model() {
        let vocab = pieces(&[("<unk>", 0.0), ("▁a", -1.5), ("b", -2.25)]);
        let (ours, theirs) = both(&vocab, Some(0), true);
        assert_eq!(serde_json::to_string(&ours).unwrap(), serde_json::to_string(&theirs).unwrap());
        assert_eq!(ours.get_vocab(), theirs.get_vocab());
        assert_eq!((ours.id_to_token(2), ours.get_vocab_size()), (theirs.id_to_token(2), theirs.get_vocab_size()));
        let d = mora_test_support::Scratch::new("unigram-save");
        let saved = ours.save(&d.join(""), Some("m")).unwrap();
        assert_eq!(saved, [d.join("m-unigram.json")]);
        let back = tokenizers::models::unigram::Unigram::load(&saved[0]).unwrap();
        assert_eq!(back, theirs);
    }

    /// Pieces over a small alphabet with one- to four-byte characters, so
    /// that prefixes overlap; scores from a few values, so that paths tie.
    fn vocabulary() -> impl Strategy<Value = (Vec<(String, f64)>, Option<usize>, bool)> {
        let piece = proptest::collection::vec(prop::sample::select(vec!['a', 'b', 'c', 'é', '▁', '数', '😀']), 1..5)
            .prop_map(|c| c.into_iter().collect::<String>());
        let score = prop::sample::select(vec![-4.0, -2.5, -1.0, 0.0, 1.5]);
        let bytes = prop::sample::subsequence(vec!["<0x61>", "<0xC3>", "<0xA9>", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "<0x7A>"], 0..8);
        (proptest::collection::vec((piece, score), 1..40), bytes, any::<bool>(), any::<bool>()).prop_map(
            |(mut vocab, bytes, unk, byte_fallback)| {
                vocab.extend(bytes.into_iter().map(|b| (b.to_string(), -3.0)));
                if unk {
                    vocab.insert(0, ("<unk>".to_string(), 0.0));
                }
                (vocab, unk.then_some(0), byte_fallback)
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        #[test]
        fn tokenizes_as_the_crate_s_unigram(
            (vocab, unk_id, byte_fallback) in vocabulary(),
            texts in proptest::collection::vec("[abcz éö▁数😀]{0,24}", 1..4),
        ) {
            let (ours, theirs) = both(&vocab, unk_id, byte_fallback);
            for text in &texts {
                same(&ours, &theirs, text);
            }
        }
    }
}
