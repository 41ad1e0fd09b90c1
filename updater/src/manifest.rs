//! The package manifest: TOML, signed as bytes inside the package (`docs/live-update.md`,
//! "Manifest"). Parsing refuses unknown keys and unknown names; [`Manifest::validate`] holds
//! the rules that serde cannot express.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::requirements::{parse_release, IO_URING_OPS};

/// Deadline for reaching the required state when the manifest names none.
pub(crate) const DEFAULT_DEADLINE_MS: u64 = 5000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub package: PackageInfo,
    #[serde(default, rename = "component", skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<Component>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<FormatChange>,
    #[serde(default, skip_serializing_if = "Requirements::is_empty")]
    pub requirements: Requirements,
    #[serde(default, rename = "file", skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageInfo {
    pub name: String,
    /// Monotonic per installation: the update manager refuses a sequence not above the
    /// last one it applied.
    pub sequence: u64,
    /// Seconds since the Unix epoch after which the package is refused.
    pub expires_unix: u64,
    pub nature: Nature,
    #[serde(default)]
    pub description: String,
    #[serde(default = "yes")]
    pub live: bool,
    /// Why the update cannot be applied live; required when `live = false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default = "default_deadline")]
    pub deadline_ms: u64,
}

fn yes() -> bool {
    true
}

fn default_deadline() -> u64 {
    DEFAULT_DEADLINE_MS
}

/// The update natures of the cooperative live update model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Nature {
    OneComponent,
    Interaction,
    GlobalData,
    GlobalAlgorithm,
    DataOnDisk,
    Hardware,
    NotLive,
}

impl Nature {
    pub const ALL: [Nature; 7] = [
        Nature::OneComponent,
        Nature::Interaction,
        Nature::GlobalData,
        Nature::GlobalAlgorithm,
        Nature::DataOnDisk,
        Nature::Hardware,
        Nature::NotLive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Nature::OneComponent => "one-component",
            Nature::Interaction => "interaction",
            Nature::GlobalData => "global-data",
            Nature::GlobalAlgorithm => "global-algorithm",
            Nature::DataOnDisk => "data-on-disk",
            Nature::Hardware => "hardware",
            Nature::NotLive => "not-live",
        }
    }
}

impl fmt::Display for Nature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The replaceable components.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComponentName {
    Fsd,
    Blockdev,
    /// The supervisor and update manager itself (`fsd mount`'s process).
    Supervisor,
}

impl ComponentName {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentName::Fsd => "fsd",
            ComponentName::Blockdev => "blockdev",
            ComponentName::Supervisor => "supervisor",
        }
    }
}

impl fmt::Display for ComponentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state a component must reach before it is replaced (part of the control protocol).
pub use molt_control::RequiredState;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    pub name: ComponentName,
    /// Running versions this package replaces.
    pub applies_to: Vec<String>,
    pub new_version: String,
    /// Payload path of the new binary.
    pub binary: String,
    /// State schema versions the new binary can import.
    pub state_schema_reads: Vec<u32>,
    /// State schema version the new binary exports.
    pub state_schema_writes: u32,
    #[serde(default)]
    pub required_state: Vec<RequiredState>,
    /// Ring protocol version the new binary speaks, when it matters to the update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_protocol: Option<u32>,
}

/// An on-disk format change, run by the new version's converter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatChange {
    pub from: u32,
    pub to: u32,
}

pub use crate::requirements::Requirements;

/// A payload file. `sha256` and `size` may be left out of an authored manifest:
/// `updater pack` fills them in; a packed manifest must carry both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    #[serde(default)]
    pub sha256: String,
    #[serde(default)]
    pub size: u64,
}

/// Longest payload path, in bytes (the package's `name_len` cap).
pub(crate) const MAX_NAME: usize = 256;

/// A payload path is relative, normalised and plain: no empty, `.` or `..` components, no
/// leading `/`, no NUL or control characters, at most [`MAX_NAME`] bytes.
pub(crate) fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > MAX_NAME {
        return Err(format!("file path {path:?}: must be 1..={MAX_NAME} bytes"));
    }
    if path.starts_with('/') {
        return Err(format!("file path {path:?}: must be relative"));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(format!("file path {path:?}: control character"));
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!("file path {path:?}: empty, '.' or '..' component"));
    }
    Ok(())
}

