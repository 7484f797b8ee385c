//! Tidy checks (in the spirit of rust-analyzer's `tidy.rs`): the layout's
//! boundaries and size limits, checked on the source text so a change that
//! crosses a boundary fails CI instead of waiting for a reviewer.

use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, recursively, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The file's code without its `#[cfg(test)]` module (unit tests may be long).
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("\n#[cfg(test)]\nmod tests") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn rel(path: &Path) -> String {
    path.strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")))
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Which modules each folder may not use: the boundaries ARCHITECTURE.md
/// describes. `claude/` is driven with plain values; `broker/` and
/// `client/` know nothing of the worker; `protocol` and `config` are leaves.
#[test]
fn module_boundaries_hold() {
    let rules: &[(&str, &[&str])] = &[
        (
            "claude",
            &[
                "crate::store",
                "crate::broker",
                "crate::worker",
                "crate::client",
                "lapin",
                "sqlx",
                "rusqlite",
            ],
        ),
        (
            "broker",
            &[
                "crate::store",
                "crate::worker",
                "crate::claude",
                "crate::client",
                "sqlx",
                "rusqlite",
            ],
        ),
        (
            "client",
            &[
                "crate::store",
                "crate::worker",
                "crate::claude",
                "sqlx",
                "rusqlite",
            ],
        ),
        (
            "store",
            &[
                "crate::broker",
                "crate::worker",
                "crate::claude",
                "crate::client",
                "lapin",
            ],
        ),
        ("protocol.rs", &["crate::", "lapin", "sqlx", "rusqlite"]),
        (
            "ops",
            &[
                "crate::store",
                "crate::worker",
                "crate::broker",
                "crate::client",
                "lapin",
                "sqlx",
                "rusqlite",
            ],
        ),
        (
            "relay",
            &[
                "crate::store",
                "crate::worker",
                "crate::claude",
                "crate::broker::publish",
                "sqlx",
                "rusqlite",
            ],
        ),
    ];
    let mut violations = Vec::new();
    for (folder, forbidden) in rules {
        let path = src().join(folder);
        let files = if path.is_dir() {
            rust_files(&path)
        } else if path.exists() {
            vec![path]
        } else {
            continue;
        };
        for file in files {
            for (n, line) in code_of(&file).lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for f in forbidden.iter() {
                    if code.contains(f) {
                        violations.push(format!(
                            "{}:{}: uses `{f}`: {}",
                            rel(&file),
                            n + 1,
                            line.trim()
                        ));
                    }
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layout boundaries crossed:\n{}",
        violations.join("\n")
    );
}

/// The files a turn runs through: small files and short functions, so the
/// next feature (budgets, permission prompts, lifecycle events) lands in a
/// stage of its own instead of growing one function.
fn turn_path() -> Vec<PathBuf> {
    let mut files = rust_files(&src().join("worker/turn"));
    files.extend(rust_files(&src().join("claude")));
    for f in ["worker/schedule.rs", "worker/lease.rs", "broker/publish.rs"] {
        let p = src().join(f);
        if p.exists() {
            files.push(p);
        }
    }
    files
}

const MAX_FILE_LINES: usize = 400;
const MAX_FN_LINES: usize = 80;

#[test]
fn turn_path_files_are_short() {
    let long: Vec<String> = turn_path()
        .iter()
        .map(|f| (rel(f), code_of(f).lines().count()))
        .filter(|(_, n)| *n > MAX_FILE_LINES)
        .map(|(f, n)| format!("{f}: {n} lines (limit {MAX_FILE_LINES}, unit tests excluded)"))
        .collect();
    assert!(long.is_empty(), "{}", long.join("\n"));
}

/// Functions longer than the limit, found by indentation: a line that
/// starts a `fn` item, up to the closing brace at the same indentation.
fn long_functions(path: &Path) -> Vec<String> {
    let code = code_of(path);
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let is_fn = [
            "fn ",
            "pub fn ",
            "async fn ",
            "pub async fn ",
            "pub(crate) fn ",
            "pub(crate) async fn ",
        ]
        .iter()
        .any(|p| trimmed.starts_with(p));
        if !is_fn || trimmed.ends_with(';') {
            continue;
        }
        let close = format!("{}}}", " ".repeat(indent));
        if let Some(len) = lines[i + 1..].iter().position(|l| *l == close) {
            if len + 2 > MAX_FN_LINES {
                let name = trimmed.split('(').next().unwrap_or(trimmed);
                out.push(format!(
                    "{}:{}: `{name}` is {} lines",
                    rel(path),
                    i + 1,
                    len + 2
                ));
            }
        }
    }
    out
}

#[test]
fn turn_path_functions_are_short() {
    let long: Vec<String> = turn_path().iter().flat_map(|f| long_functions(f)).collect();
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_turn_path_needs_no_unreachable() {
    let hits: Vec<String> = turn_path()
        .iter()
        .flat_map(|f| {
            code_of(f)
                .lines()
                .enumerate()
                .filter(|(_, l)| l.contains("unreachable!("))
                .map(|(n, _)| format!("{}:{}", rel(f), n + 1))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        hits.is_empty(),
        "`unreachable!` on the turn path: {}",
        hits.join(", ")
    );
}

/// The only place that starts processes is `claude/` (and `worker/mod.rs`'s
/// `claude --version` check goes through `claude::command`).
#[test]
fn only_claude_spawns_processes() {
    let mut hits = Vec::new();
    for file in rust_files(&src()) {
        let r = rel(&file);
        if r.starts_with("src/claude/") || r.starts_with("src/bin/") {
            continue;
        }
        for (n, line) in code_of(&file).lines().enumerate() {
            if line.contains("Command::new(") {
                hits.push(format!("{r}:{}", n + 1));
            }
        }
    }
    assert!(
        hits.is_empty(),
        "processes spawned outside src/claude: {}",
        hits.join(", ")
    );
}
