//! Image layers: a folder to a tar+zstd blob (overlay whiteouts turned into the OCI form), and a
//! blob back to a folder (OCI whiteouts turned into overlay whiteouts, or applied as deletions).
//!
//! Device entries (character and block nodes) are never made on the host: an image's device node
//! would be a real node of the host's disks. Unpacked for an overlay, they are left out (an
//! instance's /dev does not come from its image, and the layer's blob keeps them); unpacked to be
//! written again (an import, an export), they are kept as metadata in [`DEVICES_FILE`] at the
//! folder's root, which writing the folder turns back into the same tar entries.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
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

/// The device entries of a folder unpacked with [`Whiteouts::Apply`], at its root. No entry of a
/// layer unpacks to a name starting with `.wh.` (those are whiteouts), so it names nothing of
/// the image.
pub const DEVICES_FILE: &str = ".wh..kiln-devices.json";

/// A character or block device entry of a layer, as its tar header has it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Device {
    /// `c` or `b`.
    pub kind: char,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub major: u32,
    pub minor: u32,
    pub mtime: u64,
}

/// The device entries of an unpacked folder, by their path in it (raw bytes: names need not be
/// UTF-8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Devices(BTreeMap<PathBuf, Device>);

#[derive(serde::Serialize, serde::Deserialize)]
struct DeviceLine {
    path: Vec<u8>,
    #[serde(flatten)]
    device: Device,
}

