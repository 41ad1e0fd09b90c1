//! Shared test support for Molt integration tests: the mount harness and the stress tool.

pub mod bench;
pub mod harness;
pub mod stress;
