//! Loading `tokenizer.json`: the `tokenizers` crate's own reader
//! (`Tokenizer::from_file`) against the one a Mora run uses
//! (`mora_tokenizers::load`), on the same files in one process.
//!
//! `cargo bench --bench tokenizer [-- --repeats N] [FILE...]`
//!
//! Without files: the test model's tokenizer (all-MiniLM-L6-v2, WordPiece,
//! 30 522 tokens) and a synthetic byte-level BPE of Llama 3's shape (128 000
//! tokens and 127 744 merges, the Llama 3 pre-tokenizer's split pattern, 256
//! special tokens), with its merges as pairs (tokenizers 0.20 and later) and
//! as "a b" strings (earlier releases), and a synthetic Unigram of
//! XLM-RoBERTa's size (250 002 pieces, the multilingual encoders' model),
//! written to `.mora-bench/tokenizers` when missing. Give any `tokenizer.json` to time it instead. Each load is a
//! fresh parse of a file that stays in the page cache. Then both encode the
//! same texts (`examples/corpus.txt` and a few lines in other scripts), each
//! repeat on a fresh copy of the tokenizer, so that no cache carries over
//! from one repeat to the next. Medians over repeats, min and max; both
//! readers' tokenizers are checked first to serialise to the same JSON and
//! to give the same ids and offsets for every text. For a file the daemon
//! prepares (WordPiece, BPE, Unigram), also its prepared size and the load a warm
//! run does with it (`tokenizer::load_lent`), timed against Mora's own load
//! of the file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;

#[derive(Parser)]
#[command(name = "tokenizer", bin_name = "cargo bench --bench tokenizer --")]
struct Args {
    /// Timed repeats of each load, the two readers interleaved (after one untimed warm-up)
    #[arg(long, default_value_t = 15)]
    repeats: usize,
    /// tokenizer.json files (default: the test model's)
    files: Vec<PathBuf>,
    /// cargo bench passes --bench; ignored
    #[arg(long, hide = true)]
    bench: bool,
}

fn median_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Milliseconds `load` takes (freeing its result is not counted).
fn ms<T>(load: &dyn Fn() -> T) -> f64 {
    let start = Instant::now();
    let t = load();
    let ms = start.elapsed().as_secs_f64() * 1e3;
    drop(t);
    ms
}

/// Both loads timed `repeats` times, interleaved (the order swapped each
/// time) so that a drift in the machine's speed falls on both; after one
/// untimed warm-up each. Returns (median, min, max) of each.
fn time_both<A, B>(repeats: usize, a: &dyn Fn() -> A, b: &dyn Fn() -> B) -> ((f64, f64, f64), (f64, f64, f64)) {
    drop((a(), b()));
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for i in 0..repeats {
        if i % 2 == 0 {
            ta.push(ms(a));
            tb.push(ms(b));
        } else {
            tb.push(ms(b));
            ta.push(ms(a));
        }
    }
    (median_min_max(ta), median_min_max(tb))
}