impl Devices {
    /// The devices recorded at the root of `dir` (none when it has no record).
    pub fn read(dir: &Path) -> io::Result<Devices> {
        let text = match fs::symlink_metadata(dir.join(DEVICES_FILE)) {
            Ok(m) if m.is_file() => fs::read(dir.join(DEVICES_FILE))?,
            Ok(_) => return Err(invalid(format!("{DEVICES_FILE} is not a file"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Devices::default()),
            Err(e) => return Err(e),
        };
        let lines: Vec<DeviceLine> = serde_json::from_slice(&text)
            .map_err(|e| invalid(format!("{}: {e}", dir.join(DEVICES_FILE).display())))?;
        Ok(Devices(
            lines
                .into_iter()
                .map(|l| (PathBuf::from(OsString::from_vec(l.path)), l.device))
                .collect(),
        ))
    }

    /// Records these devices at the root of `root` (the record is removed when there are none).
    fn save(&self, root: &Folder) -> io::Result<()> {
        if self.0.is_empty() {
            return root.remove(std::ffi::OsStr::new(DEVICES_FILE));
        }
        let lines: Vec<DeviceLine> = self
            .0
            .iter()
            .map(|(p, d)| DeviceLine {
                path: p.as_os_str().as_bytes().to_vec(),
                device: d.clone(),
            })
            .collect();
        let text = serde_json::to_vec(&lines).map_err(io::Error::other)?;
        root.write(Path::new(DEVICES_FILE), &text)
    }

    /// The device entries, by path.
    pub fn entries(&self) -> &BTreeMap<PathBuf, Device> {
        &self.0
    }

    /// Forgets the device at `rel` and every one below it.
    fn forget(&mut self, rel: &Path) {
        self.0.retain(|p, _| !p.starts_with(rel));
    }

    /// Forgets every device strictly below `rel` (an opaque folder).
    fn forget_below(&mut self, rel: &Path) {
        self.0.retain(|p, _| p == rel || !p.starts_with(rel));
    }

    /// Forgets a device where `rel` or one of its parents is (an entry placed there replaces it).
    fn forget_at_and_above(&mut self, rel: &Path) {
        for a in rel.ancestors() {
            self.0.remove(a);
        }
    }

    /// The names of the devices directly in folder `rel`.
    fn names_in(&self, rel: &Path) -> Vec<OsString> {
        self.0
            .keys()
            .filter(|p| p.parent() == Some(rel))
            .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
            .collect()
    }

    fn header(&self, rel: &Path) -> Option<io::Result<tar::Header>> {
        let d = self.0.get(rel)?;
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(if d.kind == 'b' {
            tar::EntryType::Block
        } else {
            tar::EntryType::Char
        });
        h.set_mode(d.mode);
        h.set_uid(d.uid);
        h.set_gid(d.gid);
        h.set_mtime(d.mtime);
        h.set_size(0);
        Some(
            h.set_device_major(d.major)
                .and_then(|()| h.set_device_minor(d.minor))
                .map(|()| h),
        )
    }
}

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
    // Every core compresses (zstd's own workers, as `zstd -T0` runs) while this thread walks,
    // reads and hashes, which costs little beside compression: one worker fewer than the cores
    // left one of two cores idle most of the time. zstd's output does not depend on the number
    // of workers.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    encoder.multithread(workers as u32)?;
    let raw = Hashing::new(encoder);
    let mut builder = tar::Builder::new(raw);
    builder.mode(tar::HeaderMode::Complete);
    builder.follow_symlinks(false);
    let mut walk = Walk::new(dir, overlay, exclude)?;
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
    let mut walk = Walk::new(dir, false, &exclude)?;
    walk.dir(&mut builder, Path::new(""))?;
    builder.into_inner()?.flush()?;
    Ok(walk.entries)
}

impl<'a> Walk<'a> {
    fn new(root: &'a Path, overlay: bool, exclude: &'a BTreeSet<String>) -> io::Result<Self> {
        // An overlay upper dir is an instance's: its devices are nodes it made, and a record
        // of devices there would be a file a component wrote.
        let devices = if overlay {
            Devices::default()
        } else {
            Devices::read(root)?
        };
        Ok(Walk {
            root,
            devices,
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
        })
    }
}

struct Walk<'a> {
    root: &'a Path,
    overlay: bool,
    exclude: &'a BTreeSet<String>,
    links: HashMap<(u64, u64), PathBuf>,
    /// The devices recorded for the folder (see [`DEVICES_FILE`]).
    devices: Devices,
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
        let at_root = rel.as_os_str().is_empty();
        let mut names: Vec<_> = fs::read_dir(&here)?
            .map(|e| e.map(|e| e.file_name()))
            .filter(|n| !(at_root && !self.overlay && n.as_ref().is_ok_and(|n| n == DEVICES_FILE)))
            .collect::<io::Result<_>>()?;
        names.extend(self.devices.names_in(rel));
        names.sort();
        names.dedup();
        for name in names {
            let rel = rel.join(&name);
            if self.exclude.contains(rel.to_string_lossy().as_ref()) {
                continue;
            }
            let path = self.root.join(&rel);
            let meta = match fs::symlink_metadata(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if let Some(h) = self.devices.header(&rel) {
                        self.entries += 1;
                        b.append_data(&mut h?, &rel, io::empty())?;
                    }
                    continue;
                }
                other => other?,
            };
            let ft = meta.file_type();
            self.entries += 1;
            if self.overlay && ft.is_char_device() && meta.rdev() == 0 {
                let mut wh = empty_header(tar::EntryType::Regular, 0o644);
                let mut wh_name = OsString::from(WHITEOUT_PREFIX);
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
    // Applied over the layers below: their devices, as later entries leave them.
    let mut devices = match whiteouts {
        Whiteouts::Apply => Devices::read(dest)?,
        Whiteouts::Overlay => Devices::default(),
    };
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
            &mut devices,
        )
        .map_err(refuse)?;
    }
    if whiteouts == Whiteouts::Apply {
        devices.save(&root)?;
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
    devices: &mut Devices,
) -> io::Result<()> {
    let parts = beneath::components(path)?;
    let Some(name) = parts.last().cloned() else {
        // The layer's own root (`./`): nothing to place.
        return Ok(());
    };
    let parent_rel: PathBuf = parts[..parts.len() - 1].iter().collect();
    let rel: PathBuf = parts.iter().collect();
    // Folders are made on the way to the entry: a device recorded there is replaced.
    devices.forget_at_and_above(&parent_rel);
    let parent = root.sub(&parent_rel, true)?;
    let name_text = name.to_string_lossy();
    if name_text == OPAQUE_MARKER {
        devices.forget_below(&parent_rel);
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
        let hidden = OsString::from(hidden);
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err(invalid(format!("`{name_text}` whites out no name")));
        }
        if hidden.as_bytes().starts_with(WHITEOUT_PREFIX.as_bytes()) {
            // No entry unpacks to a `.wh.` name (kiln's device record is one): nothing to hide.
            return Ok(());
        }
        devices.forget(&parent_rel.join(&hidden));
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
        devices.forget_at_and_above(&rel);
    } else {
        devices.forget(&rel);
    }
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
            let target_rel: PathBuf = beneath::components(&target)?.iter().collect();
            if let Some(d) = devices.0.get(&target_rel).cloned() {
                // A second name of a device entry: a second record.
                devices.0.insert(rel, d);
                return Ok(());
            }
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
        tar::EntryType::Char | tar::EntryType::Block => {
            // Metadata only (see the module's comment): saved for a folder to be written again,
            // only known while unpacking an overlay lower dir (a hard link may name it).
            devices.0.insert(
                rel,
                Device {
                    kind: if kind == tar::EntryType::Block {
                        'b'
                    } else {
                        'c'
                    },
                    mode: mode & 0o7777,
                    uid: header.uid().unwrap_or(0),
                    gid: header.gid().unwrap_or(0),
                    major: header.device_major()?.unwrap_or(0),
                    minor: header.device_minor()?.unwrap_or(0),
                    mtime,
                },
            );
        }
        tar::EntryType::Fifo => {
            mknodat(
                &parent,
                name.as_os_str(),
                SFlag::S_IFIFO,
                Mode::from_bits_truncate(mode & 0o7777),
                makedev(0, 0),
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

/// The bytes of the files under `path` (or of `path` itself), links not followed; what cannot be
/// read counts as nothing.
pub fn size_of(path: &Path) -> u64 {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| size_of(&e.path()))
            .sum(),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
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

    /// The (kind, major, minor, mode) of every device entry of a plain tar, by path.
    fn devices_in(tar_bytes: &[u8]) -> Vec<(String, tar::EntryType, u32, u32, u32)> {
        let mut out = Vec::new();
        for e in tar::Archive::new(tar_bytes).entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            let kind = h.entry_type();
            if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
                out.push((
                    e.path().unwrap().display().to_string(),
                    kind,
                    h.device_major().unwrap().unwrap(),
                    h.device_minor().unwrap().unwrap(),
                    h.mode().unwrap(),
                ));
            }
        }
        out
    }

    /// Every device node under `dir`, by a raw `lstat` walk.
    fn device_nodes(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let ft = fs::symlink_metadata(e.path()).unwrap().file_type();
                if ft.is_dir() {
                    stack.push(e.path());
                } else if ft.is_block_device()
                    || (ft.is_char_device() && e.metadata().unwrap().rdev() != 0)
                {
                    out.push(e.path());
                }
            }
        }
        out
    }

    #[test]
    fn device_entries_are_kept_as_metadata_and_written_back_never_made_on_the_host() {
        // GIVEN a layer with a block device (the host's disk 8:0, mode 0666) and a character
        // device with a second name
        let raw = crafted(&[
            ("dev", tar::EntryType::Directory, "", ""),
            ("dev/sda", tar::EntryType::Block, "", ""),
            ("dev/disk", tar::EntryType::Link, "dev/sda", ""),
            ("etc", tar::EntryType::Directory, "", ""),
            ("etc/hostname", tar::EntryType::Regular, "", "x"),
        ]);
        let t = tempfile::tempdir().unwrap();
        for whiteouts in [Whiteouts::Apply, Whiteouts::Overlay] {
            // WHEN it is unpacked
            let dest = t.path().join(format!("{whiteouts:?}"));
            unpack_tar(raw.as_slice(), &dest, whiteouts).unwrap();
            // THEN no device node is made, whoever unpacks it (root here)
            assert_eq!(device_nodes(&dest), Vec::<PathBuf>::new(), "{whiteouts:?}");
            assert!(!dest.join("dev/sda").exists() && dest.join("etc/hostname").is_file());
        }
        // AND written again (an import, an export), the folder gives the entries back
        let mut plain = Vec::new();
        write_plain(&t.path().join("Apply"), &mut plain).unwrap();
        assert_eq!(
            devices_in(&plain),
            vec![
                ("dev/disk".to_string(), tar::EntryType::Block, 8, 0, 0o644),
                ("dev/sda".to_string(), tar::EntryType::Block, 8, 0, 0o644),
            ]
        );
        let names: Vec<String> = tar::Archive::new(plain.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(!names.iter().any(|n| n.contains(DEVICES_FILE)), "{names:?}");
        // AND an overlay lower dir holds no record (it would be a file of the instance)
        assert!(!t.path().join("Overlay").join(DEVICES_FILE).exists());
    }

    #[test]
    fn a_later_layer_removes_or_replaces_a_device_entry_as_it_would_a_file() {
        use tar::EntryType::{Block, Directory, Regular};
        // GIVEN a layer with three devices, and a layer above that whites one out, makes another
        // a file and makes the folder of the third opaque
        let lower = crafted(&[
            ("a", Directory, "", ""),
            ("a/gone", Block, "", ""),
            ("a/file", Block, "", ""),
            ("b", Directory, "", ""),
            ("b/hidden", Block, "", ""),
            ("kept", Block, "", ""),
        ]);
        let upper = crafted(&[
            ("a/.wh.gone", Regular, "", ""),
            ("a/file", Regular, "", "now a file"),
            ("b/.wh..wh..opq", Regular, "", ""),
        ]);
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("flat");
        // WHEN both are applied in order
        unpack_tar(lower.as_slice(), &dest, Whiteouts::Apply).unwrap();
        unpack_tar(upper.as_slice(), &dest, Whiteouts::Apply).unwrap();
        // THEN only the untouched device is still recorded
        let kept: Vec<_> = Devices::read(&dest)
            .unwrap()
            .entries()
            .keys()
            .cloned()
            .collect();
        assert_eq!(kept, vec![PathBuf::from("kept")]);
        assert_eq!(
            fs::read_to_string(dest.join("a/file")).unwrap(),
            "now a file"
        );
    }

    #[test]
    fn device_nodes_a_folder_holds_keep_their_numbers_through_a_layer() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "making a device node needs root: run the tests as root"
        );
        // GIVEN a folder holding a real device node (an upper dir, a folder imported)
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
        // WHEN it is written as a layer, unpacked, and exported as a plain tar
        let mut blob = Vec::new();
        write(&dir, false, &BTreeSet::new(), 1, &mut blob).unwrap();
        let out = t.path().join("out");
        unpack(&write_blob(t.path(), &blob), &out, Whiteouts::Apply).unwrap();
        let mut plain = Vec::new();
        write_plain(&out, &mut plain).unwrap();
        // THEN the entry keeps its numbers, and no node was made
        assert_eq!(
            devices_in(&plain),
            vec![("zero".to_string(), tar::EntryType::Char, 1, 5, 0o644)]
        );
        assert!(fs::symlink_metadata(out.join("zero")).is_err());
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
                    h.set_mode(0o644);
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
