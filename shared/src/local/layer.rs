//! Image layers: a folder to a tar+zstd blob (overlay whiteouts turned into the OCI form), and a
//! blob back to a folder (OCI whiteouts turned into overlay whiteouts, or applied as deletions).

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

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
    let mut walk = Walk {
        root: dir,
        overlay,
        exclude,
        links: HashMap::new(),
        entries: 0,
    };
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

struct Walk<'a> {
    root: &'a Path,
    overlay: bool,
    exclude: &'a BTreeSet<String>,
    links: HashMap<(u64, u64), PathBuf>,
    entries: u64,
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
                b.append_data(&mut h, &rel, File::open(&path)?)?;
            } else {
                // Devices and FIFOs: the header carries all there is.
                h.set_size(0);
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

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Unpacks the tar+zstd blob at `blob` into `dest`.
pub fn unpack(blob: &Path, dest: &Path, whiteouts: Whiteouts) -> io::Result<u64> {
    let decoder = zstd::stream::read::Decoder::new(File::open(blob)?)?;
    unpack_tar(decoder, dest, whiteouts)
}

/// Unpacks a plain tar stream (whiteouts handled as `whiteouts` says); returns the entry count.
pub fn unpack_tar(input: impl Read, dest: &Path, whiteouts: Whiteouts) -> io::Result<u64> {
    fs::create_dir_all(dest)?;
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut count = 0;
    for entry in archive.entries()? {
        let mut entry = entry?;
        count += 1;
        let path = entry.path()?.into_owned();
        if path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(other(format!(
                "layer entry {} leaves the layer",
                path.display()
            )));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = dest.join(path.parent().unwrap_or(Path::new("")));
        if name == OPAQUE_MARKER {
            fs::create_dir_all(&parent)?;
            match whiteouts {
                Whiteouts::Overlay => xattr::set(&parent, OPAQUE_XATTRS[0], b"y")?,
                Whiteouts::Apply => {
                    for e in fs::read_dir(&parent)? {
                        remove_any(&e?.path())?;
                    }
                }
            }
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            fs::create_dir_all(&parent)?;
            let target = parent.join(hidden);
            remove_any(&target)?;
            if whiteouts == Whiteouts::Overlay {
                nix::sys::stat::mknod(
                    &target,
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::empty(),
                    nix::sys::stat::makedev(0, 0),
                )
                .map_err(other)?;
            }
        } else {
            if whiteouts == Whiteouts::Apply && !entry.header().entry_type().is_dir() {
                remove_any(&dest.join(&path))?;
            }
            entry.unpack_in(dest)?;
        }
    }
    Ok(count)
}

/// Removes a file, link or folder; a missing path is fine.
pub fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
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
        nix::sys::stat::mknod(
            &upper.join("etc/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
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
        assert!(err.to_string().contains("leaves the layer"), "{err}");
        assert!(!t.path().join("escape").exists());
    }
}
