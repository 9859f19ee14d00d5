//! File access inside folders an instance (or an archive) controls: every path is walked one
//! component at a time from an open folder with `O_NOFOLLOW`, so no link, whether planted by a
//! component in its command folder or carried by a layer, can take a read, write or delete out
//! of the folder. `..` and absolute paths are refused.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

pub use crate::relpath::components;

fn no_links(at: &Path, e: Errno) -> io::Error {
    match e {
        Errno::ELOOP | Errno::ENOTDIR => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is a symbolic link or not a folder", at.display()),
        ),
        e => io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", at.display())),
    }
}

const DIR_FLAGS: OFlag = OFlag::O_DIRECTORY
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC)
    .union(OFlag::O_RDONLY);

/// Whether a `stat` result is a folder.
pub fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// An open folder; everything below it is reached without following links.
#[derive(Debug)]
pub struct Folder {
    fd: OwnedFd,
    /// For messages only.
    path: PathBuf,
}

impl AsFd for Folder {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Folder {
    /// Opens `path`, a folder kiln itself named (its own links are followed).
    pub fn open(path: &Path) -> io::Result<Folder> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
            Mode::empty(),
        )
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("{}: {e}", path.display()),
            )
        })?;
        Ok(Folder {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The folder `name` directly in this one, created (mode 0755) when `create` and missing.
    pub fn child(&self, name: &OsStr, create: bool) -> io::Result<Folder> {
        let at = self.path.join(name);
        match openat(&self.fd, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => Ok(Folder { fd, path: at }),
            Err(Errno::ENOENT) if create => {
                match mkdirat(&self.fd, name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(no_links(&at, e)),
                }
                openat(&self.fd, name, DIR_FLAGS, Mode::empty())
                    .map(|fd| Folder {
                        fd,
                        path: at.clone(),
                    })
                    .map_err(|e| no_links(&at, e))
            }
            Err(e) => Err(no_links(&at, e)),
        }
    }

    /// The folder at `rel` below this one (folders created when `create`).
    pub fn sub(&self, rel: &Path, create: bool) -> io::Result<Folder> {
        let mut here = self.reopen()?;
        for c in components(rel)? {
            here = here.child(&c, create)?;
        }
        Ok(here)
    }

    fn reopen(&self) -> io::Result<Folder> {
        Ok(Folder {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// The folder holding `rel` and the last component's name.
    pub fn parent_of(&self, rel: &Path, create: bool) -> io::Result<(Folder, OsString)> {
        let mut parts = components(rel)?;
        let name = parts.pop().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "an empty path names no file")
        })?;
        let mut here = self.reopen()?;
        for c in parts {
            here = here.child(&c, create)?;
        }
        Ok((here, name))
    }

    /// What `name` is, without following it; `None` when it does not exist.
    pub fn stat(&self, name: &OsStr) -> io::Result<Option<FileStat>> {
        match fstatat(&self.fd, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(s) => Ok(Some(s)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(no_links(&self.path.join(name), e)),
        }
    }

    /// Opens the file `name` of this folder with `flags` (`O_NOFOLLOW` added).
    pub fn open_at(&self, name: &OsStr, flags: OFlag, mode: u32) -> io::Result<File> {
        openat(
            &self.fd,
            name,
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map(File::from)
        .map_err(|e| no_links(&self.path.join(name), e))
    }

    /// Reads the regular file at `rel`.
    pub fn read(&self, rel: &Path) -> io::Result<Vec<u8>> {
        let (dir, name) = self.parent_of(rel, false)?;
        let mut f = dir.open_at(&name, OFlag::O_RDONLY | OFlag::O_NONBLOCK, 0)?;
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", dir.path.join(&name).display()),
            ));
        }
        let mut out = Vec::new();
        f.read_to_end(&mut out)?;
        Ok(out)
    }

    /// Opens the file at `rel` to append to (created when missing).
    pub fn append(&self, rel: &Path) -> io::Result<File> {
        let (dir, name) = self.parent_of(rel, true)?;
        let f = dir.open_at(
            &name,
            OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT | OFlag::O_NONBLOCK,
            0o644,
        )?;
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", dir.path.join(&name).display()),
            ));
        }
        Ok(f)
    }

    /// Replaces the file at `rel` with `bytes`: written to a new file, renamed over it (a link
    /// in its place is replaced, never followed).
    pub fn write(&self, rel: &Path, bytes: &[u8]) -> io::Result<()> {
        let (dir, name) = self.parent_of(rel, true)?;
        let mut tmp = OsString::from(".kiln-");
        tmp.push(uuid::Uuid::new_v4().simple().to_string());
        let mut f = dir.open_at(
            &tmp,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            0o644,
        )?;
        let written = f.write_all(bytes).and_then(|()| f.flush());
        drop(f);
        let renamed = written.and_then(|()| {
            nix::fcntl::renameat(&dir.fd, tmp.as_os_str(), &dir.fd, name.as_os_str())
                .map_err(io::Error::from)
        });
        if renamed.is_err() {
            let _ = unlinkat(&dir.fd, tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
        renamed
    }

    /// Removes `name` from this folder, with everything under it when it is a folder; links
    /// are removed, never followed. A missing name is fine.
    pub fn remove(&self, name: &OsStr) -> io::Result<()> {
        let Some(st) = self.stat(name)? else {
            return Ok(());
        };
        if is_dir(&st) {
            let sub = self.child(name, false)?;
            sub.clear()?;
            unlinkat(&self.fd, name, UnlinkatFlags::RemoveDir)
        } else {
            unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir)
        }
        .or_else(|e| if e == Errno::ENOENT { Ok(()) } else { Err(e) })
        .map_err(|e| no_links(&self.path.join(name), e))
    }

    /// The names in this folder.
    fn names(&self) -> io::Result<Vec<OsString>> {
        let dir = nix::dir::Dir::from_fd(self.fd.try_clone()?).map_err(io::Error::from)?;
        let mut out = Vec::new();
        let mut dir = dir;
        for e in dir.iter() {
            let e = e.map_err(io::Error::from)?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                out.push(OsStr::from_bytes(n).to_os_string());
            }
        }
        // fdopendir shares the offset with the fd this one was cloned from: rewind it.
        nix::unistd::lseek(&self.fd, 0, nix::unistd::Whence::SeekSet).map_err(io::Error::from)?;
        Ok(out)
    }

    /// Removes everything in this folder.
    pub fn clear(&self) -> io::Result<()> {
        for n in self.names()? {
            self.remove(&n)?;
        }
        Ok(())
    }
}

