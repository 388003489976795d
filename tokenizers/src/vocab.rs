//! A tokenizer's vocabulary (token to id, id to token) as Mora's BPE and
//! WordPiece models keep it, and the prepared tokenizer the daemon lends
//! with a model's weights.
//!
//! The `tokenizers` crate keeps a vocabulary as two maps of owned strings,
//! one each way; for 128 000 tokens that is 256 000 allocations and most of
//! a load's time after the parse. A [`Vocabulary`] is one block of 32-bit
//! words: every token's text copied once, an open-addressing table of spans
//! of it keyed by their text (under a hash fixed here, not seeded per
//! process), and a vector from id to span. Read from `tokenizer.json`
//! without a copy of each token ([`Vocab`]).
//!
//! Because the block holds no pointers and its hash does not depend on the
//! process, a block built once can be read by any process: the daemon
//! builds a [`Prepared`] tokenizer when it loads a model (the vocabulary, a
//! BPE's merges as a [`Merges`] block of the same kind, and `tokenizer.json`
//! with both cut out), seals it in a memfd and lends it with the weights,
//! and a warm run reads them in place instead of parsing and hashing them
//! again (docs/decisions.md).

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A string from the JSON text, borrowed where it has no escapes.
pub struct Text<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> std::result::Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> std::result::Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// A `vocab` object in file order: each token's text and id.
pub struct Vocab<'a>(pub Vec<(Text<'a>, u32)>);

impl<'de> Deserialize<'de> for Vocab<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vocab<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of tokens to ids")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> std::result::Result<Vocab<'de>, M::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(entry) = map.next_entry::<Text<'de>, u32>()? {
                    entries.push(entry);
                }
                Ok(Vocab(entries))
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// No token has this id (both words of its span).
const HOLE: u32 = u32::MAX;

/// Words of a vocabulary's header: tokens, table slots, ids, text bytes.
const HEADER: usize = 4;

/// The hash every vocabulary's table is built and probed with: FxHash's
/// step over 8-byte words, then a final mix so that the low bits, which
/// pick the slot, depend on every byte. Fixed, so that a table built in
/// one process is probed in another.
fn hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let step = |h: u64, w: u64| (h.rotate_left(5) ^ w).wrapping_mul(K);
    let mut h = bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        h = step(h, u64::from_le_bytes(c.try_into().expect("8 bytes")));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        h = step(h, u64::from_le_bytes(last));
    }
    mix(h)
}

/// The final mix of [`hash`] (MurmurHash3's), alone the hash of a merge's
/// pair of ids.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// What a vocabulary reads its words from: its own vector, or a mapping of
/// a segment the daemon lent.
pub trait Words: Send + Sync {
    fn words(&self) -> &[u32];
}

impl Words for Vec<u32> {
    fn words(&self) -> &[u32] {
        self
    }
}

/// Words viewed in place in bytes that hold whole, aligned words: a
/// page-aligned mapping of a segment the daemon lent. Bytes that do not
/// (a length or an address not a multiple of 4) read as no words, which
/// no reader accepts.
pub struct WordBytes<T>(pub T);

impl<T: AsRef<[u8]> + Send + Sync> Words for WordBytes<T> {
    fn words(&self) -> &[u32] {
        bytemuck::try_cast_slice(self.0.as_ref()).unwrap_or(&[])
    }
}

/// A vocabulary: a view of one block of words, laid out as
/// `[tokens, slots, ids, text bytes]`, then the table (`slots` entries of
/// `[start, end, id]`, `start` = `HOLE` where empty; `slots` a power of
/// two at least twice the tokens), the spans by id (`ids` entries of
/// `[start, end]`, `HOLE` where no token has the id), then the text.
#[derive(Clone)]
pub struct Vocabulary {
    words: Arc<dyn Words>,
    table: Range<usize>,
    by_id: Range<usize>,
    text: Range<usize>,
    text_len: usize,
    len: usize,
}

impl std::fmt::Debug for Vocabulary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vocabulary").field("tokens", &self.len).field("text_bytes", &self.text_len).finish()
    }
}

impl Vocabulary {
    /// The vocabulary of `vocab`, or `None` where the crate would read it by
    /// a hash map's order (a token or an id listed twice: which one it keeps
    /// depends on the map), or where the ids are so sparse that a vector of
    /// them would be mostly holes.
    pub fn new(vocab: Vocab) -> Option<Vocabulary> {
        let words = Vocabulary::build(&vocab)?;
        Vocabulary::read(Arc::new(words), 0).map(|(v, _)| v)
    }

