//! Molt live update packages.
#![forbid(unsafe_code)]