impl Manifest {
    /// Parses TOML; unknown keys and unknown names are errors. Does not [`validate`].
    ///
    /// [`validate`]: Manifest::validate
    pub fn parse(text: &str) -> Result<Manifest, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    pub(crate) fn to_toml(&self) -> String {
        toml::to_string(self).expect("a manifest always serializes")
    }

    pub fn component(&self, name: ComponentName) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }

    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }

    /// The semantic rules. Does not look at the clock (expiry) or the payload.
    pub fn validate(&self) -> Result<(), String> {
        let p = &self.package;
        if p.name.trim().is_empty() {
            return Err("package.name is empty".into());
        }
        if p.deadline_ms == 0 {
            return Err("package.deadline_ms must be above 0".into());
        }
        let not_live = !p.live || p.nature == Nature::NotLive;
        if not_live && p.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
            return Err(
                "a package that is not live-updatable (live = false or nature = \"not-live\") \
                 must say why in package.reason"
                    .into(),
            );
        }
        if p.nature == Nature::NotLive && p.live {
            return Err("nature \"not-live\" requires live = false".into());
        }

        // Files: unique, plain paths, hashes present.
        let mut paths = BTreeSet::new();
        for f in &self.files {
            check_path(&f.path)?;
            if !paths.insert(f.path.as_str()) {
                return Err(format!("file {:?} is listed twice", f.path));
            }
            if f.sha256.len() != 64
                || !f
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(format!(
                    "file {:?}: sha256 must be 64 lowercase hex digits (run `updater pack`)",
                    f.path
                ));
            }
        }

        // Components.
        if self.components.is_empty() && !not_live {
            return Err("a live package must list at least one [[component]]".into());
        }
        let mut names = BTreeSet::new();
        for c in &self.components {
            if !names.insert(c.name) {
                return Err(format!("component {} is listed twice", c.name));
            }
            if c.applies_to.is_empty() || c.applies_to.iter().any(|v| v.trim().is_empty()) {
                return Err(format!(
                    "component {}: applies_to must list the versions it replaces",
                    c.name
                ));
            }
            if c.new_version.trim().is_empty() {
                return Err(format!("component {}: new_version is empty", c.name));
            }
            if c.state_schema_reads.is_empty() {
                return Err(format!("component {}: state_schema_reads is empty", c.name));
            }
            if !c.state_schema_reads.contains(&c.state_schema_writes) {
                return Err(format!(
                    "component {}: state_schema_reads {:?} must include state_schema_writes {} \
                     (a version must import the state it exports)",
                    c.name, c.state_schema_reads, c.state_schema_writes
                ));
            }
            let mut states = BTreeSet::new();
            for s in &c.required_state {
                if s.filesystem_server_only() && c.name != ComponentName::Fsd {
                    return Err(format!(
                        "component {}: required state {s} is not one this component can reach",
                        c.name
                    ));
                }
                if !states.insert(s.as_str()) {
                    return Err(format!(
                        "component {}: required state {s} is listed twice",
                        c.name
                    ));
                }
            }
            if !paths.contains(c.binary.as_str()) {
                return Err(format!(
                    "component {}: binary {:?} is not a listed [[file]]",
                    c.name, c.binary
                ));
            }
        }
        if names.contains(&ComponentName::Supervisor) && self.components.len() > 1 {
            return Err(
                "the supervisor is replaced alone: a package naming it names no other component"
                    .into(),
            );
        }
        if names.contains(&ComponentName::Supervisor) && self.format.is_some() {
            return Err("a supervisor package converts no on-disk format".into());
        }
        let both = names.contains(&ComponentName::Fsd) && names.contains(&ComponentName::Blockdev);
        match p.nature {
            Nature::Interaction | Nature::GlobalData if !both && !not_live => {
                return Err(format!(
                    "nature \"{}\" must update both components (fsd and blockdev) together",
                    p.nature
                ));
            }
            Nature::OneComponent if self.components.len() != 1 && !not_live => {
                return Err(format!(
                    "nature \"one-component\" must list exactly one component, not {}",
                    self.components.len()
                ));
            }
            Nature::Hardware if self.requirements.is_empty() => {
                return Err("nature \"hardware\" must state its [requirements]".into());
            }
            _ => {}
        }

        // Format change.
        match (&self.format, p.nature) {
            (None, Nature::DataOnDisk) => {
                return Err("nature \"data-on-disk\" requires a [format] section".into());
            }
            (Some(_), n) if n != Nature::DataOnDisk && n != Nature::NotLive => {
                return Err(format!(
                    "a [format] change makes the nature \"data-on-disk\", not \"{n}\""
                ));
            }
            (Some(f), _) if f.to <= f.from => {
                return Err(format!(
                    "format.to ({}) must be above format.from ({})",
                    f.to, f.from
                ));
            }
            _ => {}
        }

        self.requirements.validate()
    }
}

