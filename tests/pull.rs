//! `mora-cache pull` and `mora-exec run --pull` against a mock hub on
//! 127.0.0.1 that serves the test model's files with the headers the real
//! hub sends: a listing (`/api/models/REPO/revision/REV`), HEADs with
//! `X-Repo-Commit` and `ETag` (git sha1) for small files, and for large ones
//! a redirect to another path (on another host name) with `X-Linked-Etag`
//! (sha256) and `X-Linked-Size`; ranges on GET; `X-Error-Code` on refusals.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use mora::{bin, embed_workflow, read_embeddings, test_model_dir, Env, Scratch};
use sha2::Digest;

const REPO: &str = "sentence-transformers/all-MiniLM-L6-v2";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// Files at least this large are served as LFS files (redirect, sha256).
const LFS_MIN: usize = 1 << 20;

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

#[derive(Default)]
struct State {
    /// repo -> (commit, files)
    repos: BTreeMap<String, (String, BTreeMap<String, Vec<u8>>)>,
    gated: Vec<String>,
    token: Option<String>,
    /// Extra names in listings (files that do not exist).
    extra_names: Vec<String>,
    /// GETs of this file stop after this many bytes, the connection closed.
    cut: Option<(String, usize)>,
    /// HEADs of this file announce a hash the bytes do not have.
    wrong_etag: Option<String>,
    /// GETs of this file send this many bytes more than its HEAD announced.
    longer: Option<(String, usize)>,
    seen: Vec<Seen>,
}

struct MockHub {
    port: u16,
    state: Arc<Mutex<State>>,
}

fn sha256_hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

impl MockHub {
    /// A hub serving the test model (the files of its snapshot) as `REPO` at
    /// `commit`, plus a `.bin` and an `.onnx` copy Mora should not fetch.
    fn start(commit: &str) -> MockHub {
        let mut files = BTreeMap::new();
        read_tree(&test_model_dir(), "", &mut files);
        files.insert("pytorch_model.bin".into(), vec![7u8; 4096]);
        files.insert("onnx/model.onnx".into(), vec![8u8; 4096]);
        let mut state = State::default();
        state.repos.insert(REPO.into(), (commit.into(), files));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(state));
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let state = shared.clone();
                std::thread::spawn(move || serve(conn, port, &state));
            }
        });
        MockHub { port, state }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    fn seen(&self) -> Vec<Seen> {
        self.with(|s| s.seen.clone())
    }

    fn file(&self, name: &str) -> Vec<u8> {
        self.with(|s| s.repos[REPO].1[name].clone())
    }
}

fn read_tree(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Vec<u8>>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        if std::fs::metadata(e.path()).unwrap().is_dir() {
            read_tree(&e.path(), &format!("{name}/"), out);
        } else {
            out.insert(name, std::fs::read(e.path()).unwrap());
        }
    }
}

fn serve(mut conn: TcpStream, port: u16, state: &Mutex<State>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let (mut range, mut auth) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_string()),
                "authorization" => auth = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut st = state.lock().unwrap();
    st.seen.push(Seen { method: method.clone(), path: path.clone(), range: range.clone(), auth: auth.clone() });
    let reply = respond(&st, port, &method, &path, range.as_deref(), auth.as_deref());
    drop(st);
    let Reply { status, headers, body, send } = reply;
    let mut head = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = conn.write_all(head.as_bytes());
    if method != "HEAD" {
        let _ = conn.write_all(&body[..send.min(body.len())]);
    }
    let _ = conn.flush();
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// How much of the body to send (less: the connection closes early).
    send: usize,
}

fn reply(status: u16, headers: Vec<(&str, String)>, body: Vec<u8>) -> Reply {
    let send = body.len();
    let mut headers: Vec<(String, String)> = headers.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    if !headers.iter().any(|(k, _)| k == "Content-Length") {
        headers.push(("Content-Length".into(), body.len().to_string()));
    }
    Reply { status, headers, body, send }
}

fn error(status: u16, code: &str) -> Reply {
    reply(status, vec![("X-Error-Code", code.to_string()), ("X-Error-Message", format!("{code} (mock)"))], Vec::new())
}

