//! Image layers: a folder to a tar+zstd blob (overlay whiteouts turned into the OCI form), and a
//! blob back to a folder (OCI whiteouts turned into overlay whiteouts, or applied as deletions).

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{makedev, mknodat, Mode, SFlag};
use nix::unistd::{Gid, Uid};
use sha2::{Digest, Sha256};

use super::beneath::{self, Folder};
use std::os::fd::AsFd;

const OPAQUE_XATTRS: [&str; 2] = ["trusted.overlay.opaque", "user.overlay.opaque"];
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// A writer that hashes and counts what passes through.
#[derive(Debug)]
pub struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Hashing<W> {
    pub fn new(inner: W) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// `sha256:<hex>` and the byte count, and the inner writer.
    pub fn finish(self) -> (String, u64, W) {
        (
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.bytes,
            self.inner,
        )
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What writing a layer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Digest of the compressed blob.
    pub digest: String,
    pub size: u64,
    /// Digest of the uncompressed tar (the config's `diff_ids`).
    pub diff_id: String,
    /// Files, folders and links in the layer (whiteouts included).
    pub entries: u64,
}

/// Writes `dir` as a tar+zstd layer to `out`. With `overlay`, `dir` is an overlay upper dir:
/// 0/0 character devices become `.wh.<name>` and opaque folders get `.wh..wh..opq`.
/// `exclude` holds relative paths left out (with everything under them).
pub fn write(
    dir: &Path,
    overlay: bool,
    exclude: &BTreeSet<String>,
    level: i32,
    out: impl Write,
) -> io::Result<Layer> {
    let compressed = Hashing::new(out);
    let mut encoder = zstd::stream::write::Encoder::new(compressed, level)?;
    // Compression in worker threads while this one walks, reads and hashes (as `tar | zstd`
    // runs two processes); the output does not depend on the number of workers.
    let workers =
        std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1));
    encoder.multithread(workers as u32)?;
    let raw = Hashing::new(encoder);
    let mut builder = tar::Builder::new(raw);
    builder.mode(tar::HeaderMode::Complete);
    builder.follow_symlinks(false);
    let mut walk = Walk::new(dir, overlay, exclude);
    walk.dir(&mut builder, Path::new(""))?;
    let entries = walk.entries;
    let raw = builder.into_inner()?;
    let (diff_id, _, encoder) = raw.finish();
    let compressed = encoder.finish()?;
    let (digest, size, mut out) = compressed.finish();
    out.flush()?;
    Ok(Layer {
        digest,
        size,
        diff_id,
        entries,
    })
}

/// Writes `dir` as a plain tar (a root file system, as `kiln image export` gives it); returns
/// the entry count.
pub fn write_plain(dir: &Path, out: impl Write) -> io::Result<u64> {
    let mut builder = tar::Builder::new(out);
    builder.mode(tar::HeaderMode::Complete);
    builder.follow_symlinks(false);
    let exclude = BTreeSet::new();
    let mut walk = Walk::new(dir, false, &exclude);
    walk.dir(&mut builder, Path::new(""))?;
    builder.into_inner()?.flush()?;
    Ok(walk.entries)
}

impl<'a> Walk<'a> {
    fn new(root: &'a Path, overlay: bool, exclude: &'a BTreeSet<String>) -> Self {
        Walk {
            root,
            overlay,
            exclude,
            links: HashMap::new(),
            entries: 0,
            owner: (!nix::unistd::geteuid().is_root()).then(|| {
                (
                    nix::unistd::geteuid().as_raw(),
                    nix::unistd::getegid().as_raw(),
                )
            }),
        }
    }
}

struct Walk<'a> {
    root: &'a Path,
    overlay: bool,
    exclude: &'a BTreeSet<String>,
    links: HashMap<(u64, u64), PathBuf>,
    entries: u64,
    /// The user and group that are root inside (an ordinary user's instances).
    owner: Option<(u32, u32)>,
}

