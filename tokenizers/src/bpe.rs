//! A BPE model (the byte-level BPE of every decoder family, and
//! SentencePiece BPE with byte fallback) that tokenizes exactly as the
//! `tokenizers` crate's `BPE` does, built without the crate's copies.
//!
//! The crate's builder keeps the vocabulary as a map of owned strings, builds
//! a second map from id to string, and looks every merge's parts and result
//! up in them: about 110 ms of a 270 ms load for a vocabulary of Llama 3's
//! size, spent again by every fresh process. Here the vocabulary is a
//! `Vocabulary` (`vocab.rs`: the tokens' texts copied once into one string,
//! no map of owned strings either way), and the merge map is the crate's
//! (pair of ids to rank and new id). Tokenizing is the crate's `merge_word`,
//! `Word::merge_all` and `word_to_tokens` (`models/bpe/model.rs`, `word.rs`,
//! tokenizers 0.23), step for step: the same priority of merges (lowest rank, then leftmost),
//! the same check of stale entries, unknown characters fused or not, byte
//! fallback. Merges with dropout are random and stay with the crate's model,
//! as does a vocabulary that `Vocabulary` leaves to the crate.

use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};

use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};
use tokenizers::{Result, Token};

use crate::vocab::{Merges, Vocabulary};

/// The options of a BPE model, as the crate's builder takes them.
#[derive(Default)]
pub struct Options {
    pub unk_token: Option<String>,
    pub continuing_subword_prefix: Option<String>,
    pub end_of_word_suffix: Option<String>,
    pub fuse_unk: bool,
    pub byte_fallback: bool,
    pub ignore_merges: bool,
}

#[derive(Clone, Debug)]
pub struct Bpe {
    vocab: Vocabulary,
    /// A pair of ids to the merge's rank and the id it makes.
    merges: Merges,
    unk_token: Option<String>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
}

impl Bpe {
    /// The model of `vocab` and `merges` (read from the file with
    /// `Merges::new`, which fails where the crate's builder would, or lent
    /// by the daemon).
    pub fn new(vocab: Vocabulary, merges: Merges, options: Options) -> Bpe {
        Bpe {
            vocab,
            merges,
            unk_token: options.unk_token,
            continuing_subword_prefix: options.continuing_subword_prefix,
            end_of_word_suffix: options.end_of_word_suffix,
            fuse_unk: options.fuse_unk,
            byte_fallback: options.byte_fallback,
            ignore_merges: options.ignore_merges,
        }
    }

    fn id(&self, token: &str) -> Option<u32> {
        self.vocab.id(token)
    }

    fn token(&self, id: u32) -> Option<&str> {
        self.vocab.token(id)
    }

    /// The unknown token's id, or the crate's error where it has none.
    fn unk_id(&self, unk: &str) -> Result<u32> {
        self.id(unk).ok_or_else(|| format!("Unk token `{unk}` not found in the vocabulary").into())
    }

