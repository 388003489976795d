//! CLIP's BPE tokenizer, as Stable Diffusion pipelines ship it.
//!
//! The tokenizer reads a tokenizer folder in either form found in the wild:
//! `vocab.json` + `merges.txt` (the official SD 1.5 / 2.1 / XL repos) or
//! `tokenizer.json` (what transformers 5 saves), and builds from either the
//! same `tokenizers` pipeline transformers 5's `CLIPTokenizer` builds (NFC,
//! whitespace runs to one space, lower-casing; CLIP's split regex; byte-level
//! BPE with `</w>` word ends), so that the ids equal those of
//! `tokenizer(prompt, padding="max_length", max_length=model_max_length,
//! truncation=True)`.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

/// Why a CLIP tokenizer folder cannot be read or a prompt tokenized; each
/// message names the file or folder and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("{}: cannot read it: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: not valid JSON: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{}: not a JSON object", path.display())]
    NotAnObject { path: PathBuf },
    #[error("{}: no such tokenizer folder", dir.display())]
    NoFolder { dir: PathBuf },
    /// The folder holds neither form whole (`missing` says what it lacks).
    #[error("{}: {missing}", dir.display())]
    Incomplete { dir: PathBuf, missing: &'static str },
    #[error("{}: `tokenizer_class` is `{class}`, not CLIPTokenizer", path.display())]
    Class { path: PathBuf, class: String },
    #[error("{}: `{key}` must be a token, not {value}", path.display())]
    NotAToken { path: PathBuf, key: String, value: Value },
    #[error("{}: `{key}` is `{config}` in tokenizer_config.json but `{map}` in special_tokens_map.json", dir.display())]
    SpecialsDisagree { dir: PathBuf, key: String, config: String, map: String },
    #[error("{}: the special token `{token}` is not in the vocabulary", dir.display())]
    SpecialNotInVocabulary { dir: PathBuf, token: String },
    #[error("{}: the id of `{token}` is {id}, not a token id", path.display())]
    BadId { path: PathBuf, token: String, id: Value },
    /// A key of tokenizer.json's BPE model is missing (`model`, `model.vocab`, `model.merges`).
    #[error("{}: no `{key}`", path.display())]
    Missing { path: PathBuf, key: &'static str },
    #[error("{}: `model.type` is {found:?}; a CLIP tokenizer is a BPE", path.display())]
    NotBpe { path: PathBuf, found: Option<String> },
    /// `merge` as the file writes it (a string in backquotes, else JSON).
    #[error("{}: the merge {merge} is not a pair", path.display())]
    Merge { path: PathBuf, merge: String },
    #[error("{}: `model_max_length` is {value}; a CLIP tokenizer pads to its text encoder's positions (77)", path.display())]
    MaxLength { path: PathBuf, value: Value },
    #[error("{}: no `model_max_length` in tokenizer_config.json (nor a truncation length in tokenizer.json): cannot tell how long the padded prompt is", dir.display())]
    NoMaxLength { dir: PathBuf },
    #[error("{}: cannot build the CLIP tokenizer: {source}", dir.display())]
    Build { dir: PathBuf, source: tokenizers::Error },
    #[error("cannot tokenize the prompt: {0}")]
    Tokenize(#[source] tokenizers::Error),
}

/// A JSON file that must hold an object.
fn read_json(path: &Path) -> Result<Map<String, Value>, ClipError> {
    let bytes = std::fs::read(path).map_err(|source| ClipError::Read { path: path.to_path_buf(), source })?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ClipError::NotAnObject { path: path.to_path_buf() }),
        Err(source) => Err(ClipError::Json { path: path.to_path_buf(), source }),
    }
}

/// CLIP's pre-tokenizer split, as transformers 5's `CLIPTokenizer` has it.
const SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIP's BPE tokenizer, padded and truncated to `model_max_length`.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    bos: u32,
    eos: u32,
    pad: u32,
}

/// A special token of a tokenizer folder, with the matching flags
/// transformers gives it.
#[derive(Debug, Clone, PartialEq)]
struct Special {
    content: String,
    normalized: bool,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

impl Special {
    /// A plain string in tokenizer_config.json: matched on the raw text.
    fn plain(content: &str) -> Special {
        Special { content: content.into(), normalized: false, lstrip: false, rstrip: false, single_word: false }
    }

