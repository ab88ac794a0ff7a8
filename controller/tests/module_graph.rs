//! The workspace's modules form layers: no module cycles.
//!
//! Reads every source file of the library crates, collects the `crate::…` and `super::…`
//! paths they name (in `use` trees and in code), and turns each into an edge between two
//! sibling modules: a reference from `a::b::c` to `a::d::e` is an edge `b → d` among the
//! children of `a`. References between a module and its own ancestors or descendants are not
//! layering (a parent declares its children; a child may use its parent's items). Test-only
//! modules (`tests`, or declared under `#[cfg(test)]`) are left out. The test fails on a
//! cycle, naming each edge of it with a file and line that makes it.
//!
//! `cargo test -p sluice-controller --test module_graph -- --nocapture` also prints the graph.
//!
//! Between crates Cargo forbids cycles; the judge crate is also held to being pure (what it
//! may depend on, and no clock, file or network calls in its code).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path inside its crate (`[]` is the crate root).
type Module = Vec<String>;

/// Where an edge comes from: file and line.
type Site = (PathBuf, usize);

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Punct(char),
}

/// Tokens with their line numbers; comments, string, byte-string and char literals removed.
fn lex(text: &str) -> Vec<(Token, usize)> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if chars[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if (c == 'r' || (c == 'b' && at(i + 1) == 'r'))
            && matches!(at(i + usize::from(c == 'b') + 1), '"' | '#')
        {
            // Raw string: r"…", r#"…"#, br"…".
            let mut j = i + usize::from(c == 'b') + 1;
            let mut hashes = 0;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            if at(j) != '"' {
                // `r#ident` (a raw identifier): read as an identifier.
                let start = j;
                while at(j).is_alphanumeric() || at(j) == '_' {
                    j += 1;
                }
                out.push((Token::Ident(chars[start..j].iter().collect()), line));
                i = j;
                continue;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (1..=hashes).all(|k| at(j + k) == '#') {
                    j += 1 + hashes;
                    break;
                }
                if chars[j] == '\n' {
                    line += 1;
                }
                j += 1;
            }
            i = j;
        } else if c == '"' || (c == 'b' && at(i + 1) == '"') {
            i += if c == 'b' { 2 } else { 1 };
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if at(i) == '\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c == '\'' || (c == 'b' && at(i + 1) == '\'') {
            let j = i + if c == 'b' { 1 } else { 0 };
            if at(j + 1) == '\\' {
                // An escaped char literal: up to the closing quote.
                let mut k = j + 3;
                while k < chars.len() && chars[k] != '\'' {
                    k += 1;
                }
                i = k + 1;
            } else if at(j + 2) == '\'' {
                i = j + 3;
            } else {
                // A lifetime or label.
                i = j + 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((Token::Ident(chars[start..i].iter().collect()), line));
        } else if c.is_ascii_digit() {
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                // `1.max(2)` or `0..n` are rare in paths' neighbourhood; numbers never matter here.
                if chars[i] == '.' && !at(i + 1).is_ascii_digit() {
                    break;
                }
                i += 1;
            }
        } else if c == ':' && at(i + 1) == ':' {
            out.push((Token::PathSep, line));
            i += 2;
        } else {
            out.push((Token::Punct(c), line));
            i += 1;
        }
    }
    out
}

fn ident(t: Option<&(Token, usize)>) -> Option<&str> {
    match t {
        Some((Token::Ident(s), _)) => Some(s),
        _ => None,
    }
}

fn punct(t: Option<&(Token, usize)>, c: char) -> bool {
    matches!(t, Some((Token::Punct(p), _)) if *p == c)
}

/// Index just past the balanced `{ … }` group that opens at `open`.
fn skip_group(tokens: &[(Token, usize)], open: usize) -> usize {
    let mut depth = 0;
    let mut i = open;
    while i < tokens.len() {
        if punct(tokens.get(i), '{') {
            depth += 1;
        } else if punct(tokens.get(i), '}') {
            depth -= 1;
            if depth == 0 {
                return i + 1;
            }
        }
        i += 1;
    }
    i
}