    /// The crate's `merge_word`: each character's id (with the continuing
    /// prefix after the first, the end-of-word suffix on the last), else its
    /// bytes' `<0xXX>` tokens, else the unknown token; then every merge.
    fn merge_word(&self, w: &str) -> Result<Vec<Symbol>> {
        let mut word: Vec<Symbol> = Vec::with_capacity(w.len());
        let add = |word: &mut Vec<Symbol>, c: u32, len: usize| {
            let n = word.len() as isize;
            let prev = match word.last_mut() {
                Some(last) => {
                    last.next = n;
                    n - 1
                }
                None => -1,
            };
            word.push(Symbol { c, prev, next: -1, len });
        };
        let mut unk: Option<(u32, usize)> = None;
        let mut s = String::new();
        let mut chars = w.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            let is_last = chars.peek().is_none();
            let byte_len = c.len_utf8();
            s.clear();
            if i != 0 {
                if let Some(prefix) = &self.continuing_subword_prefix {
                    s.push_str(prefix);
                }
            }
            s.push(c);
            if is_last {
                if let Some(suffix) = &self.end_of_word_suffix {
                    s.push_str(suffix);
                }
            }
            if let Some(id) = self.id(&s) {
                if let Some((unk_id, unk_len)) = unk.take() {
                    add(&mut word, unk_id, unk_len);
                }
                add(&mut word, id, byte_len);
                continue;
            }
            if self.byte_fallback {
                let bytes: Option<Vec<u32>> = s.bytes().map(|b| self.id(&format!("<{b:#04X}>"))).collect();
                if let Some(bytes) = bytes {
                    for id in bytes {
                        add(&mut word, id, 1);
                    }
                    continue;
                }
            }
            if let Some(unk_token) = &self.unk_token {
                unk = match (unk, self.fuse_unk) {
                    (Some((unk_id, unk_len)), true) => Some((unk_id, unk_len + byte_len)),
                    (Some((unk_id, unk_len)), false) => {
                        add(&mut word, unk_id, unk_len);
                        Some((self.unk_id(unk_token)?, byte_len))
                    }
                    (None, _) => Some((self.unk_id(unk_token)?, byte_len)),
                };
            }
        }
        if let Some((unk_id, unk_len)) = unk {
            add(&mut word, unk_id, unk_len);
        }
        self.merge_all(&mut word);
        Ok(word)
    }

    /// The crate's `Word::merge_all` without dropout.
    fn merge_all(&self, symbols: &mut Vec<Symbol>) {
        let mut queue: BinaryHeap<Merge> = symbols
            .windows(2)
            .enumerate()
            .filter_map(|(pos, w)| self.merges.get(w[0].c, w[1].c).map(|(rank, new_id)| Merge { pos, rank, new_id }))
            .collect();
        while let Some(top) = queue.pop() {
            if symbols[top.pos].len == 0 || symbols[top.pos].next == -1 {
                continue;
            }
            let next_pos = symbols[top.pos].next as usize;
            let right = symbols[next_pos];
            // An entry made stale by an earlier merge.
            if self.merges.get(symbols[top.pos].c, right.c).is_none_or(|(_, new_id)| new_id != top.new_id) {
                continue;
            }
            let current = &mut symbols[top.pos];
            current.c = top.new_id;
            current.len += right.len;
            current.next = right.next;
            symbols[next_pos].len = 0;
            if right.next > -1 && (right.next as usize) < symbols.len() {
                symbols[right.next as usize].prev = top.pos as isize;
            }
            let current = symbols[top.pos];
            if current.prev >= 0 {
                let prev = symbols[current.prev as usize];
                if let Some((rank, new_id)) = self.merges.get(prev.c, current.c) {
                    queue.push(Merge { pos: current.prev as usize, rank, new_id });
                }
            }
            let next = current.next as usize;
            if next < symbols.len() {
                if let Some((rank, new_id)) = self.merges.get(current.c, symbols[next].c) {
                    queue.push(Merge { pos: top.pos, rank, new_id });
                }
            }
        }
        symbols.retain(|s| s.len != 0);
    }
}

#[derive(Clone, Copy, Debug)]
struct Symbol {
    c: u32,
    prev: isize,
    next: isize,
    len: usize,
}

/// A merge waiting in the queue: the heap pops the lowest rank, then the
/// leftmost position, as the crate's.
#[derive(PartialEq, Eq)]
struct Merge {
    pos: usize,
    rank: u32,
    new_id: u32,
}

impl Ord for Merge {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.rank.cmp(&self.rank).then_with(|| other.pos.cmp(&self.pos))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl tokenizers::Model for Bpe {
    type Trainer = tokenizers::models::TrainerWrapper;