fn main() {
    let args = Args::parse();
    let files = if args.files.is_empty() {
        let snapshots = mora::test_hub().join("models--sentence-transformers--all-MiniLM-L6-v2").join("snapshots");
        let snap = std::fs::read_dir(&snapshots).expect("test model snapshot").next().expect("a snapshot").expect("entry").path();
        let dir = mora::root().join(".mora-bench").join("tokenizers");
        let (pairs, legacy) = synthetic_bpe(&dir, 128_000);
        vec![snap.join("tokenizer.json"), pairs, legacy, synthetic_unigram(&dir, 250_002)]
    } else {
        args.files.clone()
    };
    let corpus = std::fs::read_to_string(mora::root().join("examples/corpus.txt")).expect("examples/corpus.txt");
    let texts: Vec<&str> = corpus.lines().chain(OTHER_SCRIPTS.iter().copied()).collect();
    println!(
        "| tokenizer.json | model | size | load: crate, ms | Mora, ms | Mora / crate | prepared by the daemon: size | load, ms | encode {} texts: crate, ms | Mora, ms | Mora / crate |",
        texts.len()
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for file in &files {
        let crate_load = || tokenizers::Tokenizer::from_file(file).expect("the crate reads it");
        let mora_load = || mora_tokenizers::load(file).expect("Mora reads it");
        let (a, b) = (crate_load(), mora_load());
        assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap(), "{}: the two readers disagree", file.display());
        for t in &texts {
            let (x, y) = (a.encode(*t, true).unwrap(), b.encode(*t, true).unwrap());
            assert_eq!((x.get_ids(), x.get_offsets()), (y.get_ids(), y.get_offsets()), "{}: {t:?}", file.display());
        }
        let kind = serde_json::to_value(a.get_model()).ok().and_then(|m| m["type"].as_str().map(str::to_string)).unwrap_or_default();
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 20) as f64;
        let (c, m) = time_both(args.repeats, &crate_load, &mora_load);
        // What a warm run does with the tokenizer the daemon prepared (read
        // here from a heap copy of its words, not a fresh process's mapping).
        let prepared = mora_tokenizers::vocab::Prepared::build(file).expect("read the file").map(|words| {
            let mib = words.len() as f64 * 4.0 / (1 << 20) as f64;
            (mora_tokenizers::vocab::Prepared::read(std::sync::Arc::new(words)).expect("read back"), mib)
        });
        let (prepared_size, prepared_ms) = match &prepared {
            Some((p, mib)) => {
                let lent_load = || {
                    let (t, lent) = mora_tokenizers::load_lent(file, Some(p)).expect("Mora reads it");
                    assert!(lent, "{}: the prepared tokenizer was not used", file.display());
                    t
                };
                assert_eq!(a.to_string(false).unwrap(), lent_load().to_string(false).unwrap(), "{}: prepared differs", file.display());
                let (_, l) = time_both(args.repeats, &mora_load, &lent_load);
                (format!("{mib:.1} MiB"), format!("{:.2} ({:.2}-{:.2})", l.0, l.1, l.2))
            }
            None => ("not prepared".to_string(), "-".to_string()),
        };
        // Each encode on a fresh copy: a copy starts with an empty cache.
        let (ec, em) = time_fresh(args.repeats, &a, &b, &|t: &tokenizers::Tokenizer| texts.iter().map(|s| t.encode(*s, true).unwrap().len()).sum(), &|t: &mora_tokenizers::Tokenizer| texts.iter().map(|s| t.encode(*s, true).unwrap().len()).sum());
        let cell = |t: (f64, f64, f64)| format!("{:.1} ({:.1}-{:.1})", t.0, t.1, t.2);
        let fine = |t: (f64, f64, f64)| format!("{:.2} ({:.2}-{:.2})", t.0, t.1, t.2);
        println!(
            "| {} | {kind}, {} tokens | {size:.1} MiB | {} | {} | {:.2}x | {prepared_size} | {prepared_ms} | {} | {} | {:.2}x |",
            file.display(),
            a.get_vocab_size(true),
            cell(c),
            cell(m),
            m.0 / c.0,
            fine(ec),
            fine(em),
            em.0 / ec.0
        );
    }
}

/// Lines in other scripts and with accents, for the encode timing.
const OTHER_SCRIPTS: &[&str] = &[
    "Ο άνθρωπος τρώει φαγητό στην αυλή του σπιτιού.",
    "Женщина играет на скрипке в большом зале.",
    "Le garçon mange une pièce de pain à côté de l'église.",
    "数学 is 😀 ünïcödé; don't stop-believing... 12345.678",
];

/// `encode` on a fresh copy of each tokenizer (copied untimed), `repeats`
/// times, interleaved as in `time_both`.
fn time_fresh<A: Clone, B: Clone>(repeats: usize, a: &A, b: &B, ea: &dyn Fn(&A) -> usize, eb: &dyn Fn(&B) -> usize) -> ((f64, f64, f64), (f64, f64, f64)) {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for i in 0..=repeats {
        let (ca, cb) = (a.clone(), b.clone());
        let (x, y) = if i % 2 == 0 {
            (ms(&|| ea(&ca)), ms(&|| eb(&cb)))
        } else {
            let y = ms(&|| eb(&cb));
            (ms(&|| ea(&ca)), y)
        };
        // The first is a warm-up.
        if i > 0 {
            ta.push(x);
            tb.push(y);
        }
    }
    (median_min_max(ta), median_min_max(tb))
}

/// A deterministic generator (xorshift64): `next(n)` draws from 0..n.
fn draws(seed: u64) -> impl FnMut(usize) -> usize {
    let mut state = seed;
    move |n| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    }
}

/// An `added_tokens` entry for a special token, as tokenizers writes it.
fn special_token(id: usize, content: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
}

/// GPT-2's byte-to-character table: the 256 symbols of a byte-level BPE.
fn byte_symbols() -> Vec<char> {
    let mut bytes: Vec<u32> = (b'!'..=b'~').chain(0xa1..=0xac).chain(0xae..=0xff).map(u32::from).collect();
    let mut chars = bytes.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    chars.into_iter().map(|c| char::from_u32(c).expect("a char")).collect()
}