fn respond(st: &State, port: u16, method: &str, path: &str, range: Option<&str>, auth: Option<&str>) -> Reply {
    let authorized = |repo: &str| {
        !st.gated.iter().any(|g| g == repo) || (auth.is_some() && auth == st.token.as_ref().map(|t| format!("Bearer {t}")).as_deref())
    };
    // Large files, as on a CDN: /lfs/SHA256?f=NAME.
    if let Some(rest) = path.strip_prefix("/lfs/") {
        let name = rest.split_once("?f=").map(|(_, n)| n).unwrap_or("");
        let Some((_, files)) = st.repos.values().find(|(_, f)| f.contains_key(name)) else { return error(404, "") };
        return body_reply(st, name, &files[name], range);
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        // huggingface_hub 1.x and later list with the tree endpoint.
        if let Some((repo, rest)) = rest.split_once("/tree/") {
            let Some((commit, files)) = st.repos.get(repo) else { return error(401, "RepoNotFound") };
            if !authorized(repo) {
                return error(401, "GatedRepo");
            }
            if rest.split('?').next() != Some(commit.as_str()) && !rest.starts_with("main") {
                return error(404, "RevisionNotFound");
            }
            let entries: Vec<serde_json::Value> = files
                .iter()
                .map(|(n, b)| serde_json::json!({ "type": "file", "path": n, "size": b.len(), "oid": mora_common::hub::git_blob_sha1(b) }))
                .collect();
            return reply(200, vec![("Content-Type", "application/json".into())], serde_json::to_vec(&entries).unwrap());
        }
        let Some((repo, rev)) = rest.split_once("/revision/") else { return error(404, "") };
        let Some((commit, files)) = st.repos.get(repo) else { return error(401, "RepoNotFound") };
        if !authorized(repo) {
            return error(401, "GatedRepo");
        }
        if rev != "main" && rev != commit {
            return error(404, "RevisionNotFound");
        }
        let mut names: Vec<String> = files.keys().cloned().collect();
        names.extend(st.extra_names.iter().cloned());
        let siblings: Vec<serde_json::Value> = names.iter().map(|n| serde_json::json!({ "rfilename": n })).collect();
        let body = serde_json::json!({ "id": repo, "sha": commit, "siblings": siblings }).to_string().into_bytes();
        return reply(200, vec![("Content-Type", "application/json".into())], body);
    }
    // /OWNER/NAME/resolve/COMMIT/FILE
    let Some((repo, rest)) = path.trim_start_matches('/').split_once("/resolve/") else { return error(404, "") };
    let Some((commit, files)) = st.repos.get(repo) else { return error(401, "RepoNotFound") };
    if !authorized(repo) {
        return error(401, "GatedRepo");
    }
    let Some((rev, name)) = rest.split_once('/') else { return error(404, "") };
    if rev != commit {
        return error(404, "RevisionNotFound");
    }
    let Some(bytes) = files.get(name) else { return error(404, "EntryNotFound") };
    if method == "HEAD" {
        let wrong = st.wrong_etag.as_deref() == Some(name);
        let mut headers = vec![("X-Repo-Commit", commit.clone())];
        if bytes.len() >= LFS_MIN {
            let sha = if wrong { sha256_hex(b"something else") } else { sha256_hex(bytes) };
            headers.push(("X-Linked-Etag", format!("\"{sha}\"")));
            headers.push(("X-Linked-Size", bytes.len().to_string()));
            headers.push(("ETag", "\"0000000000000000000000000000000000000000\"".into()));
            // Another host name for the same server: the token must not follow.
            headers.push(("Location", format!("http://localhost:{port}/lfs/{}?f={name}", sha256_hex(bytes))));
            return reply(302, headers, Vec::new());
        }
        let etag = if wrong { mora_common::hub::git_blob_sha1(b"something else") } else { mora_common::hub::git_blob_sha1(bytes) };
        headers.push(("ETag", format!("\"{etag}\"")));
        let mut r = reply(200, headers, bytes.clone());
        r.send = 0;
        return r;
    }
    body_reply(st, name, bytes, range)
}

/// A file's bytes, from `range` on when asked (206), cut or lengthened as the
/// state says.
fn body_reply(st: &State, name: &str, bytes: &[u8], range: Option<&str>) -> Reply {
    let mut body = bytes.to_vec();
    if let Some((_, extra)) = st.longer.as_ref().filter(|(f, _)| f == name) {
        body.extend(std::iter::repeat_n(0u8, *extra));
    }
    let total = body.len();
    let start: usize = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut r = if range.is_some() {
        reply(
            206,
            vec![("Content-Range", format!("bytes {start}-{}/{total}", total - 1)), ("Accept-Ranges", "bytes".into())],
            body[start..].to_vec(),
        )
    } else {
        reply(200, vec![("Accept-Ranges", "bytes".into())], body)
    };
    if let Some((_, n)) = st.cut.as_ref().filter(|(f, _)| f == name) {
        r.send = *n;
    }
    r
}