    /// A string or an `AddedToken` object (`{"content": ..., "normalized": ...}`).
    fn from_value(v: &Value) -> Option<Special> {
        match v {
            Value::String(s) => Some(Special::plain(s)),
            Value::Object(o) => {
                let flag = |k: &str| o.get(k).and_then(Value::as_bool).unwrap_or(false);
                Some(Special {
                    content: o.get("content")?.as_str()?.to_string(),
                    normalized: o.get("normalized").and_then(Value::as_bool).unwrap_or(true),
                    lstrip: flag("lstrip"),
                    rstrip: flag("rstrip"),
                    single_word: flag("single_word"),
                })
            }
            _ => None,
        }
    }
}

fn read_optional(path: &Path) -> Result<Option<Map<String, Value>>, ClipError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

impl ClipTokenizer {
    /// From a tokenizer folder in either form; errors name the folder and
    /// what is missing.
    pub fn from_dir(dir: &Path) -> Result<ClipTokenizer, ClipError> {
        if !dir.is_dir() {
            return Err(ClipError::NoFolder { dir: dir.to_path_buf() });
        }
        let incomplete = |missing| ClipError::Incomplete { dir: dir.to_path_buf(), missing };
        let config_path = dir.join("tokenizer_config.json");
        let map_path = dir.join("special_tokens_map.json");
        let config = read_optional(&config_path)?;
        let map = read_optional(&map_path)?;
        let json_path = dir.join("tokenizer.json");
        let (vocab, merges, listed) = if json_path.exists() {
            from_tokenizer_json(&json_path)?
        } else {
            let (v, m) = (dir.join("vocab.json"), dir.join("merges.txt"));
            match (v.exists(), m.exists()) {
                (true, true) => (read_vocab(&v)?, read_merges(&m)?, Vec::new()),
                (true, false) => return Err(incomplete("vocab.json without merges.txt (and no tokenizer.json)")),
                (false, true) => return Err(incomplete("merges.txt without vocab.json (and no tokenizer.json)")),
                (false, false) => {
                    return Err(incomplete("no tokenizer.json, and no vocab.json + merges.txt: not a CLIP tokenizer folder"))
                }
            }
        };
        if let Some(class) = config.as_ref().and_then(|c| c.get("tokenizer_class")).and_then(Value::as_str) {
            if !class.starts_with("CLIPTokenizer") {
                return Err(ClipError::Class { path: config_path, class: class.to_string() });
            }
        }
        // Each special token: tokenizer_config.json, special_tokens_map.json, or CLIP's default.
        let special = |key: &str, default: &str| -> Result<Special, ClipError> {
            let from = |m: &Option<Map<String, Value>>, p: &Path| -> Result<Option<Special>, ClipError> {
                match m.as_ref().and_then(|m| m.get(key)) {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => Special::from_value(v).map(Some).ok_or_else(|| ClipError::NotAToken {
                        path: p.to_path_buf(),
                        key: key.to_string(),
                        value: v.clone(),
                    }),
                }
            };
            let a = from(&config, &config_path)?;
            let b = from(&map, &map_path)?;
            if let (Some(a), Some(b)) = (&a, &b) {
                if a.content != b.content {
                    return Err(ClipError::SpecialsDisagree {
                        dir: dir.to_path_buf(),
                        key: key.to_string(),
                        config: a.content.clone(),
                        map: b.content.clone(),
                    });
                }
            }
            Ok(a.or(b).unwrap_or_else(|| Special::plain(default)))
        };
        let bos = special("bos_token", "<|startoftext|>")?;
        let eos = special("eos_token", "<|endoftext|>")?;
        let unk = special("unk_token", "<|endoftext|>")?;
        let pad = special("pad_token", "<|endoftext|>")?;
        // The tokens the files list as added keep their flags (tokenizer.json's
        // `added_tokens`, then tokenizer_config.json's `added_tokens_decoder`).
        let mut added: Vec<(Special, bool)> = listed;
        if let Some(Value::Object(dec)) = config.as_ref().and_then(|c| c.get("added_tokens_decoder")) {
            for v in dec.values() {
                if let Some(s) = Special::from_value(v) {
                    if !added.iter().any(|(a, _)| a.content == s.content) {
                        added.push((s, v.get("special").and_then(Value::as_bool).unwrap_or(true)));
                    }
                }
            }
        }
        for s in [&pad, &bos, &eos, &unk] {
            if !added.iter().any(|(a, _)| a.content == s.content) {
                added.push((s.clone(), true));
            }
        }
        let id = |s: &Special| -> Result<u32, ClipError> {
            vocab
                .get(&s.content)
                .and_then(Value::as_u64)
                .map(|n| n as u32)
                .ok_or_else(|| ClipError::SpecialNotInVocabulary { dir: dir.to_path_buf(), token: s.content.clone() })
        };
        let (bos_id, eos_id, pad_id) = (id(&bos)?, id(&eos)?, id(&pad)?);
        id(&unk)?;
        let mut added_json = Vec::new();
        for (s, is_special) in &added {
            added_json.push(json!({
                "id": id(s)?, "content": s.content, "single_word": s.single_word, "lstrip": s.lstrip,
                "rstrip": s.rstrip, "normalized": s.normalized, "special": is_special,
            }));
        }
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_json,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"},
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPLIT_REGEX}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            ]},
            "post_processor": {"type": "RobertaProcessing", "sep": [eos.content, eos_id], "cls": [bos.content, bos_id],
                "trim_offsets": false, "add_prefix_space": false},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk.content, "continuing_subword_prefix": "",
                "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges},
        });
        let tokenizer: Tokenizer =
            spec.to_string().parse().map_err(|source| ClipError::Build { dir: dir.to_path_buf(), source })?;
        let max_length = max_length(dir, config.as_ref(), &json_path)?;
        Ok(ClipTokenizer { tokenizer, max_length, bos: bos_id, eos: eos_id, pad: pad_id })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id padding fills with (`<|endoftext|>` for SD 1.x, `!` for SD 2.x
    /// and SDXL's second tokenizer).
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The `tokenizers` pipeline itself (normalizer, pre-tokenizer, BPE,
    /// start/end post-processor), without padding or truncation.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Padded/truncated ids, length max_length: start-of-text, at most
    /// max_length - 2 tokens of the text, end-of-text, then the pad id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ClipError> {
        let enc = self.tokenizer.encode(text, false).map_err(ClipError::Tokenize)?;
        let body = enc.get_ids();
        let keep = body.len().min(self.max_length.saturating_sub(2));
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos);
        ids.resize(self.max_length.max(ids.len()), self.pad);
        ids.truncate(self.max_length);
        Ok(ids)
    }
}

