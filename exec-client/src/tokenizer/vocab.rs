//! A tokenizer's vocabulary (token to id, id to token) as Mora's BPE and
//! WordPiece models keep it: every token's text copied once into one string,
//! an index of spans of it keyed by their text, and a vector from id to span.
//! The crate keeps two maps of owned strings, one each way; for 128 000
//! tokens that is 256 000 allocations and most of a load's time after the
//! parse. Read from `tokenizer.json` without a copy of each token (`Vocab`).

use std::borrow::Cow;
use std::collections::HashMap;

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

/// No token has this id.
const HOLE: (u32, u32) = (u32::MAX, u32::MAX);

#[derive(Clone, Debug)]
pub struct Vocabulary {
    /// Every token's text, one after another.
    text: String,
    /// Each token's span of `text` and its id, keyed by the span's text.
    index: hashbrown::HashTable<(u32, u32, u32)>,
    hasher: ahash::RandomState,
    /// The span of each id's token (`HOLE` where no token has the id).
    by_id: Vec<(u32, u32)>,
}

impl Vocabulary {
    /// The vocabulary of `vocab`, or `None` where the crate would read it by
    /// a hash map's order (a token or an id listed twice: which one it keeps
    /// depends on the map), or where the ids are so sparse that a vector of
    /// them would be mostly holes.
    pub fn new(vocab: Vocab) -> Option<Vocabulary> {
        let hasher = ahash::RandomState::new();
        let mut text = String::with_capacity(vocab.0.iter().map(|(t, _)| t.0.len()).sum());
        let mut index = hashbrown::HashTable::with_capacity(vocab.0.len());
        let mut max_id = 0;
        for (token, id) in &vocab.0 {
            let start = text.len() as u32;
            text.push_str(&token.0);
            let span = (start, text.len() as u32, *id);
            let token: &str = &token.0;
            let at = |&(s, e, _): &(u32, u32, u32)| &text[s as usize..e as usize];
            match index.entry(hasher.hash_one(token), |x| at(x) == token, |x| hasher.hash_one(at(x))) {
                hashbrown::hash_table::Entry::Occupied(_) => return None,
                hashbrown::hash_table::Entry::Vacant(v) => {
                    v.insert(span);
                }
            }
            max_id = max_id.max(*id);
        }
        if max_id as usize > 2 * index.len() + 1024 {
            return None;
        }
        let mut by_id = vec![HOLE; if index.is_empty() { 0 } else { max_id as usize + 1 }];
        for &(start, end, id) in index.iter() {
            if by_id[id as usize] != HOLE {
                return None;
            }
            by_id[id as usize] = (start, end);
        }
        Some(Vocabulary { text, index, hasher, by_id })
    }

    fn at(&self, (start, end): (u32, u32)) -> &str {
        &self.text[start as usize..end as usize]
    }

    /// The id of `token`.
    pub fn id(&self, token: &str) -> Option<u32> {
        self.index
            .find(self.hasher.hash_one(token), |&(s, e, _)| self.at((s, e)) == token)
            .map(|&(_, _, id)| id)
    }

    /// The text of `id`.
    pub fn token(&self, id: u32) -> Option<&str> {
        match self.by_id.get(id as usize) {
            Some(&span) if span != HOLE => Some(self.at(span)),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Token to id, as the crate's `get_vocab` gives it.
    pub fn to_map(&self) -> HashMap<String, u32> {
        self.index.iter().map(|&(s, e, id)| (self.at((s, e)).to_string(), id)).collect()
    }

    /// The tokens in id order, as the crate's `vocab.txt` has them.
    pub fn in_order(&self) -> impl Iterator<Item = &str> {
        self.by_id.iter().filter(|&&span| span != HOLE).map(|&span| self.at(span))
    }
}

/// The vocabulary in id order, as the crate's `OrderedVocabIter` writes it.
impl Serialize for Vocabulary {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (id, &span) in self.by_id.iter().enumerate() {
            if span != HOLE {
                map.serialize_entry(self.at(span), &id)?;
            }
        }
        map.end()
    }
}