/// The last `lines` lines of the file at `rel` under `folder` (empty when unreadable).
pub fn tail(folder: &Folder, rel: &Path, lines: usize) -> String {
    let text = folder
        .read(rel)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    last_lines(&text, lines)
}

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_planted_in_a_folder_are_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "host").unwrap();
        let inside = t.path().join("inside");
        std::fs::create_dir(&inside).unwrap();
        symlink(outside.join("secret"), inside.join("status.json")).unwrap();
        symlink(&outside, inside.join("dir")).unwrap();
        symlink(outside.join("log"), inside.join("output.log")).unwrap();
        let f = Folder::open(&inside).unwrap();

        // a read through a link is refused, a read under a linked folder too
        assert!(f.read(Path::new("status.json")).is_err());
        assert!(f.read(Path::new("dir/secret")).is_err());
        // an append does not create the link's target
        assert!(f.append(Path::new("output.log")).is_err());
        assert!(!outside.join("log").exists());
        // a write replaces the link itself
        f.write(Path::new("status.json"), b"{}").unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.join("secret")).unwrap(),
            "host"
        );
        assert_eq!(
            std::fs::read_to_string(inside.join("status.json")).unwrap(),
            "{}"
        );
        // a write under a linked folder is refused
        assert!(f.write(Path::new("dir/new"), b"x").is_err());
        assert!(!outside.join("new").exists());
        // removing a linked folder removes the link only
        f.remove(OsStr::new("dir")).unwrap();
        assert!(outside.join("secret").exists());
        assert!(f.sub(Path::new("../outside"), false).is_err());
    }
}