    /// The block of words of `vocab` (see [`Vocabulary::new`] for `None`).
    fn build(vocab: &Vocab) -> Option<Vec<u32>> {
        Vocabulary::build_from(vocab.0.iter().map(|(t, id)| (t.0.as_ref(), *id)), false)
    }

    /// The block of `tokens`; with `last_wins`, a token listed again takes
    /// the table's entry with its later id (a Unigram's pieces, where the
    /// crate's map does the same), else it is refused.
    fn build_from<'t>(tokens: impl Iterator<Item = (&'t str, u32)> + Clone, last_wins: bool) -> Option<Vec<u32>> {
        let (mut len, mut text_len, mut max_id) = (0usize, 0usize, 0u32);
        for (t, id) in tokens.clone() {
            len += 1;
            text_len += t.len();
            max_id = max_id.max(id);
        }
        // Every offset below `HOLE`, which marks an empty slot.
        if text_len >= HOLE as usize || max_id as usize > 2 * len + 1024 {
            return None;
        }
        let slots = (2 * len).max(8).next_power_of_two();
        let ids = if len == 0 { 0 } else { max_id as usize + 1 };
        let table = HEADER..HEADER + 3 * slots;
        let by_id = table.end..table.end + 2 * ids;
        let text = by_id.end..by_id.end + text_len.div_ceil(4);
        let mut words = vec![HOLE; text.end];
        words[..HEADER].copy_from_slice(&[len as u32, slots as u32, ids as u32, text_len as u32]);
        let mut bytes = Vec::with_capacity(text_len);
        for (token, id) in tokens {
            let token = token.as_bytes();
            let (start, end) = (bytes.len() as u32, (bytes.len() + token.len()) as u32);
            let mut slot = hash(token) as usize & (slots - 1);
            loop {
                let at = table.start + 3 * slot;
                let s = words[at];
                if s == HOLE {
                    words[at..at + 3].copy_from_slice(&[start, end, id]);
                    break;
                }
                if &bytes[s as usize..words[at + 1] as usize] == token {
                    if !last_wins {
                        return None;
                    }
                    words[at + 2] = id;
                    break;
                }
                slot = (slot + 1) & (slots - 1);
            }
            let span = by_id.start + 2 * id as usize;
            if words[span] != HOLE {
                return None;
            }
            words[span..span + 2].copy_from_slice(&[start, end]);
            bytes.extend_from_slice(token);
        }
        bytes.resize(4 * text.len(), 0);
        bytemuck::cast_slice_mut::<u32, u8>(&mut words[text]).copy_from_slice(&bytes);
        Some(words)
    }

    /// A Unigram model's pieces, ids in list order, and their scores: the
    /// vocabulary (a piece listed twice found under its later id, as in the
    /// crate's map) and a [`Scores`] block. `None` only where the pieces'
    /// text passes 4 GiB.
    pub fn pieces(list: &[(Text, f64)]) -> Option<(Vocabulary, Scores)> {
        let (vocabulary, scores) = Vocabulary::build_pieces(list)?;
        Some((Vocabulary::read(Arc::new(vocabulary), 0)?.0, Scores::read(Arc::new(scores), 0)?.0))
    }

    fn build_pieces(list: &[(Text, f64)]) -> Option<(Vec<u32>, Vec<u32>)> {
        let vocabulary = Vocabulary::build_from(list.iter().enumerate().map(|(id, (t, _))| (t.0.as_ref(), id as u32)), true)?;
        let mut scores = Vec::with_capacity(1 + 2 * list.len());
        scores.push(u32::try_from(list.len()).ok()?);
        for (_, score) in list {
            let bits = score.to_bits();
            scores.extend([bits as u32, (bits >> 32) as u32]);
        }
        Some((vocabulary, scores))
    }

    /// The vocabulary whose block starts at word `at` of `words`, and the
    /// word after its end; `None` when the sizes do not fit in `words` or
    /// its table is not a power of two. A span past the text reads as no
    /// token, so a damaged block gives wrong ids, never a crash.
    fn read(words: Arc<dyn Words>, at: usize) -> Option<(Vocabulary, usize)> {
        let w = words.words();
        let head = w.get(at..at.checked_add(HEADER)?)?;
        let (len, slots, ids, text_len) = (head[0] as usize, head[1] as usize, head[2] as usize, head[3] as usize);
        if !slots.is_power_of_two() || slots < 2 * len {
            return None;
        }
        let table = at + HEADER..at + HEADER + 3 * slots;
        let by_id = table.end..table.end + 2 * ids;
        let text = by_id.end..by_id.end + text_len.div_ceil(4);
        if text.end > w.len() {
            return None;
        }
        let end = text.end;
        Some((Vocabulary { words, table, by_id, text, text_len, len }, end))
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u32, u8>(&self.words.words()[self.text.clone()])[..self.text_len]
    }

    fn span(&self, start: u32, end: u32) -> Option<&[u8]> {
        self.bytes().get(start as usize..end as usize)
    }

    fn at(&self, start: u32, end: u32) -> Option<&str> {
        std::str::from_utf8(self.span(start, end)?).ok()
    }

    /// Every `[start, end, id]` entry of the table.
    fn entries(&self) -> impl Iterator<Item = (u32, u32, u32)> + '_ {
        self.words.words()[self.table.clone()].chunks_exact(3).filter(|e| e[0] != HOLE).map(|e| (e[0], e[1], e[2]))
    }

    /// Each id's span, `None` where no token has it.
    fn spans(&self) -> impl Iterator<Item = Option<(u32, u32)>> + '_ {
        self.words.words()[self.by_id.clone()].chunks_exact(2).map(|s| (s[0] != HOLE).then_some((s[0], s[1])))
    }

    /// The id of `token`.
    pub fn id(&self, token: &str) -> Option<u32> {
        let table = &self.words.words()[self.table.clone()];
        let slots = table.len() / 3;
        let token = token.as_bytes();
        let mut slot = hash(token) as usize & (slots - 1);
        // At most every slot once: a damaged table may have no empty one.
        for _ in 0..slots {
            let e = &table[3 * slot..3 * slot + 3];
            if e[0] == HOLE {
                return None;
            }
            if self.span(e[0], e[1]) == Some(token) {
                return Some(e[2]);
            }
            slot = (slot + 1) & (slots - 1);
        }
        None
    }

    /// The text of `id`.
    pub fn token(&self, id: u32) -> Option<&str> {
        let s = self.words.words()[self.by_id.clone()].get(2 * id as usize..2 * id as usize + 2)?;
        if s[0] == HOLE {
            return None;
        }
        self.at(s[0], s[1])
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The longest token's length in bytes.
    pub fn longest(&self) -> usize {
        self.spans().flatten().map(|(s, e)| e.saturating_sub(s) as usize).max().unwrap_or(0)
    }

    /// Token to id, as the crate's `get_vocab` gives it.
    pub fn to_map(&self) -> HashMap<String, u32> {
        self.entries().filter_map(|(s, e, id)| Some((self.at(s, e)?.to_string(), id))).collect()
    }

    /// The tokens in id order, as the crate's `vocab.txt` has them.
    pub fn in_order(&self) -> impl Iterator<Item = &str> {
        self.spans().flatten().filter_map(|(s, e)| self.at(s, e))
    }
}