fn empty_header(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(0);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn is_opaque(path: &Path) -> bool {
    OPAQUE_XATTRS.iter().any(|name| {
        xattr::get(path, name)
            .ok()
            .flatten()
            .is_some_and(|v| v == b"y")
    })
}

impl Walk<'_> {
    fn dir<W: Write>(&mut self, b: &mut tar::Builder<W>, rel: &Path) -> io::Result<()> {
        let here = self.root.join(rel);
        let mut names: Vec<_> = fs::read_dir(&here)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            let rel = rel.join(&name);
            if self.exclude.contains(rel.to_string_lossy().as_ref()) {
                continue;
            }
            let path = self.root.join(&rel);
            let meta = fs::symlink_metadata(&path)?;
            let ft = meta.file_type();
            self.entries += 1;
            if self.overlay && ft.is_char_device() && meta.rdev() == 0 {
                let mut wh = empty_header(tar::EntryType::Regular, 0o644);
                let mut wh_name = std::ffi::OsString::from(WHITEOUT_PREFIX);
                wh_name.push(&name);
                b.append_data(&mut wh, rel.with_file_name(wh_name), io::empty())?;
                continue;
            }
            let mut h = tar::Header::new_gnu();
            h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            if let Some((uid, gid)) = self.owner {
                // An ordinary user's instance: the user is root inside.
                if meta.uid() == uid {
                    h.set_uid(0);
                }
                if meta.gid() == gid {
                    h.set_gid(0);
                }
            }
            if ft.is_dir() {
                h.set_size(0);
                b.append_data(&mut h, &rel, io::empty())?;
                if self.overlay && is_opaque(&path) {
                    let mut opq = empty_header(tar::EntryType::Regular, 0o644);
                    b.append_data(&mut opq, rel.join(OPAQUE_MARKER), io::empty())?;
                }
                self.dir(b, &rel)?;
            } else if ft.is_symlink() {
                h.set_size(0);
                b.append_link(&mut h, &rel, fs::read_link(&path)?)?;
            } else if ft.is_file() {
                let key = (meta.dev(), meta.ino());
                if meta.nlink() > 1 {
                    if let Some(first) = self.links.get(&key) {
                        h.set_entry_type(tar::EntryType::Link);
                        h.set_size(0);
                        b.append_link(&mut h, &rel, first)?;
                        continue;
                    }
                    self.links.insert(key, rel.clone());
                }
                // (Nothing changes the folder meanwhile: a builder is stopped before its upper dir
                // is written, and the other folders are kiln's own.)
                b.append_data(&mut h, &rel, File::open(&path)?)?;
            } else {
                // Devices and FIFOs: the header carries all there is, the device numbers included.
                h.set_size(0);
                if ft.is_char_device() || ft.is_block_device() {
                    h.set_device_major(nix::sys::stat::major(meta.rdev()) as u32)?;
                    h.set_device_minor(nix::sys::stat::minor(meta.rdev()) as u32)?;
                }
                b.append_data(&mut h, &rel, io::empty())?;
            }
        }
        Ok(())
    }
}

/// How OCI whiteouts are materialised when a layer is unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// As overlay whiteouts (0/0 devices, opaque xattr): the folder is an overlay lower dir.
    Overlay,
    /// As deletions in `dest`, which holds the layers below: flattening an image.
    Apply,
}

/// Unpacks the tar+zstd blob at `blob` into `dest`.
pub fn unpack(blob: &Path, dest: &Path, whiteouts: Whiteouts) -> io::Result<u64> {
    let decoder = zstd::stream::read::Decoder::new(File::open(blob)?)?;
    unpack_tar(decoder, dest, whiteouts)
}

/// Unpacks a plain tar stream (whiteouts handled as `whiteouts` says); returns the entry count.
///
/// Every entry is placed through [`Folder`]: no entry, whiteout or opaque marker reaches
/// outside `dest`, whatever links earlier entries (or the layers below) made. An entry that
/// would (`..`, a path through a link, a hard link to outside) refuses the whole archive with
/// an error naming it.
pub fn unpack_tar(input: impl Read, dest: &Path, whiteouts: Whiteouts) -> io::Result<u64> {
    fs::create_dir_all(dest)?;
    let root = Folder::open(dest)?;
    let privileged = Privilege {
        owners: nix::unistd::geteuid().is_root(),
        machine: !crate::userns::unprivileged(),
    };
    let mut archive = tar::Archive::new(input);
    let mut count = 0;
    // Folder modes and times are set last: a read-only folder must still take its entries.
    let mut folders: Vec<(PathBuf, u32, u64)> = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        count += 1;
        let path = entry.path()?.into_owned();
        let refuse = |e: io::Error| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("layer entry `{}` refused: {e}", path.display()),
            )
        };
        place(
            &root,
            &mut entry,
            &path,
            whiteouts,
            privileged,
            &mut folders,
        )
        .map_err(refuse)?;
    }
    for (rel, mode, mtime) in folders.into_iter().rev() {
        let Ok(dir) = root.sub(&rel, false) else {
            continue;
        };
        let _ = nix::sys::stat::fchmod(&dir, Mode::from_bits_truncate(mode & 0o7777));
        let t = nix::sys::time::TimeSpec::new(mtime as i64, 0);
        let _ = nix::sys::stat::futimens(&dir, &t, &t);
    }
    Ok(count)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Places one entry of a layer under `root`.
