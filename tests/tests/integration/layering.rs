//! The crates' layering, as Cargo sees it (`cargo metadata`): every dependency between
//! workspace crates points down the table in docs/design.md, and the filesystem core links
//! nothing of FUSE, processes or cryptography. A new edge fails here until the table (and
//! this test) say it is meant.

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
    ("fsd-core", &["formats"]),
    ("blockdev", &["molt-sys", "formats"]),
    (
        "fsd-server",
        &["molt-sys", "formats", "fsd-core", "blockdev"],
    ),
    ("updater", &["formats"]),
    (
        "update-manager",
        &[
            "molt-sys",
            "formats",
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