/// The vocabulary in id order, as the crate's `OrderedVocabIter` writes it.
impl Serialize for Vocabulary {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (id, span) in self.spans().enumerate() {
            if let Some(token) = span.and_then(|(s, e)| self.at(s, e)) {
                map.serialize_entry(token, &id)?;
            }
        }
        map.end()
    }
}

/// A Unigram model's score of each piece, by id: `[pieces]`, then each
/// score's bits as two words, low first.
#[derive(Clone)]
pub struct Scores {
    words: Arc<dyn Words>,
    table: Range<usize>,
}

impl std::fmt::Debug for Scores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scores").field("pieces", &self.len()).finish()
    }
}

impl Scores {
    fn read(words: Arc<dyn Words>, at: usize) -> Option<(Scores, usize)> {
        let len = *words.words().get(at)? as usize;
        let table = at + 1..at + 1 + 2 * len;
        if table.end > words.words().len() {
            return None;
        }
        let end = table.end;
        Some((Scores { words, table }, end))
    }

    /// The score of piece `id`.
    pub fn get(&self, id: usize) -> Option<f64> {
        let w = self.words.words()[self.table.clone()].get(2 * id..2 * id + 2)?;
        Some(f64::from_bits(w[0] as u64 | (w[1] as u64) << 32))
    }

    pub fn len(&self) -> usize {
        self.table.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// Words of a merge table's header: merges, slots.
const MERGES_HEADER: usize = 2;

/// A BPE model's merges: a pair of ids to the merge's rank and the id it
/// makes, as one block of words like a [`Vocabulary`]: `[merges, slots]`,
/// then `slots` entries of `[a, b, rank, new id]` (`a` = `HOLE` where
/// empty; `slots` a power of two at least twice the merges).
#[derive(Clone)]
pub struct Merges {
    words: Arc<dyn Words>,
    table: Range<usize>,
    len: usize,
}

impl std::fmt::Debug for Merges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merges").field("merges", &self.len).finish()
    }
}

