//! The layering the module docs promise, checked on the source tree (comments aside):
//! - only `src/api/` knows HTTP: no other file names warp;
//! - `App` is wiring: only `src/app.rs` and `src/app/` implement anything on it;
//! - no domain imports the wiring (`crate::app`) or the HTTP layer (`crate::api`), so there is
//!   no import cycle between them and the domains, and every domain is usable from the CLI.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading src/") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `(file relative to src/, line number, code line)` for every line that is not a comment.
fn code_lines() -> Vec<(String, usize, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    assert!(files.len() > 20, "found only {} source files", files.len());
    let mut lines = Vec::new();
    for file in files {
        let name = file
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            lines.push((name.clone(), i + 1, line.to_string()));
        }
    }
    lines
}

fn offenders(allowed: impl Fn(&str) -> bool, needle: impl Fn(&str) -> bool) -> Vec<String> {
    code_lines()
        .into_iter()
        .filter(|(file, _, line)| !allowed(file) && needle(line))
        .map(|(file, n, line)| format!("src/{file}:{n}: {}", line.trim()))
        .collect()
}

fn in_api(file: &str) -> bool {
    file.starts_with("api/")
}

fn in_wiring(file: &str) -> bool {
    file == "app.rs" || file.starts_with("app/") || file == "main.rs"
}

#[test]
fn only_the_api_layer_knows_warp() {
    let found = offenders(
        |file| in_api(file) || file == "architecture.rs",
        |line| line.contains("warp"),
    );
    assert!(
        found.is_empty(),
        "warp outside src/api/:\n{}",
        found.join("\n")
    );
}

#[test]
fn app_is_wiring_and_nothing_outside_it_extends_it() {
    let found = offenders(
        |file| file == "app.rs" || file.starts_with("app/") || file == "architecture.rs",
        |line| {
            ["impl App {", "impl App<", " for App {", " for App<"]
                .iter()
                .any(|form| line.contains(form))
        },
    );
    assert!(
        found.is_empty(),
        "App extended outside src/app:\n{}",
        found.join("\n")
    );
}

#[test]
fn no_domain_imports_the_wiring_or_the_http_layer() {
    let found = offenders(
        |file| in_api(file) || in_wiring(file) || file == "architecture.rs",
        |line| line.contains("crate::app") || line.contains("crate::api"),
    );
    assert!(
        found.is_empty(),
        "a domain imports crate::app or crate::api:\n{}",
        found.join("\n")
    );
}
