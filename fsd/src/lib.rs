//! Molt filesystem daemon library.