/// A scratch hub cache and the environment to pull into it from `hub`.
struct Puller {
    scratch: Scratch,
    endpoint: String,
}

impl Puller {
    fn new(tag: &str, hub: &MockHub) -> Puller {
        Puller { scratch: Scratch::new(tag), endpoint: hub.endpoint() }
    }

    fn cache(&self) -> PathBuf {
        self.scratch.join("hub")
    }

    fn repo_dir(&self) -> PathBuf {
        self.cache().join("models--sentence-transformers--all-MiniLM-L6-v2")
    }

    fn command(&self, name: &str) -> Command {
        let mut c = Command::new(bin(name));
        c.env("HF_ENDPOINT", &self.endpoint)
            .env("HF_HUB_CACHE", self.cache())
            .env("HF_HOME", self.scratch.join("hf-home"))
            .env("MORA_SOCKET", self.scratch.join("run").join("cache.sock"))
            .env_remove("HF_TOKEN")
            .env_remove("HUGGING_FACE_HUB_TOKEN")
            .env_remove("HF_TOKEN_PATH")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("MORA_LOG")
            .current_dir(&self.scratch.path);
        without_proxy(&mut c);
        c
    }

    fn pull(&self, args: &[&str]) -> Output {
        self.command("mora-cache").arg("pull").args(args).output().unwrap()
    }
}

/// The mock hub is on 127.0.0.1: no proxy in between.
fn without_proxy(c: &mut Command) {
    for proxy in ["http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        c.env_remove(proxy);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn last_line(out: &Output) -> String {
    text(&out.stderr).lines().last().unwrap_or("").to_string()
}

/// Every file under `dir`, relative.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(d: &Path, rel: &str, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let name = format!("{rel}{}", e.file_name().to_string_lossy());
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), &format!("{name}/"), out);
            } else {
                out.push(name);
            }
        }
    }
    walk(dir, "", &mut out);
    out.sort();
    out
}

#[test]
fn a_fresh_pull_writes_the_hub_layout_and_a_second_finds_everything_cached() {
    let hub = MockHub::start(COMMIT);
    let p = Puller::new("pull-fresh", &hub);
    let out = p.pull(&[REPO]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains(&format!("at commit {COMMIT}")) && stdout.contains("downloaded"), "{stdout}");

    let repo = p.repo_dir();
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), COMMIT);
    let snap = repo.join("snapshots").join(COMMIT);
    let model = hub.file("model.safetensors");
    let sha = sha256_hex(&model);
    // Large file: blob named by its sha256, fetched from the redirect's path.
    assert_eq!(std::fs::read_link(snap.join("model.safetensors")).unwrap(), PathBuf::from(format!("../../blobs/{sha}")));
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), model);
    // Small file in a folder: blob named by its git sha1, link one level deeper.
    let pooling = hub.file("1_Pooling/config.json");
    assert_eq!(
        std::fs::read_link(snap.join("1_Pooling/config.json")).unwrap(),
        PathBuf::from(format!("../../../blobs/{}", mora_common::hub::git_blob_sha1(&pooling)))
    );
    // Only what Mora runs: no .bin, no .onnx; nothing half-written.
    let files = tree(&snap);
    assert!(files.contains(&"tokenizer.json".to_string()) && files.contains(&"vocab.txt".to_string()), "{files:?}");
    assert!(!files.iter().any(|f| f.ends_with(".bin") || f.ends_with(".onnx")), "{files:?}");
    assert!(!tree(&repo.join("blobs")).iter().any(|f| f.ends_with(".incomplete")));
    let seen = hub.seen();
    let lfs_gets: Vec<&Seen> = seen.iter().filter(|s| s.method == "GET" && s.path.starts_with("/lfs/")).collect();
    assert_eq!(lfs_gets.len(), 1, "{seen:?}");
    assert!(seen.iter().all(|s| s.auth.is_none()), "no token was given");

    // Again: the listing and HEADs only, no file body.
    let before = hub.seen().len();
    let again = p.pull(&[REPO]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(text(&again.stdout).contains("all already in the cache"), "{}", text(&again.stdout));
    let later: Vec<Seen> = hub.seen()[before..].to_vec();
    assert!(!later.is_empty() && later.iter().all(|s| s.method == "HEAD" || s.path.starts_with("/api/")), "{later:?}");

    // --include replaces the default set.
    let bin = p.pull(&[REPO, "--include", "*.bin"]);
    assert!(bin.status.success(), "{}", text(&bin.stderr));
    assert_eq!(std::fs::read(snap.join("pytorch_model.bin")).unwrap(), hub.file("pytorch_model.bin"));
}