impl Merges {
    /// The merges of `list` over `vocab`, as the crate's BPE builder makes
    /// them: each merge's parts by id, its rank its place in the list, and
    /// the id of `a` then `b` less the continuing prefix's `prefix_len`
    /// bytes. A pair listed twice keeps the later rank, as the crate's map
    /// does. `None` where a part or a result is not in the vocabulary (the
    /// crate's builder fails there).
    pub fn new(vocab: &Vocabulary, list: &[(Text, Text)], prefix_len: usize) -> Option<Merges> {
        let words = Merges::build(vocab, list, prefix_len)?;
        Merges::read(Arc::new(words), 0).map(|(m, _)| m)
    }

    fn build(vocab: &Vocabulary, list: &[(Text, Text)], prefix_len: usize) -> Option<Vec<u32>> {
        let slots = (2 * list.len()).max(8).next_power_of_two();
        let table = MERGES_HEADER..MERGES_HEADER + 4 * slots;
        let mut words = vec![HOLE; table.end];
        let mut len = 0;
        let mut joined = String::new();
        for (rank, (a, b)) in list.iter().enumerate() {
            let (a, b): (&str, &str) = (&a.0, &b.0);
            let (a_id, b_id) = (vocab.id(a)?, vocab.id(b)?);
            joined.clear();
            joined.push_str(a);
            joined.push_str(b.get(prefix_len..)?);
            let new_id = vocab.id(&joined)?;
            let mut slot = Merges::slot(a_id, b_id, slots);
            loop {
                let at = table.start + 4 * slot;
                if words[at] == HOLE {
                    len += 1;
                } else if words[at] != a_id || words[at + 1] != b_id {
                    slot = (slot + 1) & (slots - 1);
                    continue;
                }
                words[at..at + 4].copy_from_slice(&[a_id, b_id, rank as u32, new_id]);
                break;
            }
        }
        words[..MERGES_HEADER].copy_from_slice(&[len as u32, slots as u32]);
        Some(words)
    }

    fn slot(a: u32, b: u32, slots: usize) -> usize {
        mix((a as u64) << 32 | b as u64) as usize & (slots - 1)
    }

    /// The merges whose block starts at word `at` of `words`, and the word
    /// after its end (see [`Vocabulary::read`]).
    fn read(words: Arc<dyn Words>, at: usize) -> Option<(Merges, usize)> {
        let w = words.words();
        let head = w.get(at..at.checked_add(MERGES_HEADER)?)?;
        let (len, slots) = (head[0] as usize, head[1] as usize);
        if !slots.is_power_of_two() || slots < 2 * len {
            return None;
        }
        let table = at + MERGES_HEADER..at + MERGES_HEADER + 4 * slots;
        if table.end > w.len() {
            return None;
        }
        let end = table.end;
        Some((Merges { words, table, len }, end))
    }

    /// The rank of merging `a` then `b`, and the id it makes.
    pub fn get(&self, a: u32, b: u32) -> Option<(u32, u32)> {
        let table = &self.words.words()[self.table.clone()];
        let slots = table.len() / 4;
        let mut slot = Merges::slot(a, b, slots);
        for _ in 0..slots {
            let e = &table[4 * slot..4 * slot + 4];
            if e[0] == HOLE {
                return None;
            }
            if e[0] == a && e[1] == b {
                return Some((e[2], e[3]));
            }
            slot = (slot + 1) & (slots - 1);
        }
        None
    }

