//! Shared test support for Molt integration tests.