    /// The crate's `BPE::tokenize`: a word that is a token when merges are
    /// ignored, else the merged word's symbols with their byte offsets.
    fn tokenize(&self, sequence: &str) -> Result<Vec<Token>> {
        if sequence.is_empty() {
            return Ok(vec![]);
        }
        if self.ignore_merges {
            if let Some(id) = self.id(sequence) {
                return Ok(vec![Token::new(id, sequence.to_string(), (0, sequence.len()))]);
            }
        }
        let word = self.merge_word(sequence)?;
        let mut pos = 0;
        Ok(word
            .iter()
            .map(|s| {
                let offsets = (pos, pos + s.len);
                pos += s.len;
                Token::new(s.c, self.token(s.c).unwrap_or_default().to_string(), offsets)
            })
            .collect())
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.token(id).map(str::to_string)
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        self.vocab.to_map()
    }

    fn get_vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Writes `[name-]vocab.json` and `[name-]merges.txt` as the crate's
    /// model does.
    fn save(&self, folder: &Path, name: Option<&str>) -> Result<Vec<PathBuf>> {
        let named = |file: &str| folder.join(name.map_or(file.to_string(), |n| format!("{n}-{file}")));
        let (vocab_path, merges_path) = (named("vocab.json"), named("merges.txt"));
        std::fs::write(&vocab_path, serde_json::to_string(&self.vocab)?)?;
        let mut merges = String::from("#version: 0.2\n");
        for (a, b) in self.ranked_merges() {
            merges.push_str(&format!("{a} {b}\n"));
        }
        std::fs::write(&merges_path, merges)?;
        Ok(vec![vocab_path, merges_path])
    }

    fn get_trainer(&self) -> Self::Trainer {
        tokenizers::models::TrainerWrapper::BpeTrainer(Default::default())
    }
}

impl Bpe {
    /// The merges by rank, as the texts of their two parts.
    fn ranked_merges(&self) -> Vec<(&str, &str)> {
        let mut merges: Vec<((u32, u32), u32)> = self.merges.iter().map(|(pair, (rank, _))| (pair, rank)).collect();
        merges.sort_unstable_by_key(|m| m.1);
        merges
            .into_iter()
            .map(|((a, b), _)| (self.token(a).unwrap_or_default(), self.token(b).unwrap_or_default()))
            .collect()
    }
}

/// The crate's serialised form of a BPE model, field for field.
impl Serialize for Bpe {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut model = serializer.serialize_struct("BPE", 10)?;
        model.serialize_field("type", "BPE")?;
        model.serialize_field("dropout", &None::<f32>)?;
        model.serialize_field("unk_token", &self.unk_token)?;
        model.serialize_field("continuing_subword_prefix", &self.continuing_subword_prefix)?;
        model.serialize_field("end_of_word_suffix", &self.end_of_word_suffix)?;
        model.serialize_field("fuse_unk", &self.fuse_unk)?;
        model.serialize_field("byte_fallback", &self.byte_fallback)?;
        model.serialize_field("ignore_merges", &self.ignore_merges)?;
        model.serialize_field("vocab", &self.vocab)?;
        model.serialize_field("merges", &self.ranked_merges())?;
        model.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::same_tokens as same;
    use crate::vocab::{Text, Vocab};
    use proptest::prelude::*;
    use std::borrow::Cow;
    use tokenizers::models::bpe::BPE;
    use tokenizers::Model;

    /// A model described as the crate's builder takes it.
    #[derive(Clone, Debug)]
    struct Spec {
        vocab: Vec<(String, u32)>,
        merges: Vec<(String, String)>,
        unk_token: Option<String>,
        prefix: Option<String>,
        suffix: Option<String>,
        fuse_unk: bool,
        byte_fallback: bool,
        ignore_merges: bool,
    }

    impl Spec {
        fn ours(&self) -> Option<Bpe> {
            let vocab = Vocab(self.vocab.iter().map(|(t, id)| (Text(Cow::Borrowed(t.as_str())), *id)).collect());
            let merges: Vec<(Text, Text)> =
                self.merges.iter().map(|(a, b)| (Text(Cow::Borrowed(a.as_str())), Text(Cow::Borrowed(b.as_str())))).collect();
            let options = Options {
                unk_token: self.unk_token.clone(),
                continuing_subword_prefix: self.prefix.clone(),
                end_of_word_suffix: self.suffix.clone(),
                fuse_unk: self.fuse_unk,
                byte_fallback: self.byte_fallback,
                ignore_merges: self.ignore_merges,
            };
            let vocab = Vocabulary::new(vocab)?;
            let merges = Merges::new(&vocab, &merges, self.prefix.as_ref().map_or(0, String::len))?;
            Some(Bpe::new(vocab, merges, options))
        }