/// Writes (once) a byte-level BPE of `size` tokens in Llama 3's layout, its
/// merges as pairs and as legacy strings; returns both files. Merges join two
/// tokens drawn from the earlier ones (a deterministic generator), at most
/// 16 characters long, so every merge's parts and result are in the
/// vocabulary, as the crate requires.
fn synthetic_bpe(dir: &Path, size: usize) -> (PathBuf, PathBuf) {
    let pairs = dir.join(format!("bpe-{size}.json"));
    let legacy = dir.join(format!("bpe-{size}-legacy.json"));
    if pairs.is_file() && legacy.is_file() {
        return (pairs, legacy);
    }
    std::fs::create_dir_all(dir).expect("create .mora-bench/tokenizers");
    let mut tokens: Vec<String> = byte_symbols().into_iter().map(String::from).collect();
    let mut vocab: std::collections::HashMap<String, usize> = tokens.iter().cloned().enumerate().map(|(i, t)| (t, i)).collect();
    let mut merges: Vec<(String, String)> = Vec::new();
    let mut next = draws(0x9e37_79b9_7f4a_7c15);
    while tokens.len() < size {
        let pool = tokens.len().min(2000 + tokens.len() / 4);
        let (a, b) = (tokens[next(pool)].clone(), tokens[next(pool)].clone());
        let joined = format!("{a}{b}");
        if joined.chars().count() > 16 || vocab.contains_key(&joined) {
            continue;
        }
        vocab.insert(joined.clone(), tokens.len());
        tokens.push(joined);
        merges.push((a, b));
    }
    let special: Vec<String> = ["<|begin_of_text|>".to_string(), "<|end_of_text|>".to_string()]
        .into_iter()
        .chain((0..254).map(|i| format!("<|reserved_special_token_{i}|>")))
        .collect();
    let added: Vec<serde_json::Value> = special
        .iter()
        .enumerate()
        .map(|(i, t)| special_token(size + i, t))
        .collect();
    let vocab_json: serde_json::Map<String, serde_json::Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i.into())).collect();
    let pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let mut doc = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [size], "tokens": ["<|begin_of_text|>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
            "vocab": vocab_json, "merges": merges.iter().map(|(a, b)| vec![a.clone(), b.clone()]).collect::<Vec<_>>()}
    });
    std::fs::write(&pairs, doc.to_string()).expect("write the synthetic BPE");
    doc["model"]["merges"] = merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>().into();
    std::fs::write(&legacy, doc.to_string()).expect("write the synthetic BPE");
    (pairs, legacy)
}

/// Writes (once) a Unigram tokenizer of `size` pieces in the layout of the
/// multilingual encoders (`<s>`, `<pad>`, `</s>`, `<unk>`, then pieces of
/// one to ten letters after `▁`, Latin and beyond, with falling scores;
/// Metaspace pre-tokenizer and decoder, `<s> $A </s>`); returns the file.
fn synthetic_unigram(dir: &Path, size: usize) -> PathBuf {
    let path = dir.join(format!("unigram-{size}.json"));
    if path.is_file() {
        return path;
    }
    std::fs::create_dir_all(dir).expect("create .mora-bench/tokenizers");
    let letters: Vec<char> = ('a'..='z').chain('à'..='ÿ').chain('α'..='ω').chain('а'..='я').collect();
    let specials = ["<s>", "<pad>", "</s>", "<unk>"];
    let mut seen: std::collections::HashSet<String> = specials.iter().map(|s| s.to_string()).collect();
    let mut vocab: Vec<serde_json::Value> = specials.iter().map(|s| serde_json::json!([s, 0.0])).collect();
    let mut next = draws(0x2545_f491_4f6c_dd1d);
    while vocab.len() < size {
        let len = 1 + next(10);
        let word: String = (0..len).map(|_| letters[next(letters.len())]).collect();
        let piece = if next(4) == 0 { word } else { format!("\u{2581}{word}") };
        if seen.insert(piece.clone()) {
            let score = -(vocab.len() as f64) / 20_000.0 - 1.0;
            vocab.push(serde_json::json!([piece, score]));
        }
    }
    let metaspace = serde_json::json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true});
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, t)| special_token(i, t))
        .collect();
    let doc = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFKC"},
        "pre_tokenizer": metaspace,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"SpecialToken": {"id": "</s>", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {
                "<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]},
                "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}},
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": 3, "vocab": vocab, "byte_fallback": false}
    });
    std::fs::write(&path, doc.to_string()).expect("write the synthetic Unigram");
    path
}