    /// Every merge, as `((a, b), (rank, new id))`, in no order.
    pub fn iter(&self) -> impl Iterator<Item = ((u32, u32), (u32, u32))> + '_ {
        self.words.words()[self.table.clone()].chunks_exact(4).filter(|e| e[0] != HOLE).map(|e| ((e[0], e[1]), (e[2], e[3])))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A BPE's `merges` as `tokenizer.json` lists them, in either form: pairs
/// (`[["a", "b"], ...]`, tokenizers 0.20 and later) or the legacy strings
/// (`["a b", ...]`, split at their one space; `#version` lines skipped).
/// Strings are borrowed where they have no escapes.
pub fn merge_list(raw: &str) -> Option<Vec<(Text<'_>, Text<'_>)>> {
    if let Ok(pairs) = serde_json::from_str(raw) {
        return Some(pairs);
    }
    let lines: Vec<Text> = serde_json::from_str(raw).ok()?;
    let mut merges = Vec::with_capacity(lines.len());
    // Each line has exactly one space. A line read without a copy lends its
    // parts; an escaped one is copied.
    fn one_space(l: &str) -> Option<(&str, &str)> {
        l.split_once(' ').filter(|(_, b)| !b.contains(' '))
    }
    for line in lines.into_iter().filter(|l| !l.0.starts_with("#version")) {
        merges.push(match line.0 {
            Cow::Borrowed(l) => {
                let (a, b) = one_space(l)?;
                (Text(Cow::Borrowed(a)), Text(Cow::Borrowed(b)))
            }
            Cow::Owned(l) => {
                let (a, b) = one_space(&l)?;
                (Text(Cow::Owned(a.to_string())), Text(Cow::Owned(b.to_string())))
            }
        });
    }
    Some(merges)
}

/// "MTOK": the first word of a prepared tokenizer.
const PREPARED_MAGIC: u32 = 0x4b4f_544d;
/// Bumped whenever the layout of a prepared tokenizer or of a vocabulary,
/// or the hash, changes: a client reads only the version it was built with.
const PREPARED_VERSION: u32 = 3;

/// What identifies the `tokenizer.json` a tokenizer was prepared from:
/// device, inode, size and modification time, as `stat` gives them.
fn identity(meta: &std::fs::Metadata) -> [u64; 5] {
    [meta.dev(), meta.ino(), meta.size(), meta.mtime() as u64, meta.mtime_nsec() as u64]
}

/// A `tokenizer.json` prepared by the daemon: its WordPiece, BPE or Unigram
/// vocabulary as a [`Vocabulary`], a BPE's merges as [`Merges`], a
/// Unigram's scores as [`Scores`], and the file's text with the vocabulary
/// replaced by `{}` (`[]` for a Unigram) and the prepared merges by `[]`
/// (the skeleton), from which a client builds the rest (normaliser,
/// pre-tokeniser, post-processor, decoder, added tokens) as it would from
/// the file. Laid out as `[magic, version, identity (5 × 2 words), skeleton
/// bytes]`, the skeleton, the vocabulary, then `[1]` and the merges, `[2]`
/// and the scores, or `[0]`.
#[derive(Clone, Debug)]
pub struct Prepared {
    identity: [u64; 5],
    skeleton: Arc<str>,
    vocabulary: Vocabulary,
    merges: Option<Merges>,
    scores: Option<Scores>,
}

impl Prepared {
    /// The words of `file` prepared; `Ok(None)` when its model is not
    /// WordPiece, BPE or Unigram, or its vocabulary is one
    /// [`Vocabulary::new`] leaves to the crate, or the file does not parse
    /// (the client's own reader then gives the error).
    pub fn build(file: &Path) -> std::io::Result<Option<Vec<u32>>> {
        let meta = std::fs::metadata(file)?;
        let text = std::fs::read_to_string(file)?;
        Ok(Prepared::build_from(&text, identity(&meta)))
    }