/// Whether the attributes just before token `i` include `#[cfg(test)]`.
fn after_cfg_test(tokens: &[(Token, usize)], mut i: usize) -> bool {
    // Skip visibility (`pub`, `pub(crate)`) backwards.
    while i > 0 && (ident(tokens.get(i - 1)) == Some("pub") || punct(tokens.get(i - 1), ')')) {
        if punct(tokens.get(i - 1), ')') {
            while i > 0 && !punct(tokens.get(i - 1), '(') {
                i -= 1;
            }
            i -= 1;
        } else {
            i -= 1;
        }
    }
    // Walk back over attributes `#[ … ]`.
    while i > 0 && punct(tokens.get(i - 1), ']') {
        let end = i - 1;
        let mut depth = 0;
        let mut j = end;
        loop {
            if punct(tokens.get(j), ']') {
                depth += 1;
            } else if punct(tokens.get(j), '[') {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            if j == 0 {
                return false;
            }
            j -= 1;
        }
        let inner: Vec<&str> = tokens[j + 1..end]
            .iter()
            .filter_map(|t| ident(Some(t)))
            .collect();
        if inner.first() == Some(&"cfg") && inner.contains(&"test") && !inner.contains(&"not") {
            return true;
        }
        i = j.saturating_sub(1); // past `#`
    }
    false
}

/// The paths one `use` tree names, starting at token `i` (just after `use`); returns them and
/// the index past the closing `;`.
fn use_tree(tokens: &[(Token, usize)], i: usize) -> (Vec<(Vec<String>, usize)>, usize) {
    fn tree(
        tokens: &[(Token, usize)],
        mut i: usize,
        prefix: &[String],
        out: &mut Vec<(Vec<String>, usize)>,
    ) -> usize {
        let mut path = prefix.to_vec();
        let line = tokens.get(i).map_or(0, |t| t.1);
        loop {
            match tokens.get(i) {
                Some((Token::Ident(s), _)) if s != "as" => {
                    path.push(s.clone());
                    i += 1;
                }
                Some((Token::PathSep, _)) => i += 1,
                Some((Token::Punct('{'), _)) => {
                    i += 1;
                    while !punct(tokens.get(i), '}') && i < tokens.len() {
                        i = tree(tokens, i, &path, out);
                        if punct(tokens.get(i), ',') {
                            i += 1;
                        }
                    }
                    return i + 1;
                }
                Some((Token::Punct('*'), _)) => {
                    out.push((path, line));
                    return i + 1;
                }
                Some((Token::Ident(_), _)) => {
                    // `as alias`
                    out.push((path, line));
                    return i + 2;
                }
                _ => {
                    out.push((path, line));
                    return i;
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut i = tree(tokens, i, &[], &mut out);
    while i < tokens.len() && !punct(tokens.get(i), ';') {
        i += 1;
    }
    (out, i + 1)
}

/// One source file of a crate.
struct File {
    path: PathBuf,
    module: Module,
    tokens: Vec<(Token, usize)>,
}

/// Every file module of the crate rooted at `src` (lib.rs), test-only modules left out.
fn files(src: &Path) -> Vec<File> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    let mut paths = Vec::new();
    walk(src, &mut paths);
    let mut all: Vec<File> = paths
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "main.rs"))
        .filter(|p| !p.strip_prefix(src).unwrap().starts_with("bin"))
        .map(|p| {
            let rel = p.strip_prefix(src).unwrap().with_extension("");
            let module: Module = if rel == Path::new("lib") {
                Vec::new()
            } else {
                rel.iter()
                    .map(|s| s.to_string_lossy().into_owned())
                    .collect()
            };
            let tokens = lex(&std::fs::read_to_string(&p).unwrap());
            File {
                path: p,
                module,
                tokens,
            }
        })
        .collect();
    // Test-only children: `#[cfg(test)] mod x;` and anything named `tests`.
    let mut test_only: BTreeSet<Module> = BTreeSet::new();
    for f in &all {
        for (i, t) in f.tokens.iter().enumerate() {
            if t.0 == Token::Ident("mod".into()) && punct(f.tokens.get(i + 2), ';') {
                if let Some(name) = ident(f.tokens.get(i + 1)) {
                    if name == "tests" || after_cfg_test(&f.tokens, i) {
                        let mut m = f.module.clone();
                        m.push(name.into());
                        test_only.insert(m);
                    }
                }
            }
        }
    }
    all.retain(|f| {
        !f.module.iter().any(|s| s == "tests") && !test_only.iter().any(|t| f.module.starts_with(t))
    });
    all
}

/// The paths a file names that start at `crate`, `super` or `self`, resolved to absolute
/// module paths (item names included), with their lines. Inline `#[cfg(test)]` modules are
/// skipped.
fn references(f: &File) -> Vec<(Vec<String>, usize)> {
    let t = &f.tokens;
    let mut raw = Vec::new();
    let mut i = 0;
    while i < t.len() {
        if ident(t.get(i)) == Some("mod")
            && punct(t.get(i + 2), '{')
            && (after_cfg_test(t, i) || ident(t.get(i + 1)) == Some("tests"))
        {
            i = skip_group(t, i + 2);
            continue;
        }
        if ident(t.get(i)) == Some("use") {
            let (paths, next) = use_tree(t, i + 1);
            raw.extend(paths);
            i = next;
            continue;
        }
        let starts = matches!(ident(t.get(i)), Some("crate" | "super"))
            && t.get(i + 1).is_some_and(|x| x.0 == Token::PathSep)
            && !punct(i.checked_sub(1).and_then(|j| t.get(j)), '$')
            && !t
                .get(i.wrapping_sub(1))
                .is_some_and(|x| x.0 == Token::PathSep);
        if starts {
            let line = t[i].1;
            let mut path = Vec::new();
            let mut j = i;
            while let Some(s) = ident(t.get(j)) {
                path.push(s.to_string());
                if t.get(j + 1).is_some_and(|x| x.0 == Token::PathSep) {
                    j += 2;
                } else {
                    j += 1;
                    break;
                }
            }
            raw.push((path, line));
            i = j;
            continue;
        }
        i += 1;
    }
    raw.into_iter()
        .filter_map(|(path, line)| {
            let mut abs: Vec<String> = match path.first().map(String::as_str) {
                Some("crate") => Vec::new(),
                Some("super") | Some("self") => f.module.clone(),
                _ => return None,
            };
            let mut rest = path.as_slice();
            if rest.first().is_some_and(|s| s == "crate") {
                rest = &rest[1..];
            }
            while let Some(s) = rest.first() {
                match s.as_str() {
                    "super" => {
                        abs.pop()?;
                    }
                    "self" => {}
                    _ => break,
                }
                rest = &rest[1..];
            }
            abs.extend(rest.iter().cloned());
            Some((abs, line))
        })
        .collect()
}

/// Sibling edges per parent module: parent → (from → (to → first site)).
type Graph = BTreeMap<Module, BTreeMap<String, BTreeMap<String, Site>>>;

fn graph(src: &Path) -> Graph {
    let files = files(src);
    let modules: BTreeSet<Module> = files.iter().map(|f| f.module.clone()).collect();
    let mut g = Graph::new();
    for f in &files {
        for (path, line) in references(f) {
            // The deepest file module the path names.
            let target = (0..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|m| modules.contains(m))
                .unwrap_or_default();
            let common = f
                .module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            if common == f.module.len() || common == target.len() {
                continue;
            }
            g.entry(target[..common].to_vec())
                .or_default()
                .entry(f.module[common].clone())
                .or_default()
                .entry(target[common].clone())
                .or_insert((f.path.clone(), line));
        }
    }
    g
}

/// Every cycle found (one per strongly connected group), as the edges that close it.
fn cycles(g: &Graph) -> Vec<String> {
    let mut found = Vec::new();
    for (parent, edges) in g {
        let nodes: BTreeSet<&String> = edges
            .keys()
            .chain(edges.values().flat_map(|m| m.keys()))
            .collect();
        let mut reported: BTreeSet<&String> = BTreeSet::new();
        for start in nodes {
            if reported.contains(start) {
                continue;
            }
            // Breadth-first from `start` back to `start`, keeping predecessors.
            let mut prev: BTreeMap<&String, &String> = BTreeMap::new();
            let mut queue = std::collections::VecDeque::from([start]);
            let mut closed = None;
            while let Some(n) = queue.pop_front() {
                for next in edges.get(n).into_iter().flat_map(|m| m.keys()) {
                    if next == start {
                        closed = Some(n);
                        break;
                    }
                    if !prev.contains_key(next) {
                        prev.insert(next, n);
                        queue.push_back(next);
                    }
                }
                if closed.is_some() {
                    break;
                }
            }
            let Some(mut last) = closed else { continue };
            let mut ring = vec![start];
            while last != start {
                ring.push(last);
                last = prev[last];
            }
            ring.push(start);
            ring.reverse();
            let at = if parent.is_empty() {
                "crate".to_string()
            } else {
                parent.join("::")
            };
            let mut text = format!("cycle among the children of {at}:");
            for w in ring.windows(2) {
                let (file, line) = &edges[w[0]][w[1]];
                text.push_str(&format!(
                    "\n  {} → {} ({}:{line})",
                    w[0],
                    w[1],
                    file.display()
                ));
                reported.insert(w[0]);
            }
            found.push(text);
        }
    }
    found
}

fn print(name: &str, g: &Graph) {
    println!("{name}");
    for (parent, edges) in g {
        let at = if parent.is_empty() {
            "crate".to_string()
        } else {
            parent.join("::")
        };
        for (from, tos) in edges {
            let tos: Vec<&str> = tos.keys().map(String::as_str).collect();
            println!("  {at}: {from} → {}", tos.join(", "));
        }
    }
}

fn crate_src(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(dir)
        .join("src")
}

/// Modules allowed to stay tied in one cycle, per crate: (crate, parent module, modules).
/// Empty: no crate may have a module cycle.
const KNOWN: [(&str, &str, &[&str]); 0] = [];

/// Every module that is part of some cycle, per parent.
fn cyclic(g: &Graph) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (parent, edges) in g {
        for start in edges.keys() {
            let mut seen = BTreeSet::new();
            let mut stack: Vec<&String> = edges[start].keys().collect();
            while let Some(n) = stack.pop() {
                if seen.insert(n) {
                    stack.extend(edges.get(n).into_iter().flat_map(|m| m.keys()));
                }
            }
            if seen.contains(start) {
                out.entry(parent.join("::"))
                    .or_default()
                    .insert(start.clone());
            }
        }
    }
    out
}

const CRATES: [&str; 3] = ["controller", "filter", "judge"];

#[test]
fn no_module_cycles() {
    let mut problems = Vec::new();
    for name in CRATES {
        let g = graph(&crate_src(name));
        print(name, &g);
        let mut known: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (c, parent, modules) in KNOWN {
            if c == name {
                known.insert(
                    parent.to_string(),
                    modules.iter().map(|m| m.to_string()).collect(),
                );
            }
        }
        let found = cyclic(&g);
        if found != known {
            problems.push(format!(
                "{name}: modules in cycles {found:?}, expected {known:?}\n{}",
                cycles(&g).join("\n")
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The checker itself finds a cycle and ignores what is not one.
#[test]
fn finds_a_cycle_between_siblings() {
    let dir = tempfile_dir();
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod a; pub mod b; pub mod c;").unwrap();
    std::fs::write(
        src.join("a.rs"),
        "//! uses crate::c::X in a comment only\npub mod x; pub mod y;\n\
         #[cfg(test)]\nmod tests { use crate::c::Z; }\nconst S: &str = \"crate::c::Y\";\n",
    )
    .unwrap();
    // a::x → b (through a use group), b → a::y (inline path): a cycle a ↔ b at the root.
    std::fs::write(
        src.join("a/x.rs"),
        "use crate::{b::{Thing, other}, a};\nuse super::y;",
    )
    .unwrap();
    std::fs::write(src.join("a/y.rs"), "pub fn f() { super::x::g() }").unwrap();
    std::fs::write(src.join("b.rs"), "fn g() -> crate::a::y::T { todo!() }").unwrap();
    std::fs::write(src.join("c.rs"), "use crate::b::Thing;").unwrap();
    let g = graph(&src);
    let found = cycles(&g);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found
        .iter()
        .any(|c| c.contains("children of crate:") && c.contains("a → b") && c.contains("b → a")));
    // Inside `a`: x uses y (`use super::y`) and y uses x (`super::x::g`).
    assert!(found.iter().any(|c| c.contains("children of a:")));
    // c → b only: not part of a cycle; the comment, string and test module add no edge to c.
    assert!(!g[&Vec::<String>::new()]
        .get("a")
        .is_some_and(|m| m.contains_key("c")));
    assert!(found.iter().all(|c| !c.contains("c →")));
    let nodes = cyclic(&g);
    assert_eq!(
        nodes[""],
        BTreeSet::from(["a".to_string(), "b".to_string()])
    );
    assert_eq!(
        nodes["a"],
        BTreeSet::from(["x".to_string(), "y".to_string()])
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-module-graph-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// What the judge crate may depend on: data formats and statistics, nothing that does I/O,
/// and no Sluice crate but the filter's (for its wording of type errors). A new dependency is
/// a decision: add it here with the reason.
const JUDGE_DEPENDENCIES: [&str; 8] = [
    "sluice-filter",
    "serde",
    "serde_json",
    "serde_path_to_error",
    "thiserror",
    "statrs",
    "humantime",
    "serde-saphyr",
];

/// The names listed in one `[section]` of a Cargo manifest.
fn manifest_section(text: &str, section: &str) -> Vec<String> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == format!("[{section}]");
        } else if inside && !line.is_empty() && !line.starts_with('#') {
            if let Some((name, _)) = line.split_once('=') {
                out.push(name.trim().to_string());
            }
        }
    }
    out
}

#[test]
fn the_judge_crate_stays_pure() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest = std::fs::read_to_string(root.join("judge/Cargo.toml")).unwrap();
    let deps = manifest_section(&manifest, "dependencies");
    assert!(deps.iter().any(|d| d == "statrs"), "{deps:?}");
    let extra: Vec<&String> = deps
        .iter()
        .filter(|d| !JUDGE_DEPENDENCIES.contains(&d.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "judge/Cargo.toml: not a pure dependency: {extra:?}"
    );
    // Time, files, network and the environment reach the judge only as data.
    let impure = [
        "SystemTime",
        "Instant",
        "std::fs",
        "std::net",
        "std::env",
        "std::io",
    ];
    let mut found = Vec::new();
    for f in files(&crate_src("judge")) {
        let idents: Vec<&str> = f.tokens.iter().filter_map(|t| ident(Some(t))).collect();
        let paths: Vec<String> = f
            .tokens
            .windows(3)
            .filter_map(|w| match w {
                [(Token::Ident(a), line), (Token::PathSep, _), (Token::Ident(b), _)] => {
                    Some(format!("{a}::{b}:{line}"))
                }
                _ => None,
            })
            .collect();
        for name in impure {
            if !name.contains("::") && idents.contains(&name) {
                found.push(format!("{}: {name}", f.path.display()));
            }
            for p in paths.iter().filter(|p| p.starts_with(&format!("{name}:"))) {
                found.push(format!("{}: {p}", f.path.display()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "the judge does I/O or reads a clock: {found:?}"
    );
}

/// The manifest reader sees only its own section.
#[test]
fn manifest_sections_are_read_alone() {
    let text = "[package]\nname = \"x\"\n[dependencies]\n# why\nserde = \"1\"\n\
                tokio = { workspace = true }\n[dev-dependencies]\nrand = \"0.10\"\n";
    assert_eq!(manifest_section(text, "dependencies"), ["serde", "tokio"]);
    assert_eq!(manifest_section(text, "dev-dependencies"), ["rand"]);
}