#[test]
fn a_pull_reads_the_layout_huggingface_hub_wrote_and_downloads_nothing() {
    // The test model's cache, as huggingface_hub lays it out, copied.
    let real = test_model_dir();
    let commit = real.file_name().unwrap().to_string_lossy().to_string();
    let hub = MockHub::start(&commit);
    let p = Puller::new("pull-cached", &hub);
    std::fs::create_dir_all(p.cache()).unwrap();
    let status = Command::new("cp").arg("-a").arg(real.parent().unwrap().parent().unwrap()).arg(p.cache()).status().unwrap();
    assert!(status.success());
    let out = p.pull(&[REPO]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("all already in the cache"), "{}", text(&out.stdout));
    assert!(hub.seen().iter().all(|s| s.method == "HEAD" || s.path.starts_with("/api/")), "{:?}", hub.seen());
}

#[test]
fn run_pull_fetches_a_missing_model_then_runs_it() {
    let hub = MockHub::start(COMMIT);
    let p = Puller::new("pull-run", &hub);
    let wf = p.scratch.join("embed.toml");
    std::fs::write(&wf, embed_workflow(&["A man is eating food."])).unwrap();
    let out_dir = p.scratch.join("out");
    let run = |extra: &[&str]| {
        p.command("mora-exec").arg("run").arg(&wf).arg("-o").arg(&out_dir).args(["--no-cache"]).args(extra).output().unwrap()
    };
    let without = run(&[]);
    assert!(last_line(&without).contains("is not in the Hugging Face cache"), "{}", text(&without.stderr));
    let with = run(&["--pull"]);
    assert!(with.status.success(), "{}", text(&with.stderr));
    assert!(text(&with.stderr).contains("pulled model.safetensors"), "{}", text(&with.stderr));
    // The same embedding as from the original files.
    let env = Env::new("pull-run-ref");
    let wf_ref = env.workflow("embed.toml", &embed_workflow(&["A man is eating food."]));
    let reference = env.exec(&wf_ref, "out", &["--no-cache"]);
    assert!(reference.status.success(), "{}", text(&reference.stderr));
    assert_eq!(read_embeddings(&out_dir.join("embeddings.json")), read_embeddings(&env.scratch.join("out/embeddings.json")));
    // A model already there is not pulled again.
    let before = hub.seen().len();
    assert!(run(&["--pull"]).status.success());
    assert_eq!(hub.seen().len(), before);
}

#[test]
fn an_unknown_repo_and_a_gated_repo_without_a_token_are_one_line_each() {
    let hub = MockHub::start(COMMIT);
    let p = Puller::new("pull-refused", &hub);
    let out = p.pull(&["nobody/nothing"]);
    assert!(!out.status.success());
    let line = last_line(&out);
    assert!(line.starts_with("mora-cache: error: `nobody/nothing` is not on the hub at http://127.0.0.1:"), "{line}");

    hub.with(|s| {
        s.gated.push(REPO.into());
        s.token = Some("hf_secret".into());
    });
    let out = p.pull(&[REPO]);
    assert!(!out.status.success());
    let line = last_line(&out);
    assert!(line.contains("is gated") && line.contains("HF_TOKEN"), "{line}");
    assert!(!p.repo_dir().join("snapshots").exists());

    // With the token (from the token file, as `hf auth login` leaves it).
    std::fs::create_dir_all(p.scratch.join("hf-home")).unwrap();
    std::fs::write(p.scratch.join("hf-home/token"), "hf_secret\n").unwrap();
    let before = hub.seen().len();
    let out = p.pull(&[REPO]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let seen = hub.seen()[before..].to_vec();
    for s in &seen {
        // The token goes to the hub, never to the other host large files come from.
        let expect = if s.path.starts_with("/lfs/") { None } else { Some("Bearer hf_secret") };
        assert_eq!(s.auth.as_deref(), expect, "{s:?}");
    }
}

#[test]
fn a_body_cut_short_leaves_nothing_in_the_snapshot_and_the_next_pull_resumes() {
    let hub = MockHub::start(COMMIT);
    let p = Puller::new("pull-short", &hub);
    hub.with(|s| s.cut = Some(("model.safetensors".into(), 1 << 20)));
    let out = p.pull(&[REPO]);
    assert!(!out.status.success());
    let line = last_line(&out);
    assert!(line.contains("model.safetensors: the download stopped at") && line.contains("pull again to resume"), "{line}");
    let snap = p.repo_dir().join("snapshots").join(COMMIT);
    assert!(!snap.join("model.safetensors").exists());
    let sha = sha256_hex(&hub.file("model.safetensors"));
    let part = p.repo_dir().join("blobs").join(format!("{sha}.incomplete"));
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept >= 1 << 20, "{kept}");
    // Each retry resumed where the last stopped.
    let ranges: Vec<Option<String>> = hub.seen().iter().filter(|s| s.path.starts_with("/lfs/")).map(|s| s.range.clone()).collect();
    assert_eq!(ranges, vec![None, Some("bytes=1048576-".into()), Some("bytes=2097152-".into())]);

    hub.with(|s| s.cut = None);
    let before = hub.seen().len();
    let out = p.pull(&[REPO]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), hub.file("model.safetensors"));
    assert!(!part.exists());
    let resumed = hub.seen()[before..].iter().find(|s| s.path.starts_with("/lfs/")).cloned().unwrap();
    assert_eq!(resumed.range, Some(format!("bytes={kept}-")));
}

