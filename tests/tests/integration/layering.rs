//! The crates' layering, as Cargo sees it (`cargo metadata`): every dependency between
//! workspace crates points down the table in docs/design.md, and the filesystem core links
//! nothing of FUSE, processes or cryptography. A new edge fails here until the table (and
//! this test) say it is meant. And `unsafe` is written only in molt-sys and in the block
//! driver's ring, I/O engines and buffers: anywhere else it fails here, naming the line.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Normal (non-dev) dependencies of every workspace package.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let mut deps = BTreeMap::new();
    for p in meta["packages"].as_array().expect("packages") {
        let names = p["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .filter(|d| d["kind"].is_null())
            .map(|d| d["name"].as_str().expect("name").to_string())
            .collect();
        deps.insert(p["name"].as_str().expect("name").to_string(), names);
    }
    deps
}

/// Each workspace crate, bottom first, with the workspace crates it may use.
const LAYERS: &[(&str, &[&str])] = &[
    ("molt-sys", &[]),
    ("formats", &[]),
    ("molt-control", &["formats"]),
    ("fsd-core", &["formats"]),
    ("blockdev", &["molt-sys", "formats", "molt-control"]),
    ("molt-fuse", &["molt-sys"]),
    (
        "fsd-server",
        &[
            "molt-sys",
            "formats",
            "molt-control",
            "fsd-core",
            "blockdev",
            "molt-fuse",
        ],
    ),
    ("updater", &["molt-sys", "formats", "molt-control"]),
    (
        "update-manager",
        &[
            "molt-sys",
            "formats",
            "molt-control",
            "fsd-core",
            "fsd-server",
            "blockdev",
            "updater",
        ],
    ),
    (
        "fsd",
        &[
            "molt-sys",
            "formats",
            "fsd-core",
            "fsd-server",
            "update-manager",
            "blockdev",
        ],
    ),
    (
        "molt-tests",
        &[
            "molt-sys",
            "formats",
            "blockdev",
            "fsd-server",
            "update-manager",
        ],
    ),
];

#[test]
fn workspace_crates_depend_only_downwards() {
    let deps = dependencies();
    let workspace: BTreeSet<&str> = LAYERS.iter().map(|(n, _)| *n).collect();
    for name in deps.keys() {
        assert!(
            workspace.contains(name.as_str()),
            "crate {name} is not in the layering table"
        );
    }
    for (name, allowed) in LAYERS {
        let uses: BTreeSet<&str> = deps[*name]
            .iter()
            .map(String::as_str)
            .filter(|d| workspace.contains(d))
            .collect();
        let extra: Vec<&&str> = uses.iter().filter(|d| !allowed.contains(d)).collect();
        assert!(extra.is_empty(), "{name} must not depend on {extra:?}");
    }
}

