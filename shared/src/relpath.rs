//! Relative paths that come from data (archive entries, object keys, names an instance wrote):
//! split into their components with `..` refused, so joining them to a folder stays in it. Used
//! by the embedded host (`local::beneath`) and by kiln-agent (S3Download's keys), which does not
//! build the `local` feature.

use std::ffi::OsString;
use std::io;
use std::path::{Component, Path};

/// The components of a relative path (`.` dropped); an error for `..` or a root.
pub fn components(rel: &Path) -> io::Result<Vec<OsString>> {
    let mut out = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::CurDir => {}
            // A leading `/` in an archive names the same place as none.
            Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} leaves its folder (`..`)", rel.display()),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_dot_anywhere_is_refused_and_the_rest_is_split() {
        assert!(components(Path::new("a/../b")).is_err());
        assert!(components(Path::new("../../escape")).is_err());
        assert_eq!(
            components(Path::new("/a/./b/c")).expect("plain"),
            ["a", "b", "c"]
        );
        // `..` inside a name is a name.
        assert_eq!(
            components(Path::new("a..b/..c")).expect("names"),
            ["a..b", "..c"]
        );
    }
}
