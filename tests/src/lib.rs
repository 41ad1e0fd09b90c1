//! Shared test support for Molt integration tests.

pub mod stress;