#[test]
fn the_filesystem_core_links_no_fuse_no_processes_no_crypto() {
    let deps = dependencies();
    let allowed = [
        "formats",
        "thiserror",
        "libc",
        "crc32fast",
        "serde",
        "serde_json",
    ];
    let extra: Vec<&String> = deps["fsd-core"]
        .iter()
        .filter(|d| !allowed.contains(&d.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "fsd-core gained dependencies {extra:?}; it holds the filesystem only"
    );
}

#[test]
fn the_filesystem_server_links_no_crypto_and_no_package_code() {
    let deps = dependencies();
    for name in ["fsd-core", "fsd-server", "blockdev"] {
        let bad: Vec<&String> = deps[name]
            .iter()
            .filter(|d| {
                ["updater", "ed25519-dalek", "sha2", "toml", "indicatif"].contains(&d.as_str())
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{name} must not link {bad:?}: packages are the update manager's business"
        );
    }
}

/// Where `unsafe` may be written: the system-call wrappers, and the block driver's
/// shared-memory ring, I/O engines and buffers (paths from the workspace root).
const UNSAFE_ALLOWED: &[&str] = &[
    "blockdev/sys/",
    "blockdev/src/ring/",
    "blockdev/src/engine/",
    "blockdev/src/buffer.rs",
    "fsd/fuse/src/transport/uring.rs",
];

/// The lines (1-based) of `src` where the keyword `unsafe` appears as code: comments,
/// string and character literals are skipped, and identifiers that merely contain the
/// word (`unsafe_code` in a lint attribute) do not count.
fn unsafe_lines(src: &str) -> Vec<usize> {
    let c: Vec<char> = src.chars().collect();
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    // Advances over `c[i]`, counting lines.
    let step = |i: &mut usize, line: &mut usize| {
        if c[*i] == '\n' {
            *line += 1;
        }
        *i += 1;
    };
    while i < c.len() {
        let rest = &c[i..];
        if rest.starts_with(&['/', '/']) {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if rest.starts_with(&['/', '*']) {
            let mut depth = 0;
            while i < c.len() {
                if c[i..].starts_with(&['/', '*']) {
                    depth += 1;
                    i += 2;
                } else if c[i..].starts_with(&['*', '/']) {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    step(&mut i, &mut line);
                }
            }
        } else if c[i] == 'r'
            && (i == 0 || !ident(c[i - 1]))
            && matches!(rest.get(1), Some('"' | '#'))
        {
            // A raw string: r"..." or r#"..."# (also after b or c, which are skipped as
            // identifier characters below and then land here).
            let mut j = i + 1;
            let mut hashes = 0;
            while j < c.len() && c[j] == '#' {
                hashes += 1;
                j += 1;
            }
            if j < c.len() && c[j] == '"' {
                j += 1;
                loop {
                    if j >= c.len() {
                        break;
                    }
                    if c[j] == '"'
                        && c[j + 1..]
                            .iter()
                            .take(hashes)
                            .filter(|&&h| h == '#')
                            .count()
                            == hashes
                    {
                        j += 1 + hashes;
                        break;
                    }
                    if c[j] == '\n' {
                        line += 1;
                    }
                    j += 1;
                }
                i = j;
            } else {
                i += 1;
            }
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                if i < c.len() {
                    step(&mut i, &mut line);
                }
            }
            i += 1;
        } else if c[i] == '\'' {
            // A character literal ('x', '\n', '\''), or a lifetime or label ('a).
            if rest.get(1) == Some(&'\\') {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if rest.get(2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if ident(c[i]) {
            let start = i;
            while i < c.len() && ident(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            if word == "unsafe" {
                out.push(line);
            }
            // `r` of a raw string right after `b` or `c`: let the next turn see it.
            if (word == "br" || word == "cr") && matches!(c.get(i), Some('"' | '#')) {
                i -= 1;
            }
        } else {
            step(&mut i, &mut line);
        }
    }
    out
}

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {dir:?}: {e}"))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "target" || name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            rust_files(&p, out);
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

#[test]
fn the_unsafe_scan_sees_code_and_not_words() {
    let src = "// unsafe\n/* unsafe /* nested */ unsafe */ let s = \"unsafe\";\n\
               #![forbid(unsafe_code)]\nlet r = r#\"unsafe \"# ; let c = 'u';\n\
               fn f<'a>(x: &'a u8) { unsafe { g() } }\nunsafe impl Send for X {}\n";
    assert_eq!(unsafe_lines(src), vec![5, 6]);
}

#[test]
fn unsafe_code_lives_only_in_the_named_places() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let mut files = Vec::new();
    rust_files(root, &mut files);
    assert!(files.len() > 50, "found only {} .rs files", files.len());
    let mut found = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(root).expect("under the root");
        let rel = rel.to_string_lossy();
        if UNSAFE_ALLOWED.iter().any(|a| rel.starts_with(a)) {
            continue;
        }
        let src = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("reading {f:?}: {e}"));
        found.extend(unsafe_lines(&src).into_iter().map(|l| format!("{rel}:{l}")));
    }
    assert!(
        found.is_empty(),
        "unsafe code outside {UNSAFE_ALLOWED:?} (system calls belong in molt-sys, \
         blockdev/sys/):\n{}",
        found.join("\n")
    );
}