#[test]
fn a_wrong_etag_or_a_body_longer_than_announced_is_refused_and_nothing_kept() {
    let hub = MockHub::start(COMMIT);
    let p = Puller::new("pull-bad-bytes", &hub);
    hub.with(|s| s.wrong_etag = Some("config.json".into()));
    let out = p.pull(&[REPO]);
    assert!(!out.status.success());
    let line = last_line(&out);
    assert!(line.contains("config.json: checksum mismatch: the hub announced git sha1"), "{line}");
    let snap = p.repo_dir().join("snapshots").join(COMMIT);
    assert!(!snap.join("config.json").exists());
    assert!(!tree(&p.repo_dir().join("blobs")).iter().any(|f| f.ends_with(".incomplete")), "{:?}", tree(&p.repo_dir()));

    hub.with(|s| {
        s.wrong_etag = Some("model.safetensors".into());
    });
    let line = last_line(&p.pull(&[REPO]));
    assert!(line.contains("model.safetensors: checksum mismatch: the hub announced sha256"), "{line}");

    hub.with(|s| {
        s.wrong_etag = None;
        s.longer = Some(("vocab.txt".into(), 100));
    });
    let line = last_line(&p.pull(&[REPO]));
    assert!(line.contains("vocab.txt: the hub sent more than the") && line.contains("refused"), "{line}");
    assert!(!snap.join("vocab.txt").exists());
    assert!(!tree(&p.repo_dir().join("blobs")).iter().any(|f| f.ends_with(".incomplete")));
}

#[test]
fn a_listing_naming_a_file_outside_the_repo_is_refused_before_anything_is_written() {
    let hub = MockHub::start(COMMIT);
    for evil in ["../../evil.json", "/tmp/evil.json", "a/../../evil.json"] {
        let p = Puller::new("pull-evil", &hub);
        hub.with(|s| s.extra_names = vec![evil.to_string()]);
        let out = p.pull(&[REPO]);
        let line = last_line(&out);
        assert!(!out.status.success());
        assert!(line.contains(&format!("names `{evil}`, which would land outside")), "{line}");
        assert!(tree(&p.scratch.path).is_empty(), "{:?}", tree(&p.scratch.path));
    }
    assert!(hub.seen().iter().all(|s| s.path.starts_with("/api/")), "no file was asked for");
}

#[test]
fn offline_mode_never_contacts_the_hub() {
    let hub = MockHub::start(COMMIT);
    let p = Puller::new("pull-offline", &hub);
    let out = p.command("mora-cache").args(["pull", REPO]).env("HF_HUB_OFFLINE", "1").output().unwrap();
    let line = last_line(&out);
    assert!(!out.status.success());
    assert!(line.contains("HF_HUB_OFFLINE is set and `sentence-transformers/all-MiniLM-L6-v2` (revision main) is not in the Hugging Face cache"), "{line}");
    assert!(hub.seen().is_empty());
    // Once pulled, offline mode finds it.
    assert!(p.pull(&[REPO]).status.success());
    let n = hub.seen().len();
    let out = p.command("mora-cache").args(["pull", REPO]).env("HF_HUB_OFFLINE", "1").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(COMMIT));
    assert_eq!(hub.seen().len(), n);
}