/// What the unpacking process may do.
#[derive(Debug, Clone, Copy)]
struct Privilege {
    /// Set owners (root, of the machine or of a user namespace).
    owners: bool,
    /// Make device nodes and set `trusted.*` attributes (the machine's root only).
    machine: bool,
}

fn place<R: Read>(
    root: &Folder,
    entry: &mut tar::Entry<'_, R>,
    path: &Path,
    whiteouts: Whiteouts,
    privileged: Privilege,
    folders: &mut Vec<(PathBuf, u32, u64)>,
) -> io::Result<()> {
    let parts = beneath::components(path)?;
    let Some(name) = parts.last().cloned() else {
        // The layer's own root (`./`): nothing to place.
        return Ok(());
    };
    let parent_rel: PathBuf = parts[..parts.len() - 1].iter().collect();
    let parent = root.sub(&parent_rel, true)?;
    let name_text = name.to_string_lossy();
    if name_text == OPAQUE_MARKER {
        return match whiteouts {
            Whiteouts::Overlay => {
                let name = if privileged.machine {
                    OPAQUE_XATTRS[0]
                } else {
                    OPAQUE_XATTRS[1]
                };
                xattr::FileExt::set_xattr(
                    &File::from(parent.as_fd().try_clone_to_owned()?),
                    name,
                    b"y",
                )
            }
            Whiteouts::Apply => parent.clear(),
        };
    }
    if let Some(hidden) = name_text.strip_prefix(WHITEOUT_PREFIX) {
        let hidden = std::ffi::OsString::from(hidden);
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err(invalid(format!("`{name_text}` whites out no name")));
        }
        parent.remove(&hidden)?;
        if whiteouts == Whiteouts::Overlay {
            // A 0/0 character device: unprivileged users may make this one (Linux 5.8).
            mknodat(
                &parent,
                hidden.as_os_str(),
                SFlag::S_IFCHR,
                Mode::empty(),
                makedev(0, 0),
            )?;
        }
        return Ok(());
    }
    let header = entry.header().clone();
    let kind = header.entry_type();
    let mode = header.mode().unwrap_or(0o644);
    let mtime = header.mtime().unwrap_or(0);
    // The entry's owner, where kiln may set it (as root, of the machine or of a user namespace
    // with subordinate ids).
    let owner = privileged.owners.then(|| {
        (
            Uid::from_raw(header.uid().unwrap_or(0) as u32),
            Gid::from_raw(header.gid().unwrap_or(0) as u32),
        )
    });
    // Owner of a name placed in `parent` (a link or a node: never followed).
    let chown_name = |name: &std::ffi::OsStr| {
        if let Some((u, g)) = owner {
            let _ = nix::unistd::fchownat(
                &parent,
                name,
                Some(u),
                Some(g),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            );
        }
    };
    let existing = parent.stat(&name)?;
    if kind.is_dir() {
        if existing.as_ref().is_some_and(|st| !beneath::is_dir(st)) {
            parent.remove(&name)?;
        }
        parent.child(&name, true)?;
        chown_name(&name);
        folders.push((parts.iter().collect(), mode, mtime));
        return Ok(());
    }
    // Anything else replaces what is there (a folder with all it holds).
    if existing.is_some() {
        parent.remove(&name)?;
    }
    let t = nix::sys::time::TimeSpec::new(mtime as i64, 0);
    match kind {
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            let mut f = parent.open_at(
                &name,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                0o600,
            )?;
            io::copy(entry, &mut f)?;
            chown_name(&name);
            nix::sys::stat::fchmod(&f, Mode::from_bits_truncate(mode & 0o7777))?;
            let _ = nix::sys::stat::futimens(&f, &t, &t);
        }
        tar::EntryType::Symlink => {
            let target = entry
                .link_name()?
                .ok_or_else(|| invalid("a symbolic link without a target".into()))?;
            nix::unistd::symlinkat(target.as_ref(), &parent, name.as_os_str())?;
            chown_name(&name);
            let _ = nix::sys::stat::utimensat(
                &parent,
                name.as_os_str(),
                &t,
                &t,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            );
        }
        tar::EntryType::Link => {
            let target = entry
                .link_name()?
                .ok_or_else(|| invalid("a hard link without a target".into()))?
                .into_owned();
            let (from, from_name) = root
                .parent_of(&target, false)
                .map_err(|e| invalid(format!("its target `{}`: {e}", target.display())))?;
            match from.stat(&from_name)? {
                Some(st) if !beneath::is_dir(&st) => {}
                _ => {
                    return Err(invalid(format!(
                        "its target `{}` is not a file of the layer",
                        target.display()
                    )))
                }
            }
            nix::unistd::linkat(
                &from,
                from_name.as_os_str(),
                &parent,
                name.as_os_str(),
                AtFlags::empty(),
            )?;
        }
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
            let sflag = match kind {
                tar::EntryType::Char => SFlag::S_IFCHR,
                tar::EntryType::Block => SFlag::S_IFBLK,
                _ => SFlag::S_IFIFO,
            };
            let dev = makedev(
                u64::from(header.device_major()?.unwrap_or(0)),
                u64::from(header.device_minor()?.unwrap_or(0)),
            );
            if sflag != SFlag::S_IFIFO && !privileged.machine {
                // An ordinary user cannot make device nodes (neither can rootless podman); the
                // instance's /dev does not come from the image anyway.
                return Ok(());
            }
            mknodat(
                &parent,
                name.as_os_str(),
                sflag,
                Mode::from_bits_truncate(mode & 0o7777),
                dev,
            )?;
            chown_name(&name);
        }
        tar::EntryType::XGlobalHeader
        | tar::EntryType::XHeader
        | tar::EntryType::GNULongName
        | tar::EntryType::GNULongLink => {}
        other => {
            return Err(invalid(format!(
                "its kind ({other:?}) is none a root file system holds"
            )))
        }
    }
    Ok(())
}

