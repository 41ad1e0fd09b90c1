//! What the `fsd` command tests share: running the built binary and reading its output.

use std::path::Path;
use std::process::{Command, Output};

/// Runs the built `fsd` with `args`.
pub fn fsd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fsd"))
        .args(args)
        .output()
        .expect("run fsd")
}

/// Standard output and standard error together, for failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A temporary path as an argument.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}
