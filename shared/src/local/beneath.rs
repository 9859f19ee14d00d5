//! File access inside folders an instance (or an archive) controls: every path is walked one
//! component at a time from an open folder with `O_NOFOLLOW`, so no link, whether planted by a
//! component in its command folder or carried by a layer, can take a read, write or delete out
//! of the folder. `..` and absolute paths are refused.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
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

    /// Opens the regular file at `rel` to read (an error for anything else: a device, a FIFO).
    fn open_file(&self, rel: &Path) -> io::Result<(File, PathBuf)> {
        let (dir, name) = self.parent_of(rel, false)?;
        let f = dir.open_at(&name, OFlag::O_RDONLY | OFlag::O_NONBLOCK, 0)?;
        let at = dir.path.join(&name);
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", at.display()),
            ));
        }
        Ok((f, at))
    }

    /// Reads the regular file at `rel`, refused when it holds more than `limit` bytes: what an
    /// instance writes is read into the host's memory.
    pub fn read(&self, rel: &Path, limit: u64) -> io::Result<Vec<u8>> {
        let (f, at) = self.open_file(rel)?;
        let mut out = Vec::new();
        // (The size is checked on what is read, not on the size first seen: the file may grow.)
        f.take(limit + 1).read_to_end(&mut out)?;
        if out.len() as u64 > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is larger than {limit} bytes", at.display()),
            ));
        }
        Ok(out)
    }

    /// The last `limit` bytes of the regular file at `rel` (all of it when shorter), read from
    /// there: a file of any size costs `limit` bytes.
    pub fn read_end(&self, rel: &Path, limit: u64) -> io::Result<Vec<u8>> {
        let (f, _) = self.open_file(rel)?;
        read_end(f, limit)
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

/// How much of the end of a log is read for its tail.
pub const TAIL_READ: u64 = 64 * 1024;

/// The most bytes of an instance's text (a tail, a failure message) that reach a status, a
/// build record or the engine.
pub const TEXT_CAP: usize = 4096;

/// The last `limit` bytes of an open file.
pub fn read_end(mut f: File, limit: u64) -> io::Result<Vec<u8>> {
    let len = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(len.saturating_sub(limit)))?;
    let mut out = Vec::new();
    f.take(limit).read_to_end(&mut out)?;
    Ok(out)
}

/// The last `lines` lines of the file at `rel` under `folder`, from its last [`TAIL_READ`]
/// bytes and at most [`TEXT_CAP`] bytes long (empty when unreadable).
pub fn tail(folder: &Folder, rel: &Path, lines: usize) -> String {
    let text = folder
        .read_end(rel, TAIL_READ)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    crate::ports::cap_text(&last_lines(&text, lines), TEXT_CAP, true)
}

/// The last `lines` lines of the file at `path` (a file kiln names; links followed), read as
/// [`tail`] reads (empty when unreadable).
pub fn tail_of(path: &Path, lines: usize) -> String {
    let text = File::open(path)
        .and_then(|f| read_end(f, TAIL_READ))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    crate::ports::cap_text(&last_lines(&text, lines), TEXT_CAP, true)
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
        assert!(f.read(Path::new("status.json"), 1024).is_err());
        assert!(f.read(Path::new("dir/secret"), 1024).is_err());
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

    #[test]
    fn reads_of_what_an_instance_writes_are_bounded() {
        // GIVEN a 256 MiB sparse log ending in a line, and a report of 2 MiB
        let t = tempfile::tempdir().unwrap();
        let log = File::create(t.path().join("output.log")).unwrap();
        log.set_len(256 << 20).unwrap();
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(t.path().join("output.log"))
            .unwrap();
        log.write_all(b"\nlast line\n").unwrap();
        std::fs::write(t.path().join("report.json"), vec![b' '; 2 << 20]).unwrap();
        std::fs::write(t.path().join("small.json"), b"{}").unwrap();
        let f = Folder::open(t.path()).unwrap();
        // WHEN the host reads them THEN the tail is the end, capped; the big report is refused
        let tail = tail(&f, Path::new("output.log"), 20);
        assert!(tail.len() <= TEXT_CAP + 64, "{}", tail.len());
        assert!(
            tail.ends_with("last line"),
            "{:?}",
            &tail[tail.len() - 20..]
        );
        let err = f.read(Path::new("report.json"), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        // AND what is small passes whole
        assert_eq!(f.read(Path::new("small.json"), 1 << 20).unwrap(), b"{}");
        std::fs::write(t.path().join("short.log"), "one\ntwo\n").unwrap();
        assert_eq!(super::tail(&f, Path::new("short.log"), 20), "one\ntwo");
    }
}