/// Removes a file, link or folder; a missing path is fine.
pub fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).or_else(|e| {
            if e.kind() != io::ErrorKind::PermissionDenied {
                return Err(e);
            }
            // Folders an ordinary user owns but cannot enter (overlayfs leaves `work/work` with
            // mode 0): open them up, without following links, and try again.
            open_up(path)?;
            fs::remove_dir_all(path)
        }),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Gives the owner rwx on every folder under `path` (links are not followed).
fn open_up(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(());
    }
    fs::set_permissions(
        path,
        fs::Permissions::from_mode((meta.mode() & 0o7777) | 0o700),
    )?;
    for e in fs::read_dir(path)? {
        open_up(&e?.path())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn names(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
                if e.file_type().unwrap().is_dir() {
                    stack.push(p);
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn an_upper_dir_round_trips_with_whiteouts_opaque_dirs_links_and_exclusions() {
        // GIVEN a lower layer and an upper dir that deletes a file, replaces a folder, adds a
        // symlink and a hard link, and holds sandbox scaffolding
        let t = tempfile::tempdir().unwrap();
        let lower = t.path().join("lower");
        fs::create_dir_all(lower.join("etc/old")).unwrap();
        fs::write(lower.join("etc/gone"), "x").unwrap();
        fs::write(lower.join("etc/old/a"), "a").unwrap();
        fs::write(lower.join("etc/kept"), "k").unwrap();
        let upper = t.path().join("upper");
        fs::create_dir_all(upper.join("etc/old")).unwrap();
        fs::create_dir_all(upper.join(".kiln")).unwrap();
        nix::sys::stat::mknod(&upper.join("etc/gone"), SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
        xattr::set(upper.join("etc/old"), OPAQUE_XATTRS[0], b"y").unwrap();
        fs::write(upper.join("etc/old/b"), "b").unwrap();
        fs::write(upper.join("etc/new"), "new").unwrap();
        fs::hard_link(upper.join("etc/new"), upper.join("etc/new-link")).unwrap();
        symlink("new", upper.join("etc/sym")).unwrap();
        // WHEN both are written as layers and applied in order
        let mut lower_blob = Vec::new();
        write(&lower, false, &BTreeSet::new(), 3, &mut lower_blob).unwrap();
        let mut upper_blob = Vec::new();
        let layer = write(
            &upper,
            true,
            &BTreeSet::from([".kiln".to_string()]),
            3,
            &mut upper_blob,
        )
        .unwrap();
        let flat = t.path().join("flat");
        for blob in [&lower_blob, &upper_blob] {
            let d = zstd::stream::read::Decoder::new(blob.as_slice()).unwrap();
            unpack_tar(d, &flat, Whiteouts::Apply).unwrap();
        }
        // THEN the result is what the overlay showed
        assert_eq!(
            names(&flat),
            [
                "etc",
                "etc/kept",
                "etc/new",
                "etc/new-link",
                "etc/old",
                "etc/old/b",
                "etc/sym"
            ]
        );
        assert_eq!(
            fs::read_link(flat.join("etc/sym")).unwrap(),
            Path::new("new")
        );
        let (a, b) = (
            fs::metadata(flat.join("etc/new")).unwrap(),
            fs::metadata(flat.join("etc/new-link")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino(), "hard link kept");
        assert_eq!(layer.size, upper_blob.len() as u64);
        assert!(layer.digest.starts_with("sha256:") && layer.diff_id != layer.digest);
        // AND unpacked for an overlay, the whiteouts are overlay whiteouts again
        let lowerdir = t.path().join("lowerdir");
        let d = zstd::stream::read::Decoder::new(upper_blob.as_slice()).unwrap();
        unpack_tar(d, &lowerdir, Whiteouts::Overlay).unwrap();
        let m = fs::symlink_metadata(lowerdir.join("etc/gone")).unwrap();
        assert!(m.file_type().is_char_device() && m.rdev() == 0);
        assert!(is_opaque(&lowerdir.join("etc/old")));
    }

    #[test]
    fn a_layer_that_escapes_its_folder_is_refused() {
        let mut raw = Vec::new();
        {
            let mut b = tar::Builder::new(&mut raw);
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o644);
            h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
            b.finish().unwrap();
        }
        let t = tempfile::tempdir().unwrap();
        let err = unpack_tar(raw.as_slice(), &t.path().join("d"), Whiteouts::Apply).unwrap_err();
        assert!(err.to_string().contains("../escape"), "{err}");
        assert!(!t.path().join("escape").exists());
    }

    #[test]
    fn device_nodes_keep_their_numbers_through_a_layer() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "making a device node needs root: run the tests as root"
        );
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("root");
        fs::create_dir_all(&dir).unwrap();
        nix::sys::stat::mknod(
            &dir.join("zero"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o644),
            makedev(1, 5),
        )
        .unwrap();
        let mut blob = Vec::new();
        write(&dir, false, &BTreeSet::new(), 1, &mut blob).unwrap();
        let out = t.path().join("out");
        unpack(&write_blob(t.path(), &blob), &out, Whiteouts::Apply).unwrap();
        let meta = fs::symlink_metadata(out.join("zero")).unwrap();
        assert!(meta.file_type().is_char_device());
        assert_eq!(
            (
                nix::sys::stat::major(meta.rdev()),
                nix::sys::stat::minor(meta.rdev())
            ),
            (1, 5)
        );
    }

    fn write_blob(dir: &Path, bytes: &[u8]) -> PathBuf {
        let p = dir.join("blob");
        fs::write(&p, bytes).unwrap();
        p
    }

    /// A tar of raw entries: (name, kind, link target, content).
    fn crafted(entries: &[(&str, tar::EntryType, &str, &str)]) -> Vec<u8> {
        let mut raw = Vec::new();
        {
            let mut b = tar::Builder::new(&mut raw);
            for (name, kind, link, body) in entries {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(*kind);
                h.set_size(body.len() as u64);
                h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
                h.set_mtime(1);
                h.set_uid(0);
                h.set_gid(0);
                let gnu = h.as_gnu_mut().unwrap();
                gnu.name[..name.len()].copy_from_slice(name.as_bytes());
                gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
                if *kind == tar::EntryType::Block {
                    h.set_device_major(8).unwrap();
                    h.set_device_minor(0).unwrap();
                }
                h.set_cksum();
                b.append(&h, body.as_bytes()).unwrap();
            }
            b.finish().unwrap();
        }
        raw
    }

    /// Every file under `dir` with its content (links as `-> target`).
    fn inventory(dir: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let ft = e.file_type().unwrap();
                let what = if ft.is_symlink() {
                    format!("-> {}", fs::read_link(&p).unwrap().display())
                } else if ft.is_dir() {
                    stack.push(p.clone());
                    "dir".into()
                } else {
                    fs::read_to_string(&p).unwrap_or_default()
                };
                out.push((p.display().to_string(), what));
            }
        }
        out.sort();
        out
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn hostile_archives_change_nothing_outside_their_folder() {
        use tar::EntryType::{Block, Directory, Link, Regular, Symlink};
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("host");
        fs::create_dir_all(outside.join("etc")).unwrap();
        fs::write(outside.join("etc/passwd"), "root:x:0:0").unwrap();
        fs::write(outside.join("victim"), "keep me").unwrap();
        let out = outside.display().to_string();
        let victim = format!("{out}/victim");
        let before = inventory(&outside);
        let cases: Vec<(&str, Vec<(&str, tar::EntryType, &str, &str)>, Option<&str>)> = vec![
            (
                "parent folder",
                vec![("../host/victim", Regular, "", "x")],
                Some("`..`"),
            ),
            (
                "file through a link",
                vec![("l", Symlink, &out, ""), ("l/victim", Regular, "", "x")],
                Some("symbolic link"),
            ),
            (
                "whiteout through a link",
                vec![("l", Symlink, &out, ""), ("l/.wh.victim", Regular, "", "")],
                Some("symbolic link"),
            ),
            (
                "opaque marker through a link",
                vec![
                    ("l", Symlink, &out, ""),
                    ("l/.wh..wh..opq", Regular, "", ""),
                ],
                Some("symbolic link"),
            ),
            (
                "folder through a link",
                vec![("l", Symlink, &out, ""), ("l/etc", Directory, "", "")],
                Some("symbolic link"),
            ),
            (
                "hard link out",
                vec![("h", Link, "../host/victim", "")],
                Some("`..`"),
            ),
            (
                "hard link through a link",
                vec![("l", Symlink, &out, ""), ("h", Link, "l/victim", "")],
                Some("symbolic link"),
            ),
            (
                "whiteout of the folder itself",
                vec![(".wh..", Regular, "", "")],
                Some("whites out no name"),
            ),
            (
                "file over a link",
                vec![("f", Symlink, &victim, ""), ("f", Regular, "", "x")],
                None,
            ),
            ("absolute path", vec![(&victim, Regular, "", "x")], None),
            ("device node", vec![("sda", Block, "", "")], None),
        ];
        for whiteouts in [Whiteouts::Apply, Whiteouts::Overlay] {
            for (what, entries, refused) in &cases {
                let dest = t.path().join("dest");
                let _ = remove_any(&dest);
                let got = unpack_tar(crafted(entries).as_slice(), &dest, whiteouts);
                assert_eq!(
                    inventory(&outside),
                    before,
                    "{what} ({whiteouts:?}) changed the host"
                );
                match refused {
                    Some(why) => {
                        let err = got.expect_err(what).to_string();
                        assert!(
                            err.contains(why) && err.contains("refused"),
                            "{what}: {err}"
                        );
                        let first = entries.last().unwrap().0;
                        assert!(
                            err.contains(first) || err.contains(".wh.."),
                            "{what}: {err}"
                        );
                    }
                    None => {
                        got.unwrap_or_else(|e| panic!("{what}: {e}"));
                    }
                }
            }
        }
        // the file over a link replaced the link; the absolute path landed inside
        let dest = t.path().join("dest");
        let _ = remove_any(&dest);
        unpack_tar(crafted(&cases[8].1).as_slice(), &dest, Whiteouts::Apply).unwrap();
        assert_eq!(fs::read_to_string(dest.join("f")).unwrap(), "x");
        unpack_tar(crafted(&cases[9].1).as_slice(), &dest, Whiteouts::Apply).unwrap();
        assert!(dest
            .join(out.trim_start_matches('/'))
            .join("victim")
            .is_file());
    }
}
