//! The house rule of `signetd/src`, read from the code's own `crate::` paths: imports
//! only go down the layers (fronts → services → adapters → config → core), and no
//! module imports one that imports it back, directly or around a circle.
//!
//! A module's own unit tests (`#[cfg(test)] mod tests`) are not part of the house and
//! are not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers from the bottom up: a module may import its own layer and those below.
const LAYERS: [&str; 5] = ["core", "config", "adapters", "services", "fronts"];

/// Every module of the crate (`core::policy`, `fronts::web::pages`, …) and its source.
fn modules(src: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if path.is_dir() {
                let mut p = prefix.to_vec();
                p.push(name);
                walk(&path, &p, out);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let mut p = prefix.to_vec();
                if stem != "mod" {
                    p.push(stem.to_owned());
                }
                let text = std::fs::read_to_string(&path).expect("a source file");
                out.insert(p.join("::"), text);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, &[], &mut out);
    out
}

/// The code of a file: comments and its unit tests left out.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths written after `crate::` or `super::` at `rest`: one, or each of a `{…}` group.
fn paths(rest: &str) -> Vec<Vec<&str>> {
    fn ident(s: &str) -> Vec<&str> {
        s.trim_start()
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .next()
            .unwrap_or_default()
            .split("::")
            .filter(|s| !s.is_empty())
            .collect()
    }
    match rest.strip_prefix('{') {
        Some(group) => group[..group.find('}').unwrap_or(group.len())]
            .split(',')
            .map(ident)
            .collect(),
        None => vec![ident(rest)],
    }
}

/// The crate's modules `module` names through `crate::…` and `super::…` paths.
fn imports(module: &str, text: &str, all: &BTreeMap<String, String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let code = code(text);
    let own: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
    for anchor in ["crate::", "super::"] {
        let mut rest = code.as_str();
        while let Some(i) = rest.find(anchor) {
            let before = rest[..i].chars().last();
            rest = &rest[i + anchor.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue; // `super::super::…` is read from its first `super`
            }
            let mut base: Vec<&str> = Vec::new();
            let mut tail = rest;
            if anchor == "super::" {
                base = own[..own.len().saturating_sub(1)].to_vec();
                while let Some(t) = tail.strip_prefix("super::") {
                    base.pop();
                    tail = t;
                }
            }
            for path in paths(tail) {
                let mut full = base.clone();
                full.extend(path);
                // The longest prefix that is a module of the crate.
                for n in (1..=full.len()).rev() {
                    let name = full[..n].join("::");
                    if all.contains_key(&name) {
                        if name != module {
                            out.insert(name);
                        }
                        break;
                    }
                }
            }
        }
    }
    out
}

fn layer(module: &str) -> Option<usize> {
    let top = module.split("::").next()?;
    LAYERS.iter().position(|l| *l == top)
}

#[test]
fn imports_only_go_down_and_close_no_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let all = modules(&src);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut upward = Vec::new();
    for (module, text) in &all {
        if module == "lib" || module == "main" {
            continue; // lib.rs and the binary stand above the layers
        }
        let Some(own) = layer(module) else {
            panic!("src/{module}: every module belongs to one of the layers {LAYERS:?}");
        };
        let to = imports(module, text, &all);
        for t in &to {
            if let Some(their) = layer(t) {
                if their > own {
                    upward.push(format!(
                        "{module} ({}) imports {t} ({})",
                        LAYERS[own], LAYERS[their]
                    ));
                }
            }
        }
        graph.insert(module.clone(), to);
    }
    assert!(
        upward.is_empty(),
        "imports that run up the layers:\n{}",
        upward.join("\n")
    );

    // Circles: a module that reaches itself.
    let mut circles = Vec::new();
    for start in graph.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
        while let Some((at, path)) = stack.pop() {
            for next in graph.get(&at).into_iter().flatten() {
                if next == start {
                    circles.push(format!("{} -> {start}", path.join(" -> ")));
                } else if seen.insert(next.clone()) {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push((next.clone(), p));
                }
            }
        }
    }
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_rule_sees_an_upward_import_and_a_circle() {
    let mut all = BTreeMap::new();
    all.insert(
        "core::a".to_owned(),
        "use crate::services::b::X;\n".to_owned(),
    );
    all.insert(
        "services::b".to_owned(),
        "use super::{c, d::E};\n// use crate::fronts::z;\n".to_owned(),
    );
    all.insert("services::d".to_owned(), String::new());
    all.insert(
        "services::c".to_owned(),
        "fn f() { crate::services::b::g() }\n".to_owned(),
    );
    all.insert("fronts::z".to_owned(), String::new());
    let a = imports("core::a", &all["core::a"], &all);
    assert_eq!(a, BTreeSet::from(["services::b".to_owned()]));
    assert!(layer("services::b") > layer("core::a"));
    let b = imports("services::b", &all["services::b"], &all);
    assert_eq!(
        b,
        BTreeSet::from(["services::c".to_owned(), "services::d".to_owned()]),
        "comments are not imports"
    );
    let c = imports("services::c", &all["services::c"], &all);
    assert_eq!(c, BTreeSet::from(["services::b".to_owned()]));
}