/// `model_max_length` of tokenizer_config.json, else the truncation length
/// tokenizer.json carries.
fn max_length(dir: &Path, config: Option<&Map<String, Value>>, json_path: &Path) -> Result<usize, ClipError> {
    let from_config = config.and_then(|c| c.get("model_max_length")).filter(|v| !v.is_null());
    if let Some(v) = from_config {
        return match v.as_f64() {
            Some(n) if (2.0..=1_000_000.0).contains(&n) && n.fract() == 0.0 => Ok(n as usize),
            _ => Err(ClipError::MaxLength { path: dir.join("tokenizer_config.json"), value: v.clone() }),
        };
    }
    if json_path.exists() {
        if let Ok(Value::Object(m)) = std::fs::read(json_path).map(|b| serde_json::from_slice(&b).unwrap_or(Value::Null)) {
            if let Some(n) = m.get("truncation").and_then(|t| t.get("max_length")).and_then(Value::as_u64) {
                if n >= 2 {
                    return Ok(n as usize);
                }
            }
        }
    }
    Err(ClipError::NoMaxLength { dir: dir.to_path_buf() })
}

fn read_vocab(path: &Path) -> Result<Map<String, Value>, ClipError> {
    let vocab = read_json(path)?;
    check_ids(path, &vocab)?;
    Ok(vocab)
}

/// Every id of `vocab` (read from `path`) is a 32-bit token id.
fn check_ids(path: &Path, vocab: &Map<String, Value>) -> Result<(), ClipError> {
    match vocab.iter().find(|(_, v)| v.as_u64().is_none_or(|n| n > u32::MAX as u64)) {
        Some((k, v)) => Err(ClipError::BadId { path: path.to_path_buf(), token: k.clone(), id: v.clone() }),
        None => Ok(()),
    }
}

/// merges.txt as transformers reads it: one `a b` pair a line, `#` lines
/// (`#version: 0.2`) and blank lines skipped.
fn read_merges(path: &Path) -> Result<Vec<Value>, ClipError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClipError::Read { path: path.to_path_buf(), source })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            (parts.len() == 2).then(|| json!([parts[0], parts[1]]))
        })
        .collect())
}

type FromJson = (Map<String, Value>, Vec<Value>, Vec<(Special, bool)>);

