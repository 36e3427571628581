//! The engine's modules form no cycle: a module low in the stack (the format, the data model,
//! the I/O seam) never reaches back up to one built on it. This test reads the engine's
//! sources, collects the `crate::` paths between top-level modules and the `super::` (or
//! `crate::parent::`) paths between sibling files of one folder module, and fails on the first
//! cycle it finds, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Source text with comments, string and char literals blanked out (a doc comment may name
/// `crate::` paths in links; a string may hold anything).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == b'/' && next == Some(b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && next == Some(b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
            continue;
        }
        if c == b'r' && (next == Some(b'"') || next == Some(b'#')) {
            let prev_ident = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
            let mut j = i + 1;
            while j < b.len() && b[j] == b'#' {
                j += 1;
            }
            if !prev_ident && j < b.len() && b[j] == b'"' {
                let hashes = j - i - 1;
                let mut k = j + 1;
                loop {
                    if k >= b.len() {
                        break;
                    }
                    if b[k] == b'"'
                        && b[k + 1..]
                            .iter()
                            .take(hashes)
                            .filter(|&&h| h == b'#')
                            .count()
                            == hashes
                    {
                        k += 1 + hashes;
                        break;
                    }
                    k += 1;
                }
                out.push_str("\"\"");
                i = k;
                continue;
            }
        }
        if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
            continue;
        }
        if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}'); otherwise a lifetime, kept.
            if next == Some(b'\\') {
                let mut k = i + 2;
                while k < b.len() && b[k] != b'\'' {
                    k += 1;
                }
                out.push_str("' '");
                i = k + 1;
                continue;
            }
            let ch_len = src[i + 1..].chars().next().map_or(0, char::len_utf8);
            if ch_len > 0 && b.get(i + 1 + ch_len) == Some(&b'\'') {
                out.push_str("' '");
                i += 2 + ch_len;
                continue;
            }
        }
        let ch = src[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// The code before the file's unit tests (what the tests use is not a dependency).
fn without_tests(code: &str) -> &str {
    match code.find("#[cfg(test)]\nmod tests") {
        Some(k) => &code[..k],
        None => code,
    }
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first segments named after each `prefix::` in `code`: `prefix::a::b` gives `a`,
/// `prefix::{a::x, b}` gives `a` and `b`.
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let pat = format!("{prefix}::");
    let mut from = 0;
    while let Some(k) = code[from..].find(&pat) {
        let at = from + k;
        from = at + pat.len();
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue; // `foo_crate::`, `a::crate::` (not a path from the root)
        }
        let rest = code[from..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if c.is_whitespace() => {}
                    _ if item_start && depth == 1 => {
                        item_start = false;
                        let id = ident_at(&group[i..]);
                        if !id.is_empty() {
                            out.insert(id.to_owned());
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let id = ident_at(rest);
            if !id.is_empty() {
                out.insert(id.to_owned());
            }
        }
    }
    out
}

/// A cycle in `graph`, as the list of nodes around it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_owned(), 1);
        stack.push(n.to_owned());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let k = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut cycle = stack[k..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(n, graph, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

/// Every `.rs` file under `dir`, with its module path (`store/txn.rs` → `["store", "txn"]`,
/// `store/mod.rs` → `["store"]`).
fn modules(root: &Path) -> Vec<(Vec<String>, PathBuf)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("read engine/src") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(root).expect("under root");
            let mut path: Vec<String> = rel
                .iter()
                .map(|s| s.to_string_lossy().trim_end_matches(".rs").to_owned())
                .collect();
            if path.last().is_some_and(|l| l == "mod" || l == "lib") {
                path.pop();
            }
            out.push((path, p));
        }
    }
    out.sort();
    out
}

/// The dependency graphs: one of the top-level modules, and one per folder module of its
/// child files.
fn graphs(root: &Path) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mods = modules(root);
    let known: BTreeSet<Vec<String>> = mods.iter().map(|(p, _)| p.clone()).collect();
    let mut out: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (path, file) in &mods {
        let Some(top) = path.first() else { continue };
        let src = std::fs::read_to_string(file).expect("read source");
        let code = code_only(&src);
        let code = without_tests(&code);
        let crate_names = names_after(code, "crate");
        let top_graph = out.entry("crate".into()).or_default();
        let edges = top_graph.entry(top.clone()).or_default();
        for n in &crate_names {
            if n != top && known.contains(&vec![n.clone()]) {
                edges.insert(n.clone());
            }
        }
        // Siblings: files `parent/x.rs` of one folder module naming each other.
        if path.len() >= 2 {
            let parent = &path[..path.len() - 1];
            let me = &path[path.len() - 1];
            let mut sibs: BTreeSet<String> = names_after(code, "super");
            let qualified = format!("crate::{}", parent.join("::"));
            sibs.extend(names_after(code, &qualified));
            let graph = out.entry(parent.join("/")).or_default();
            let edges = graph.entry(me.clone()).or_default();
            for n in sibs {
                let mut sib = parent.to_vec();
                sib.push(n.clone());
                if &n != me && known.contains(&sib) {
                    edges.insert(n);
                }
            }
        }
    }
    out
}

#[test]
fn engine_modules_have_no_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graphs = graphs(&root);
    let top = &graphs["crate"];
    // The scan sees the layering: the store is built on the WAL, segments, manifest and I/O.
    for low in ["wal", "segment", "manifest", "io", "error"] {
        assert!(
            top["store"].contains(low),
            "store -> {low} not seen: {top:?}"
        );
    }
    for (scope, graph) in &graphs {
        if let Some(cycle) = find_cycle(graph) {
            panic!("module cycle in {scope}: {}", cycle.join(" -> "));
        }
    }
}

/// The scanner finds cycles, through `use` groups and plain paths, and skips comments and
/// strings.
#[test]
fn the_scan_sees_a_cycle() {
    let code = code_only(
        "use crate::{a::X, b};\n/// [`crate::c`]\nlet s = \"crate::d\"; let c = '\"'; fn f<'a>() { crate::e::g() }",
    );
    assert_eq!(
        names_after(&code, "crate"),
        ["a", "b", "e"].map(String::from).into()
    );
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&g), None);
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&g),
        Some(["a", "b", "c", "a"].map(String::from).to_vec())
    );
}