    fn build_from(text: &str, identity: [u64; 5]) -> Option<Vec<u32>> {
        use serde_json::value::RawValue;
        #[derive(Deserialize)]
        struct File<'a> {
            #[serde(borrow)]
            model: Model<'a>,
        }
        #[derive(Deserialize)]
        struct Model<'a> {
            #[serde(rename = "type", borrow)]
            kind: Option<Cow<'a, str>>,
            #[serde(borrow)]
            vocab: Option<&'a RawValue>,
            #[serde(borrow)]
            merges: Option<&'a RawValue>,
            continuing_subword_prefix: Option<String>,
        }
        let file: File = serde_json::from_str(text).ok()?;
        let kind = file.model.kind.as_deref();
        let vocab_raw = file.model.vocab?.get();
        // What follows the vocabulary's block: a tag, then its own block.
        let mut tail = vec![0];
        let (block, mut cuts) = match kind {
            Some("WordPiece" | "BPE") => {
                let vocab: Vocab = serde_json::from_str(vocab_raw).ok()?;
                (Vocabulary::build(&vocab)?, vec![(vocab_raw, "{}")])
            }
            Some("Unigram") => {
                let list: Vec<(Text, f64)> = serde_json::from_str(vocab_raw).ok()?;
                let (block, scores) = Vocabulary::build_pieces(&list)?;
                tail = vec![2];
                tail.extend_from_slice(&scores);
                (block, vec![(vocab_raw, "[]")])
            }
            _ => return None,
        };
        let block = Arc::new(block);
        // A BPE's merges too, where they build (else they stay in the
        // skeleton, and the client reads them as from the file).
        if let (Some("BPE"), Some(raw)) = (kind, file.model.merges) {
            let vocabulary = Vocabulary::read(block.clone(), 0)?.0;
            let prefix_len = file.model.continuing_subword_prefix.as_ref().map_or(0, String::len);
            if let Some(m) = merge_list(raw.get()).and_then(|list| Merges::build(&vocabulary, &list, prefix_len)) {
                tail = vec![1];
                tail.extend_from_slice(&m);
                cuts.push((raw.get(), "[]"));
            }
        }
        let offset = |raw: &str| raw.as_ptr() as usize - text.as_ptr() as usize;
        cuts.sort_by_key(|(raw, _)| offset(raw));
        let mut skeleton = String::with_capacity(text.len());
        let mut from = 0;
        for (raw, with) in cuts {
            skeleton.push_str(&text[from..offset(raw)]);
            skeleton.push_str(with);
            from = offset(raw) + raw.len();
        }
        skeleton.push_str(&text[from..]);
        let mut words = vec![PREPARED_MAGIC, PREPARED_VERSION];
        for part in identity {
            words.extend([part as u32, (part >> 32) as u32]);
        }
        words.push(u32::try_from(skeleton.len()).ok()?);
        let at = words.len();
        words.resize(at + skeleton.len().div_ceil(4), 0);
        bytemuck::cast_slice_mut::<u32, u8>(&mut words[at..])[..skeleton.len()].copy_from_slice(skeleton.as_bytes());
        words.extend_from_slice(&block);
        words.extend_from_slice(&tail);
        Some(words)
    }

    /// `words` (what [`Prepared::build`] gives) as the bytes the daemon
    /// seals into the segment it lends.
    pub fn bytes(words: &[u32]) -> &[u8] {
        bytemuck::cast_slice(words)
    }

    /// Reads a prepared tokenizer from `words` (a lent segment's mapping);
    /// `None` when it is not one this build reads.
    pub fn read(words: Arc<dyn Words>) -> Option<Prepared> {
        let w = words.words();
        if w.len() < 15 || w[0] != PREPARED_MAGIC || w[1] != PREPARED_VERSION {
            return None;
        }
        let mut identity = [0u64; 5];
        for (i, part) in identity.iter_mut().enumerate() {
            *part = w[2 + 2 * i] as u64 | (w[3 + 2 * i] as u64) << 32;
        }
        let skeleton_len = w[12] as usize;
        let at = 13;
        let end = at + skeleton_len.div_ceil(4);
        let bytes = bytemuck::cast_slice::<u32, u8>(w.get(at..end)?);
        let skeleton: Arc<str> = std::str::from_utf8(&bytes[..skeleton_len]).ok()?.into();
        let (vocabulary, end) = Vocabulary::read(words.clone(), end)?;
        let (mut merges, mut scores) = (None, None);
        match *w.get(end)? {
            0 => {}
            1 => merges = Some(Merges::read(words.clone(), end + 1)?.0),
            2 => scores = Some(Scores::read(words.clone(), end + 1)?.0),
            _ => return None,
        }
        Some(Prepared { identity, skeleton, vocabulary, merges, scores })
    }

    /// Whether this was prepared from `file` as it is now (same device,
    /// inode, size and modification time): a client reads the file itself
    /// otherwise.
    pub fn is_of(&self, file: &Path) -> bool {
        std::fs::metadata(file).is_ok_and(|m| identity(&m) == self.identity)
    }

    /// `tokenizer.json` with the model's vocabulary replaced by `{}`.
    pub fn skeleton(&self) -> &str {
        &self.skeleton
    }

    pub fn vocabulary(&self) -> &Vocabulary {
        &self.vocabulary
    }

    /// A BPE's merges, when they were prepared (the skeleton's `merges` is
    /// then `[]`).
    pub fn merges(&self) -> Option<&Merges> {
        self.merges.as_ref()
    }

    /// A Unigram's scores (its vocabulary is then the pieces', and the
    /// skeleton's `vocab` is `[]`).
    pub fn scores(&self) -> Option<&Scores> {
        self.scores.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[(&'static str, u32)]) -> Vocab<'static> {
        Vocab(tokens.iter().map(|&(t, id)| (Text(Cow::Borrowed(t)), id)).collect())
    }

    #[test]
    fn a_vocabulary_maps_tokens_to_ids_and_back() {
        let v = Vocabulary::new(vocab(&[("[PAD]", 0), ("the", 2), ("##s", 1), ("数学", 3), ("", 5)])).unwrap();
        assert_eq!(v.len(), 5);
        assert_eq!((v.id("the"), v.id("##s"), v.id("数学"), v.id("")), (Some(2), Some(1), Some(3), Some(5)));
        assert_eq!((v.id("th"), v.id("thee"), v.id("[pad]")), (None, None, None));
        assert_eq!((v.token(0), v.token(3), v.token(4), v.token(6)), (Some("[PAD]"), Some("数学"), None, None));
        assert_eq!(v.in_order().collect::<Vec<_>>(), ["[PAD]", "##s", "the", "数学", ""]);
        assert_eq!(serde_json::to_string(&v).unwrap(), r###"{"[PAD]":0,"##s":1,"the":2,"数学":3,"":5}"###);
        assert_eq!(v.to_map().len(), 5);
    }

    #[test]
    fn a_token_or_an_id_listed_twice_or_sparse_ids_are_left_to_the_crate() {
        assert!(Vocabulary::new(vocab(&[("a", 0), ("a", 1)])).is_none());
        assert!(Vocabulary::new(vocab(&[("a", 0), ("b", 0)])).is_none());
        assert!(Vocabulary::new(vocab(&[("a", 0), ("b", 5000)])).is_none());
        assert!(Vocabulary::new(vocab(&[])).unwrap().is_empty());
    }

    #[test]
    fn every_token_of_a_large_vocabulary_is_found() {
        let tokens: Vec<String> = (0..20_000).map(|i| format!("tok{i}")).collect();
        let v = Vocabulary::new(Vocab(tokens.iter().enumerate().map(|(i, t)| (Text(Cow::Borrowed(t.as_str())), i as u32)).collect()))
            .unwrap();
        for (i, t) in tokens.iter().enumerate() {
            assert_eq!(v.id(t), Some(i as u32));
            assert_eq!(v.token(i as u32), Some(t.as_str()));
        }
        assert_eq!(v.id("tok20000"), None);
    }

    fn text(t: &'static str) -> Text<'static> {
        Text(Cow::Borrowed(t))
    }

    #[test]
    fn merges_map_a_pair_of_ids_to_its_rank_and_result_as_the_crate_s_builder() {
        let v = Vocabulary::new(vocab(&[("a", 0), ("b", 1), ("ab", 2), ("##b", 3), ("abb", 4), ("c", 5)])).unwrap();
        let m = Merges::new(&v, &[(text("a"), text("b")), (text("ab"), text("b"))], 0).unwrap();
        assert_eq!((m.get(0, 1), m.get(2, 1), m.get(1, 0), m.len()), (Some((0, 2)), Some((1, 4)), None, 2));
        // The continuing prefix is dropped from the second part.
        let m = Merges::new(&v, &[(text("a"), text("##b"))], 2).unwrap();
        assert_eq!(m.get(0, 3), Some((0, 2)));
        // A pair listed twice keeps its later rank; listed once per pair.
        let m = Merges::new(&v, &[(text("a"), text("b")), (text("c"), text("c")), (text("a"), text("b"))], 0);
        assert!(m.is_none(), "cc is not in the vocabulary");
        let m = Merges::new(&v, &[(text("a"), text("b")), (text("ab"), text("b")), (text("a"), text("b"))], 0).unwrap();
        assert_eq!((m.get(0, 1), m.len()), (Some((2, 2)), 2));
        let mut all: Vec<_> = m.iter().collect();
        all.sort();
        assert_eq!(all, [((0, 1), (2, 2)), ((2, 1), (1, 4))]);
        assert!(Merges::new(&v, &[(text("a"), text("x"))], 0).is_none());
    }

    #[test]
    fn merge_lists_read_in_both_forms() {
        let pairs = merge_list(r#"[["a","b"],["ab","c"]]"#).unwrap();
        let legacy = merge_list(r##"["#version: 0.2","a b","ab c"]"##).unwrap();
        let flat = |l: Vec<(Text, Text)>| l.into_iter().map(|(a, b)| (a.0.into_owned(), b.0.into_owned())).collect::<Vec<_>>();
        assert_eq!(flat(pairs), flat(legacy));
        assert!(merge_list(r#"["a b c"]"#).is_none());
    }

    #[test]
    fn a_prepared_bpe_lends_its_merges_and_cuts_them_from_the_skeleton() {
        let bpe = r#"{"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":[["a","b"]],"dropout":null}}"#;
        let p = Prepared::read(Arc::new(Prepared::build_from(bpe, [0; 5]).unwrap())).unwrap();
        assert_eq!(p.skeleton(), r#"{"model":{"type":"BPE","vocab":{},"merges":[],"dropout":null}}"#);
        assert_eq!(p.merges().unwrap().get(0, 1), Some((0, 2)));
        // Merges that do not build stay in the skeleton for the client.
        let broken = bpe.replace(r#"[["a","b"]]"#, r#"[["a","x"]]"#);
        let p = Prepared::read(Arc::new(Prepared::build_from(&broken, [0; 5]).unwrap())).unwrap();
        assert!(p.merges().is_none() && p.skeleton().contains(r#"[["a","x"]]"#));
    }

    #[test]
    fn a_prepared_unigram_lends_its_pieces_and_scores() {
        let unigram = r#"{"model":{"type":"Unigram","unk_id":0,"vocab":[["<unk>",0.0],["a",-1.5],["b",-2.25],["a",-0.5]]}}"#;
        let p = Prepared::read(Arc::new(Prepared::build_from(unigram, [0; 5]).unwrap())).unwrap();
        assert_eq!(p.skeleton(), r#"{"model":{"type":"Unigram","unk_id":0,"vocab":[]}}"#);
        assert!(p.merges().is_none());
        let (v, scores) = (p.vocabulary(), p.scores().unwrap());
        // A piece listed twice: its later id, as the crate's map has it.
        assert_eq!((v.len(), v.id("a"), v.token(1), v.token(3)), (4, Some(3), Some("a"), Some("a")));
        assert_eq!((scores.len(), scores.get(2), scores.get(3), scores.get(4)), (4, Some(-2.25), Some(-0.5), None));
    }

    const FILE: &str = r#"{"version":"1.0","model":{"type":"WordPiece","unk_token":"[UNK]","vocab":{"[UNK]":0,"a":1,"\u00e9":2},"max_input_chars_per_word":100}}"#;

    #[test]
    fn a_prepared_tokenizer_reads_back_its_vocabulary_and_skeleton() {
        let words = Prepared::build_from(FILE, [1, 2, 3, 4, u64::MAX]).unwrap();
        let p = Prepared::read(Arc::new(words)).unwrap();
        assert_eq!(p.identity, [1, 2, 3, 4, u64::MAX]);
        assert_eq!(
            p.skeleton(),
            r#"{"version":"1.0","model":{"type":"WordPiece","unk_token":"[UNK]","vocab":{},"max_input_chars_per_word":100}}"#
        );
        assert_eq!((p.vocabulary().id("é"), p.vocabulary().token(1)), (Some(2), Some("a")));
    }

    #[test]
    fn only_wordpiece_bpe_and_unigram_files_are_prepared() {
        assert!(Prepared::build_from(&FILE.replace("WordPiece", "BPE"), [0; 5]).is_some());
        // A Unigram's vocabulary is a list of pieces and scores, not a map.
        assert!(Prepared::build_from(&FILE.replace("WordPiece", "Unigram"), [0; 5]).is_none());
        assert!(Prepared::build_from(&FILE.replace("WordPiece", "WordLevel"), [0; 5]).is_none());
        assert!(Prepared::build_from(&FILE.replace("\"a\":1", "\"a\":0"), [0; 5]).is_none());
        assert!(Prepared::build_from("{not json", [0; 5]).is_none());
    }

    #[test]
    fn a_damaged_or_foreign_block_is_refused_or_reads_no_tokens() {
        let words = Prepared::build_from(FILE, [0; 5]).unwrap();
        for cut in [0, 1, 14, words.len() - 1] {
            assert!(Prepared::read(Arc::new(words[..cut].to_vec())).is_none(), "cut at {cut}");
        }
        let mut other = words.clone();
        other[1] += 1;
        assert!(Prepared::read(Arc::new(other)).is_none());
        // Spans past the text: lookups miss, nothing panics.
        let mut bad = words.clone();
        let n = bad.len();
        for w in &mut bad[n - 40..n - 2] {
            *w = 0xfff0_0000;
        }
        if let Some(p) = Prepared::read(Arc::new(bad)) {
            let _ = (p.vocabulary().id("a"), p.vocabulary().token(1), p.vocabulary().to_map());
        }
    }

    #[test]
    fn a_prepared_tokenizer_is_of_its_file_until_the_file_changes() {
        let dir = mora_test_support::Scratch::new("vocab");
        let file = dir.join("tokenizer.json");
        std::fs::write(&file, FILE).unwrap();
        let p = Prepared::read(Arc::new(Prepared::build(&file).unwrap().unwrap())).unwrap();
        assert!(p.is_of(&file));
        // A longer file: written within the clock's tick, a file of the same
        // size could keep its modification time.
        std::fs::write(&file, FILE.replace("100", "1000")).unwrap();
        assert!(!p.is_of(&file));
        assert!(!p.is_of(&dir.join("missing.json")));
    }
}