impl Requirements {
    fn validate(&self) -> Result<(), String> {
        if let (Some(lo), Some(hi)) = (self.image_size_min_mib, self.image_size_max_mib) {
            if lo > hi {
                return Err(format!(
                    "requirements: image_size_min_mib {lo} is above image_size_max_mib {hi}"
                ));
            }
        }
        if let Some(k) = &self.kernel_min {
            if parse_release(k).is_none() {
                return Err(format!(
                    "requirements.kernel_min {k:?}: expected a release such as \"5.10\""
                ));
            }
        }
        if let Some(a) = &self.fuse_abi_min {
            if parse_release(a).is_none_or(|v| v.len() != 2) {
                return Err(format!(
                    "requirements.fuse_abi_min {a:?}: expected major.minor such as \"7.31\""
                ));
            }
        }
        for f in &self.cpu_features {
            if f.is_empty()
                || !f
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(format!("requirements.cpu_features: bad flag name {f:?}"));
            }
        }
        for op in &self.io_uring_ops {
            if !IO_URING_OPS.contains(&op.as_str()) {
                return Err(format!(
                    "requirements.io_uring_ops: unknown opcode {op:?} (names as in IORING_OP_*, \
                     lower case, e.g. \"read_fixed\")"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const HASH: &str =
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    pub(crate) fn sample() -> String {
        format!(
            r#"
[package]
name = "blockdev-counters-u64"
sequence = 7
expires_unix = 1830000000
nature = "one-component"
description = "I/O counters widen to 64 bits"

[[component]]
name = "blockdev"
applies_to = ["0.1.0"]
new_version = "0.2.0"
binary = "bin/blockdev"
state_schema_reads = [1, 2]
state_schema_writes = 2
required_state = ["quiescent"]

[requirements]
memory_mib = 64
cpu_features = ["sse4_2"]
kernel_min = "5.10"
io_uring_ops = ["read_fixed", "write_fixed", "fsync"]

[[file]]
path = "bin/blockdev"
sha256 = "{HASH}"
size = 0
"#
        )
    }

    fn edit(f: impl FnOnce(&mut Manifest)) -> Result<(), String> {
        let mut m = Manifest::parse(&sample()).unwrap();
        f(&mut m);
        m.validate()
    }

    #[test]
    fn sample_parses_validates_and_round_trips() {
        let m = Manifest::parse(&sample()).unwrap();
        m.validate().unwrap();
        assert_eq!(m.package.deadline_ms, DEFAULT_DEADLINE_MS);
        assert!(m.package.live);
        assert_eq!(Manifest::parse(&m.to_toml()).unwrap(), m);
    }

    #[test]
    fn unknown_keys_and_names_are_refused() {
        let s = sample();
        for (from, to) in [
            ("sequence = 7", "sequence = 7\ncolour = \"red\""),
            ("one-component", "two-components"),
            ("name = \"blockdev\"", "name = \"kernel\""),
            ("[\"quiescent\"]", "[\"asleep\"]"),
            ("memory_mib = 64", "memory_gib = 1"),
        ] {
            assert!(Manifest::parse(&s.replacen(from, to, 1)).is_err(), "{to}");
        }
    }

    #[test]
    fn a_supervisor_package_replaces_the_supervisor_alone() {
        let alone = edit(|m| m.components[0].name = ComponentName::Supervisor);
        assert_eq!(alone, Ok(()));
        let with_other = edit(|m| {
            let mut sup = m.components[0].clone();
            sup.name = ComponentName::Supervisor;
            m.components.push(sup);
            m.package.nature = Nature::Interaction;
        });
        assert!(with_other.unwrap_err().contains("replaced alone"));
    }

    #[test]
    fn every_nature_name_parses() {
        for n in Nature::ALL {
            let t = sample().replace("\"one-component\"", &format!("\"{n}\""));
            assert_eq!(Manifest::parse(&t).unwrap().package.nature, n);
        }
    }

    #[test]
    fn semantic_errors() {
        type Edit = Box<dyn FnOnce(&mut Manifest)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("not live, no reason", Box::new(|m| m.package.live = false)),
            (
                "not-live nature but live",
                Box::new(|m| {
                    m.package.nature = Nature::NotLive;
                    m.package.reason = Some("x".into());
                }),
            ),
            ("no components", Box::new(|m| m.components.clear())),
            (
                "duplicate component",
                Box::new(|m| {
                    let c = m.components[0].clone();
                    m.components.push(c);
                    m.package.nature = Nature::GlobalAlgorithm;
                }),
            ),
            (
                "fsd-only state on blockdev",
                Box::new(|m| {
                    m.components[0].required_state = vec![RequiredState::EveryOpenFileTouched]
                }),
            ),
            (
                "interaction with one component",
                Box::new(|m| m.package.nature = Nature::Interaction),
            ),
            (
                "global data with one component",
                Box::new(|m| m.package.nature = Nature::GlobalData),
            ),
            (
                "binary not listed",
                Box::new(|m| m.components[0].binary = "bin/other".into()),
            ),
            ("no hash", Box::new(|m| m.files[0].sha256.clear())),
            (
                "upper-case hash",
                Box::new(|m| m.files[0].sha256 = HASH.to_uppercase()),
            ),
            (
                "path escapes",
                Box::new(|m| {
                    m.files[0].path = "../blockdev".into();
                    m.components[0].binary = "../blockdev".into();
                }),
            ),
            (
                "duplicate file",
                Box::new(|m| {
                    let f = m.files[0].clone();
                    m.files.push(f);
                }),
            ),
            (
                "writes not readable",
                Box::new(|m| m.components[0].state_schema_writes = 3),
            ),
            (
                "data-on-disk without format",
                Box::new(|m| m.package.nature = Nature::DataOnDisk),
            ),
            (
                "format with one-component",
                Box::new(|m| m.format = Some(FormatChange { from: 1, to: 2 })),
            ),
            (
                "format backwards",
                Box::new(|m| {
                    m.package.nature = Nature::DataOnDisk;
                    m.format = Some(FormatChange { from: 2, to: 1 });
                }),
            ),
            (
                "hardware without requirements",
                Box::new(|m| {
                    m.package.nature = Nature::Hardware;
                    m.requirements = Requirements::default();
                }),
            ),
            (
                "unknown io_uring op",
                Box::new(|m| m.requirements.io_uring_ops.push("teleport".into())),
            ),
            (
                "bad kernel",
                Box::new(|m| m.requirements.kernel_min = Some("five".into())),
            ),
            (
                "bad fuse abi",
                Box::new(|m| m.requirements.fuse_abi_min = Some("7".into())),
            ),
            (
                "image bounds crossed",
                Box::new(|m| {
                    m.requirements.image_size_min_mib = Some(10);
                    m.requirements.image_size_max_mib = Some(5);
                }),
            ),
            ("zero deadline", Box::new(|m| m.package.deadline_ms = 0)),
        ];
        for (what, f) in cases {
            assert!(edit(f).is_err(), "{what} was accepted");
        }
    }

    #[test]
    fn not_live_with_reason_and_no_components_is_valid() {
        edit(|m| {
            m.package.live = false;
            m.package.reason = Some("changes st_ino of every file".into());
            m.components.clear();
        })
        .unwrap();
    }

    #[test]
    fn interaction_with_both_components_is_valid() {
        edit(|m| {
            m.package.nature = Nature::Interaction;
            let mut c = m.components[0].clone();
            c.name = ComponentName::Fsd;
            c.required_state = vec![RequiredState::EveryOpenFileTouched];
            c.ring_protocol = Some(2);
            m.components.push(c);
        })
        .unwrap();
    }
}
