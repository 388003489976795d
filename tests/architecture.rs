//! The architecture's invariants that the compiler does not check
//! (docs/architecture.md): no two modules of a crate import each other,
//! directly or around a loop; the networks and tokenizers know nothing of
//! the workflow engine or the daemon; test support is never a product
//! dependency.
//!
//! Imports are read from the source text: every path a module names
//! (`crate::a::b`, `super::c`, `self::d`, a child `e::f`, and each item of a
//! `{...}` group) is an edge to the deepest module file it reaches. Test
//! modules and comments are left out: a test may use anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The product crates, by directory.
const CRATES: &[&str] = &["common", "tokenizers", "models", "cache-server", "exec-client", "python"];

type Module = Vec<String>;

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_') && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Every `.rs` file under `src`, by module path (`lib.rs`, `main.rs` and
/// `mod.rs` name their directory's module).
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<Module, PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                walk(&path, src, out);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let rel = path.strip_prefix(src).unwrap().with_extension("");
                let mut parts: Module = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
                if matches!(parts.last().map(String::as_str), Some("lib" | "main" | "mod")) {
                    parts.pop();
                }
                out.insert(parts, path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// The text a module's imports are read from: without its inline test
/// module (`#[cfg(test)] mod tests { ... }`, which ends the file by
/// convention), without a test module declared in a file of its own
/// (`#[cfg(test)] mod tests;`, left out alone) and without comments.
fn code(text: &str) -> String {
    let mut text = text.to_string();
    while let Some((i, decl_end)) = text.match_indices("#[cfg(test)]").find_map(|(i, m)| {
        let rest = text[i + m.len()..].trim_start();
        let after = rest.strip_prefix("mod tests")?.trim_start();
        Some((i, after.starts_with(';').then(|| text.len() - after.len() + 1)))
    }) {
        match decl_end {
            Some(end) => text.replace_range(i..end, ""),
            None => text.truncate(i),
        }
    }
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Every path in `text`, as its segments, with `a::{b, c::{d}}` groups
/// spelled out (`a::b`, `a::c::d`).
fn paths(text: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = (chars[i].is_ascii_lowercase() || chars[i] == '_')
            && (i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_' || chars[i - 1] == ':'));
        if !starts {
            i += 1;
            continue;
        }
        let (segs, next) = read_path(&chars, i, &mut out, Vec::new());
        if segs.len() > 1 {
            out.push(segs);
        }
        i = next.max(i + 1);
    }
    out
}

/// Reads the path at `i` after `prefix`; a `{...}` group's items go to
/// `out` whole. Returns the path read and where it ends.
fn read_path(chars: &[char], mut i: usize, out: &mut Vec<Vec<String>>, mut segs: Vec<String>) -> (Vec<String>, usize) {
    loop {
        if chars.get(i) == Some(&'{') {
            // A group: each item is a path of its own under `segs`.
            i += 1;
            loop {
                while chars.get(i).is_some_and(|c| c.is_whitespace() || *c == ',') {
                    i += 1;
                }
                match chars.get(i) {
                    None => return (Vec::new(), i),
                    Some('}') => return (Vec::new(), i + 1),
                    _ => {}
                }
                let (item, next) = read_path(chars, i, out, segs.clone());
                if item.len() > segs.len() {
                    out.push(item);
                }
                // Skip what the item's path did not read (`as name`, `*`).
                i = next;
                while chars.get(i).is_some_and(|c| !matches!(c, ',' | '}')) {
                    i += 1;
                }
            }
        }
        let start = i;
        while chars.get(i).is_some_and(|c| c.is_alphanumeric() || *c == '_') {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        if word.is_empty() {
            return (segs, i);
        }
        segs.push(word);
        if chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':') {
            i += 2;
        } else {
            return (segs, i);
        }
    }
}

/// The modules each module of `files` imports.
fn imports(files: &BTreeMap<Module, PathBuf>) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut edges = BTreeMap::new();
    for (module, file) in files {
        let mut to = BTreeSet::new();
        for path in paths(&code(&std::fs::read_to_string(file).unwrap())) {
            let (base, rest): (Module, &[String]) = match path[0].as_str() {
                "crate" => (Vec::new(), &path[1..]),
                "super" => (module[..module.len().saturating_sub(1)].to_vec(), &path[1..]),
                "self" => (module.clone(), &path[1..]),
                _ => (module.clone(), &path[..]),
            };
            let relative = !matches!(path[0].as_str(), "crate" | "super" | "self");
            let segs: Vec<&String> = rest.iter().take_while(|s| is_ident(s)).collect();
            let target = (0..=segs.len()).rev().map(|n| [base.clone(), segs[..n].iter().map(|s| s.to_string()).collect()].concat()).find(|m| files.contains_key(m));
            match target {
                Some(t) if t != *module && !(relative && t == base) => {
                    to.insert(t);
                }
                _ => {}
            }
        }
        edges.insert(module.clone(), to);
    }
    edges
}

/// A loop of imports, if there is one: the modules around it.
fn find_cycle(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit(m: &Module, edges: &BTreeMap<Module, BTreeSet<Module>>, state: &mut BTreeMap<Module, u8>, stack: &mut Vec<Module>) -> Option<Vec<Module>> {
        state.insert(m.clone(), 1);
        stack.push(m.clone());
        for n in &edges[m] {
            match state.get(n).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|s| s == n).unwrap();
                    return Some([&stack[from..], std::slice::from_ref(n)].concat());
                }
                0 => {
                    if let Some(c) = visit(n, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in edges.keys() {
        if state.get(m).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(m, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "lib".into()
    } else {
        m.join("::")
    }
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    for krate in CRATES {
        let files = modules(&mora::root().join(krate).join("src"));
        assert!(!files.is_empty(), "{krate}: no modules found");
        let edges = imports(&files);
        if let Some(cycle) = find_cycle(&edges) {
            let around: Vec<String> = cycle.iter().map(name).collect();
            panic!("{krate}: modules import each other around a loop: {}", around.join(" -> "));
        }
    }
}

#[test]
fn the_import_reader_finds_loops_and_group_imports() {
    let got = paths("use crate::{run::{StepReport, StepKind}, tasks as t};\nuse super::step::*;\nlet x = a::b(c::d);");
    let got: Vec<String> = got.iter().map(|p| p.join("::")).collect();
    for want in ["crate::run::StepReport", "crate::run::StepKind", "crate::tasks", "super::step", "a::b", "c::d"] {
        assert!(got.contains(&want.to_string()), "{want} not in {got:?}");
    }
    assert_eq!(code("use a::b; // crate::c\n#[cfg(test)]\nmod tests { use crate::d; }"), "use a::b; ");
    // A test module in a file of its own hides nothing after it.
    assert_eq!(code("#[cfg(test)]\nmod tests;\nuse crate::e;"), "\nuse crate::e;");
    let m = |s: &str| -> Module { s.split("::").filter(|x| !x.is_empty()).map(str::to_string).collect() };
    let edges: BTreeMap<Module, BTreeSet<Module>> =
        [(m("a"), [m("b")].into()), (m("b"), [m("c")].into()), (m("c"), [m("a")].into()), (m(""), [m("a")].into())].into();
    let cycle: Vec<String> = find_cycle(&edges).unwrap().iter().map(name).collect();
    assert_eq!(cycle, ["a", "b", "c", "a"]);
    let edges: BTreeMap<Module, BTreeSet<Module>> = [(m("a"), [m("b")].into()), (m("b"), BTreeSet::new())].into();
    assert!(find_cycle(&edges).is_none());
}

/// The `[dependencies]` of a crate's manifest, by name.
fn dependencies(krate: &str) -> Vec<String> {
    let text = std::fs::read_to_string(mora::root().join(krate).join("Cargo.toml")).unwrap();
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_string();
        } else if section == "[dependencies]" {
            if let Some((dep, _)) = line.split_once('=') {
                let dep = dep.trim().trim_end_matches(".workspace").to_string();
                if !dep.starts_with('#') && !dep.is_empty() {
                    out.push(dep);
                }
            }
        }
    }
    out
}

#[test]
fn networks_and_tokenizers_know_nothing_of_the_engine_or_the_daemon_and_test_support_is_never_a_product_dependency() {
    for krate in ["tokenizers", "models"] {
        let deps = dependencies(krate);
        assert!(!deps.is_empty(), "{krate}: no dependencies read");
        for engine in ["mora-exec", "mora-cache"] {
            assert!(!deps.iter().any(|d| d == engine), "{krate} depends on {engine}");
        }
    }
    for krate in CRATES {
        assert!(!dependencies(krate).iter().any(|d| d == "mora-test-support"), "{krate} depends on mora-test-support outside its dev-dependencies");
    }
}
