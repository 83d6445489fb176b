//! The library's source files, for the tests that read the code itself (`docs.rs`: every
//! module is in the README; `layers.rs`: no import cycle, no import up the layers).

use std::path::{Path, PathBuf};

/// The two library crates' source roots: the agent and its core crate without AWS.
pub const LIBRARY_ROOTS: &[&str] = &["agent/src", "agent/core/src"];

/// One `.rs` file of a library crate.
#[derive(Debug, Clone)]
pub struct LibraryFile {
    /// The file, relative to the repository.
    pub file: PathBuf,
    /// Its module path: `["daemon", "receive"]`; empty for a crate root (`lib.rs`).
    pub module: Vec<String>,
}

/// Every `.rs` file under [`LIBRARY_ROOTS`] but the binaries (`bin/`, `main.rs`) and unit-test
/// files (`tests.rs`), with its module path (`x/mod.rs` is `x`).
pub fn library_files(root: &Path) -> Vec<LibraryFile> {
    let mut files = Vec::new();
    for source_root in LIBRARY_ROOTS {
        let src = root.join(source_root);
        let mut stack = vec![src.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            {
                let path = entry.expect("directory entry").path();
                let relative = path.strip_prefix(&src).expect("under the source root");
                if path.is_dir() {
                    if relative != Path::new("bin") {
                        stack.push(path);
                    }
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") || relative == Path::new("main.rs") {
                    continue;
                }
                // A module's unit tests (`#[cfg(test)] mod tests;`) are no part of the library.
                if path.file_name().is_some_and(|n| n == "tests.rs") {
                    continue;
                }
                let mut module: Vec<String> = relative
                    .with_extension("")
                    .iter()
                    .map(|s| s.to_string_lossy().into_owned())
                    .collect();
                if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                    module.pop();
                }
                let file = path
                    .strip_prefix(root)
                    .expect("under the root")
                    .to_path_buf();
                files.push(LibraryFile { file, module });
            }
        }
    }
    files
}