        fn theirs(&self) -> BPE {
            let vocab: ahash::AHashMap<String, u32> = self.vocab.iter().cloned().collect();
            let mut b = BPE::builder()
                .vocab_and_merges(vocab, self.merges.clone())
                .fuse_unk(self.fuse_unk)
                .byte_fallback(self.byte_fallback)
                .ignore_merges(self.ignore_merges);
            if let Some(u) = &self.unk_token {
                b = b.unk_token(u.clone());
            }
            if let Some(p) = &self.prefix {
                b = b.continuing_subword_prefix(p.clone());
            }
            if let Some(s) = &self.suffix {
                b = b.end_of_word_suffix(s.clone());
            }
            b.build().unwrap()
        }
    }

    const ALPHABET: [char; 6] = ['a', 'b', 'c', 'é', '数', '😀'];

    /// Characters (some left out, so that others are unknown), each also
    /// with the continuing prefix and the end-of-word suffix where the model
    /// has them, `<unk>` or not, some `<0xXX>` byte tokens, then merges of
    /// two tokens drawn from those before (some drawn twice), each adding
    /// the token it makes.
    fn spec() -> impl Strategy<Value = Spec> {
        (
            proptest::collection::vec(any::<bool>(), ALPHABET.len()),
            (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
            (any::<bool>(), any::<bool>(), any::<bool>()),
            prop::sample::subsequence(vec!["<0x61>", "<0x62>", "<0xC3>", "<0xA9>", "<0xE6>", "<0x95>", "<0xB0>", "<0x7A>"], 0..8),
            proptest::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..30),
        )
            .prop_map(|(keep, (unk, unk_in_vocab, prefix, suffix), (fuse_unk, byte_fallback, ignore_merges), bytes, draws)| {
                let prefix = prefix.then(|| "##".to_string());
                let suffix = suffix.then(|| "</w>".to_string());
                let mut tokens: Vec<String> = Vec::new();
                let push = |tokens: &mut Vec<String>, t: String| {
                    if !tokens.contains(&t) {
                        tokens.push(t);
                    }
                };
                if unk && unk_in_vocab {
                    push(&mut tokens, "<unk>".into());
                }
                for (c, _) in ALPHABET.iter().zip(&keep).filter(|(_, k)| **k) {
                    for p in ["", prefix.as_deref().unwrap_or("")] {
                        for s in ["", suffix.as_deref().unwrap_or("")] {
                            push(&mut tokens, format!("{p}{c}{s}"));
                        }
                    }
                }
                for b in bytes {
                    push(&mut tokens, b.to_string());
                }
                let mut merges = Vec::new();
                if !tokens.is_empty() {
                    let p = prefix.as_deref().unwrap_or("");
                    for (i, j) in draws {
                        let a = i.get(&tokens).clone();
                        let b = j.get(&tokens).clone();
                        // The crate joins `a` and `b` less the prefix's length:
                        // only a right part that starts with the prefix.
                        if !b.starts_with(p) {
                            continue;
                        }
                        push(&mut tokens, format!("{a}{}", &b[p.len()..]));
                        merges.push((a, b));
                    }
                }
                Spec {
                    vocab: tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect(),
                    merges,
                    unk_token: unk.then(|| "<unk>".to_string()),
                    prefix,
                    suffix,
                    fuse_unk,
                    byte_fallback,
                    ignore_merges,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        #[test]
        fn tokenizes_and_serialises_as_the_crate_s_bpe(
            spec in spec(),
            texts in proptest::collection::vec("[abcé数😀z]{0,16}", 1..4),
        ) {
            let (ours, theirs) = (spec.ours().unwrap(), spec.theirs());
            for text in &texts {
                same(&ours, &theirs, text);
            }
            prop_assert_eq!(serde_json::to_string(&ours).unwrap(), serde_json::to_string(&theirs).unwrap());
            prop_assert_eq!(ours.get_vocab(), theirs.get_vocab());
        }
    }

    fn spec_of(vocab: &[&str], merges: &[(&str, &str)]) -> Spec {
        Spec {
            vocab: vocab.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect(),
            merges: merges.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            unk_token: None,
            prefix: None,
            suffix: None,
            fuse_unk: false,
            byte_fallback: false,
            ignore_merges: false,
        }
    }

    #[test]
    fn merges_by_rank_then_leftmost_and_unknowns_as_the_crate() {
        let spec = spec_of(&["a", "b", "c", "ab", "bc", "abc", "<unk>"], &[("b", "c"), ("a", "b"), ("a", "bc")]);
        let (ours, theirs) = (spec.ours().unwrap(), spec.theirs());
        let ids = |text: &str| ours.tokenize(text).unwrap().into_iter().map(|t| t.value).collect::<Vec<_>>();
        // "bc" ranks first, so "abc" is a + bc, merged by the third merge.
        assert_eq!(ids("abc"), ["abc"]);
        assert_eq!(ids("abab"), ["ab", "ab"]);
        for text in ["abcabc", "cab", "bbb", "xax"] {
            same(&ours, &theirs, text);
        }
        // Unknown characters: dropped without an unknown token, fused or not
        // with one, the crate's error where it is not in the vocabulary.
        for (unk, fuse) in [(Some("<unk>"), true), (Some("<unk>"), false), (Some("<missing>"), false)] {
            let spec = Spec { unk_token: unk.map(str::to_string), fuse_unk: fuse, ..spec.clone() };
            let (ours, theirs) = (spec.ours().unwrap(), spec.theirs());
            for text in ["axxb", "xyz", "a"] {
                same(&ours, &theirs, text);
            }
        }
    }

    #[test]
    fn token_to_id_save_and_the_vocabularies_left_to_the_crate() {
        let spec = spec_of(&["a", "b", "ab"], &[("a", "b")]);
        let (ours, theirs) = (spec.ours().unwrap(), spec.theirs());
        assert_eq!((ours.token_to_id("ab"), ours.id_to_token(1), ours.get_vocab_size()), (Some(2), Some("b".into()), 3));
        assert_eq!(ours.id_to_token(7), None);
        let d = mora_test_support::Scratch::new("bpe-save");
        let (a, b) = (d.join("ours"), d.join("theirs"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        ours.save(&a, Some("m")).unwrap();
        theirs.save(&b, Some("m")).unwrap();
        for f in ["m-vocab.json", "m-merges.txt"] {
            assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f}");
        }
        // A token or an id listed twice, a merge of a token not in the
        // vocabulary, or a merged token missing: left to the crate's reader.
        let dup_token = Spec { vocab: vec![("a".into(), 0), ("a".into(), 1)], ..spec.clone() };
        let dup_id = Spec { vocab: vec![("a".into(), 0), ("b".into(), 0)], ..spec.clone() };
        assert!(dup_token.ours().is_none() && dup_id.ours().is_none());
        assert!(spec_of(&["a", "b", "ab"], &[("a", "c")]).ours().is_none());
        assert!(spec_of(&["a", "b"], &[("a", "b")]).ours().is_none());
        // Holes in the ids are kept as the crate keeps them.
        let holes = Spec { vocab: vec![("a".into(), 0), ("b".into(), 5), ("ab".into(), 9)], ..spec };
        let (ours, theirs) = (holes.ours().unwrap(), holes.theirs());
        assert_eq!(serde_json::to_string(&ours).unwrap(), serde_json::to_string(&theirs).unwrap());
        same(&ours, &theirs, "abba");
    }
}
