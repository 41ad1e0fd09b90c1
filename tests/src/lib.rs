//! Shared test support for Molt integration tests: the mount harness, a kernel
//! ext4 reference on a loop device, and the stress tool.

#![forbid(unsafe_code)]

pub mod bench;
pub mod ext4;
pub mod harness;
pub mod stress;