#[test]
fn bad_arguments_are_one_line() {
    let hub = MockHub::start(COMMIT);
    let p = Puller::new("pull-args", &hub);
    for (args, want) in [
        (vec!["../x"], "is not a Hugging Face repo id"),
        (vec!["a/b@.."], "is not a valid revision"),
        (vec![REPO, "--include", "nothing-matches-*"], "no file of `sentence-transformers/all-MiniLM-L6-v2` matches --include nothing-matches-*"),
        (vec![REPO, "--include", "["], "is not a valid file pattern"),
    ] {
        let out = p.pull(&args);
        assert!(!out.status.success(), "{args:?}");
        let line = last_line(&out);
        assert!(line.contains(want), "{args:?}: {line}");
    }
}

/// A Python with `huggingface_hub`: `$MORA_BENCH_PYTHON` (else the
/// benchmark peer's venv, `scripts/bench-python.sh`) when it has it, else the
/// small venv `scripts/python-hub.sh` makes. `Err` says why there is none.
fn python_with_hub() -> Result<PathBuf, String> {
    let has_hub = |python: &Path| Command::new(python).args(["-c", "import huggingface_hub"]).output().is_ok_and(|o| o.status.success());
    let peer = mora::bench::peer_python();
    if has_hub(&peer) {
        return Ok(peer);
    }
    let out = Command::new(mora::root().join("scripts").join("python-hub.sh"))
        .output()
        .map_err(|e| format!("cannot run scripts/python-hub.sh: {e}"))?;
    let python = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if out.status.success() && has_hub(&python) {
        Ok(python)
    } else {
        Err(format!(
            "no Python with huggingface_hub: {} lacks it and scripts/python-hub.sh failed: {}",
            peer.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Python's own `huggingface_hub` downloads from the mock into one cache and
/// reads a cache `mora-cache pull` wrote: each finds the other's files.
#[test]
fn huggingface_hub_and_pull_read_each_other_s_caches() {
    let python = match python_with_hub() {
        Ok(p) => p,
        Err(why) => {
            mora::skipped("pull: huggingface_hub_and_pull_read_each_other_s_caches", &why);
            return;
        }
    };
    let hub = MockHub::start(COMMIT);
    // Mora writes, Python reads.
    let p = Puller::new("pull-py-reads", &hub);
    assert!(p.pull(&[REPO]).status.success());
    let script = r#"
import json, sys
from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache
cache, repo = sys.argv[1], sys.argv[2]
snap = snapshot_download(repo, cache_dir=cache, local_files_only=True)
f = try_to_load_from_cache(repo, "1_Pooling/config.json", cache_dir=cache)
info = scan_cache_dir(cache)
print(json.dumps({"snapshot": snap, "file": f, "warnings": [str(w) for w in info.warnings],
                  "files": sorted(str(x.file_name) for r in info.repos for rev in r.revisions for x in rev.files)}))
"#;
    let out = Command::new(&python).args(["-c", script]).arg(p.cache()).arg(REPO).env("HF_HUB_OFFLINE", "1").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let snap = p.repo_dir().join("snapshots").join(COMMIT);
    assert_eq!(v["snapshot"], snap.display().to_string());
    assert_eq!(v["file"], snap.join("1_Pooling/config.json").display().to_string());
    assert_eq!(v["warnings"], serde_json::json!([]));
    assert!(v["files"].as_array().unwrap().iter().any(|f| f == "model.safetensors"), "{v}");

    // Python writes (from the mock hub), Mora reads: nothing to download, and it runs.
    let q = Puller::new("pull-py-writes", &hub);
    let download = r#"
import sys
from huggingface_hub import snapshot_download
print(snapshot_download(sys.argv[2], cache_dir=sys.argv[1], allow_patterns=["*.safetensors", "*.json", "*.txt"]))
"#;
    let mut c = Command::new(&python);
    c.args(["-c", download]).arg(q.cache()).arg(REPO).env("HF_ENDPOINT", hub.endpoint()).env("HF_HUB_DISABLE_TELEMETRY", "1");
    without_proxy(&mut c);
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = hub.seen().len();
    let again = q.pull(&[REPO]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(text(&again.stdout).contains("all already in the cache"), "{}", text(&again.stdout));
    assert!(hub.seen()[before..].iter().all(|s| s.method == "HEAD" || s.path.starts_with("/api/")));
}