/// The vocabulary, merges and added tokens of a tokenizer.json. transformers 5
/// rebuilds `CLIPTokenizer`'s own pipeline around them, and so does Mora.
fn from_tokenizer_json(path: &Path) -> Result<FromJson, ClipError> {
    let missing = |key| ClipError::Missing { path: path.to_path_buf(), key };
    let not_a_pair = |merge| ClipError::Merge { path: path.to_path_buf(), merge };
    let root = read_json(path)?;
    let model = root.get("model").and_then(Value::as_object).ok_or_else(|| missing("model"))?;
    match model.get("type").and_then(Value::as_str) {
        Some("BPE") => {}
        other => return Err(ClipError::NotBpe { path: path.to_path_buf(), found: other.map(str::to_string) }),
    }
    let vocab = model.get("vocab").and_then(Value::as_object).ok_or_else(|| missing("model.vocab"))?.clone();
    check_ids(path, &vocab)?;
    let merges = model.get("merges").and_then(Value::as_array).ok_or_else(|| missing("model.merges"))?;
    let merges = merges
        .iter()
        .map(|m| match m {
            Value::String(s) => match s.split_once(' ') {
                Some((a, b)) => Ok(json!([a, b])),
                None => Err(not_a_pair(format!("`{s}`"))),
            },
            Value::Array(a) if a.len() == 2 && a.iter().all(Value::is_string) => Ok(m.clone()),
            other => Err(not_a_pair(other.to_string())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut added = Vec::new();
    for t in root.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
        if let Some(s) = Special::from_value(t) {
            added.push((s, t.get("special").and_then(Value::as_bool).unwrap_or(false)));
        }
    }
    Ok((vocab, merges, added))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_dir(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/image/pipelines").join(name)
    }

    fn reference(name: &str) -> Value {
        let text = std::fs::read_to_string(fixture_dir(name).join("reference.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// Every tokenizer folder of the fixture pipelines, with its reference.
    fn tokenizer_cases() -> Vec<(String, std::path::PathBuf, Vec<Vec<u32>>)> {
        let mut cases = Vec::new();
        for name in ["sd15", "sd21", "sdxl"] {
            let r = reference(name);
            for (folder, t) in r["tokenizers"].as_object().unwrap() {
                let ids: Vec<Vec<u32>> = serde_json::from_value(t["ids"].clone()).unwrap();
                cases.push((format!("{name}/{folder}"), fixture_dir(name).join(folder), ids));
            }
        }
        cases
    }

    fn prompts() -> Vec<String> {
        serde_json::from_value(reference("sd15")["prompts"].clone()).unwrap()
    }

    #[test]
    fn tokenizer_ids_equal_transformers() {
        let prompts = prompts();
        for (what, dir, want) in tokenizer_cases() {
            let tok = ClipTokenizer::from_dir(&dir).unwrap();
            assert_eq!(tok.max_length(), 77);
            for (p, w) in prompts.iter().zip(&want) {
                assert_eq!(&tok.encode(p).unwrap(), w, "{what}: {p:?}");
            }
        }
    }

    #[test]
    fn both_tokenizer_forms_give_the_same_ids() {
        // sd21's folder holds both forms; each alone must give its ids.
        let src = fixture_dir("sd21").join("tokenizer");
        let want: Vec<Vec<u32>> = serde_json::from_value(reference("sd21")["tokenizers"]["tokenizer"]["ids"].clone()).unwrap();
        let base = mora_test_support::Scratch::new("clip-forms");
        for (form, files) in [
            ("official", &["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"][..]),
            ("fast", &["tokenizer.json", "tokenizer_config.json"][..]),
        ] {
            let dir = base.join(form);
            std::fs::create_dir_all(&dir).unwrap();
            for f in files {
                std::fs::copy(src.join(f), dir.join(f)).unwrap();
            }
            let tok = ClipTokenizer::from_dir(&dir).unwrap();
            assert_eq!(tok.pad_id(), 0, "{form}: SD 2.1 pads with `!`");
            for (p, w) in prompts().iter().zip(&want) {
                assert_eq!(&tok.encode(p).unwrap(), w, "{form}: {p:?}");
            }
        }
        // What is missing is named.
        let empty = base.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let e = ClipTokenizer::from_dir(&empty).err().unwrap().to_string();
        assert!(e.contains(&empty.display().to_string()) && e.contains("vocab.json") && e.contains("tokenizer.json"), "{e}");
        std::fs::copy(src.join("vocab.json"), empty.join("vocab.json")).unwrap();
        let e = ClipTokenizer::from_dir(&empty).err().unwrap().to_string();
        assert!(e.contains("merges.txt"), "{e}");
        std::fs::copy(src.join("merges.txt"), empty.join("merges.txt")).unwrap();
        let e = ClipTokenizer::from_dir(&empty).err().unwrap().to_string();
        assert!(e.contains("model_max_length"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
