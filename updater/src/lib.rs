//! Molt live update packages: the signed package format, its manifest, the keyring,
//! requirement checks, and the control protocol spoken between the `updater` CLI and the
//! supervisor's update manager. `docs/live-update.md` describes the formats.
#![forbid(unsafe_code)]

pub mod compatibility;
pub mod control;
pub mod exit;

pub mod keyring;
pub mod manifest;
pub mod package;
pub mod protocol;
pub mod requirements;

pub use compatibility::{check_compatibility, RunningComponent, RunningSystem};
pub use keyring::{Keyring, KeyringError, TrustedKey};
pub use manifest::{Component, ComponentName, Manifest, Nature, RequiredState, Requirements};
pub use package::{Package, PackageError, VerifiedPackage};
pub use protocol::{Event, Outcome, Phase, PhaseState, Request, StatusReport};
pub use requirements::{check_requirements, CheckItem, MachineContext};
