//! Parent images for the embedded cloud: import a root file system (folder or tarball), bootstrap
//! Debian with mmdebstrap, or assemble `kiln-tiny`, a small offline base made of this machine's
//! own bash and core tools with the libraries they load. Also: export an image as a tarball.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::layer::{self, Whiteouts};
use super::oci::ImageRecord;
use super::{io_error, LocalCloud};
use crate::errors::{ErrorKind, StageError};

/// The programs `kiln-tiny` carries (those found on this machine).
pub const TINY_PROGRAMS: &[&str] = &[
    "bash",
    "sh",
    "cat",
    "echo",
    "ls",
    "mkdir",
    "rm",
    "rmdir",
    "cp",
    "mv",
    "ln",
    "touch",
    "chmod",
    "chown",
    "test",
    "[",
    "grep",
    "sed",
    "date",
    "head",
    "tail",
    "wc",
    "sort",
    "uniq",
    "cut",
    "tr",
    "env",
    "id",
    "uname",
    "sleep",
    "true",
    "false",
    "printf",
    "find",
    "stat",
    "readlink",
    "dirname",
    "basename",
    "mktemp",
    "tee",
    "sha256sum",
    "md5sum",
    "hostname",
    "ps",
    "kill",
    "tar",
    "gzip",
    "diff",
    "awk",
    "xargs",
    "whoami",
    "seq",
    "du",
    "df",
    "mount",
    "umount",
    "mknod",
    "unshare",
    "timeout",
    // What an EC2 command script needs to fetch its files (kiln's AWS scripts run on it in tests).
    "curl",
];

/// The dynamic loader and the libraries `binary` loads, as `ldd` reports them.
pub fn shared_libraries(binary: &Path) -> Result<(PathBuf, Vec<PathBuf>), StageError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| io_error("run ldd", e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut loader = None;
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some((_, rest)) = line.split_once("=> ") {
            if let Some(path) = rest
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
            {
                libs.push(PathBuf::from(path));
            }
        } else if let Some(path) = line
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            loader = Some(PathBuf::from(path));
        }
    }
    let loader = loader.ok_or_else(|| {
        StageError::new(
            ErrorKind::Internal,
            format!(
                "{} has no dynamic loader (ldd said: {})",
                binary.display(),
                text.trim()
            ),
        )
    })?;
    Ok((loader, libs))
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Copies `src` (a host file) into `root` at the same path, following the path's symlinks on
/// the host and recreating the final one.
fn copy_into(root: &Path, src: &Path) -> std::io::Result<()> {
    let real = fs::canonicalize(src)?;
    let target = root.join(real.strip_prefix("/").unwrap_or(&real));
    if !target.exists() {
        if let Some(p) = target.parent() {
            fs::create_dir_all(p)?;
        }
        fs::copy(&real, &target)?;
    }
    Ok(())
}

/// Builds the `kiln-tiny` root file system in `root`: a merged-/usr layout, this machine's core
/// programs and their libraries, /etc basics, and a note file the hello example deletes.
pub fn tiny_rootfs(root: &Path) -> Result<Vec<String>, StageError> {
    let e = |what: &str, err: std::io::Error| io_error(format!("kiln-tiny: {what}"), err);
    for d in [
        "usr/bin",
        "usr/lib",
        "usr/lib64",
        "usr/sbin",
        "etc",
        "root",
        "tmp",
        "var/tmp",
        "var/lib",
        "run",
        "proc",
        "sys",
        "dev",
        "home",
    ] {
        fs::create_dir_all(root.join(d)).map_err(|err| e(d, err))?;
    }
    for (link, to) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        symlink(to, root.join(link)).map_err(|err| e(link, err))?;
    }
    for d in ["tmp", "var/tmp"] {
        fs::set_permissions(root.join(d), fs::Permissions::from_mode(0o1777))
            .map_err(|err| e(d, err))?;
    }
    fs::set_permissions(root.join("root"), fs::Permissions::from_mode(0o700))
        .map_err(|err| e("root", err))?;
    let mut found = Vec::new();
    let mut libraries = BTreeSet::new();
    for name in TINY_PROGRAMS {
        let Some(path) = find_program(name) else {
            continue;
        };
        let real = fs::canonicalize(&path).map_err(|err| e(name, err))?;
        let target = root.join("usr/bin").join(name);
        if !target.exists() {
            fs::copy(&real, &target).map_err(|err| e(name, err))?;
        }
        if let Ok((loader, libs)) = shared_libraries(&real) {
            libraries.insert(loader);
            libraries.extend(libs);
        }
        found.push((*name).to_string());
    }
    // The libraries Rust programs built here load (libgcc_s, libm), so that a kiln-agent
    // fetched onto an instance, as on EC2, runs.
    if let Ok((loader, libs)) = std::env::current_exe()
        .map_err(|err| e("kiln", err))
        .and_then(|exe| shared_libraries(&exe))
    {
        libraries.insert(loader);
        libraries.extend(libs);
    }
    if !found.iter().any(|p| p == "bash") {
        return Err(StageError::new(
            ErrorKind::Internal,
            "kiln-tiny needs bash on this machine (ExecuteBash runs it)",
        ));
    }
    if !found.iter().any(|p| p == "sh") {
        symlink("bash", root.join("usr/bin/sh")).map_err(|err| e("sh", err))?;
    }
    for lib in &libraries {
        copy_into(root, lib).map_err(|err| e(&lib.display().to_string(), err))?;
        // Programs ask for the path ldd printed (e.g. /lib64/ld-linux-x86-64.so.2).
        let wanted = root.join(lib.strip_prefix("/").unwrap_or(lib));
        if fs::symlink_metadata(&wanted).is_err() {
            if let Some(p) = wanted.parent() {
                fs::create_dir_all(p).map_err(|err| e("lib dir", err))?;
            }
            let real = fs::canonicalize(lib).map_err(|err| e("lib", err))?;
            symlink(&real, &wanted).map_err(|err| e("lib link", err))?;
        }
    }
    let files: BTreeMap<&str, String> = BTreeMap::from([
        ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n".to_string()),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n".to_string()),
        ("etc/hostname", "kiln-tiny\n".to_string()),
        ("etc/hosts", "127.0.0.1 localhost\n".to_string()),
        ("etc/os-release", format!("NAME=\"kiln-tiny\"\nID=kiln-tiny\nVERSION_ID=\"{}\"\nPRETTY_NAME=\"kiln-tiny {} (host programs: {})\"\n", crate::VERSION, crate::VERSION, found.len())),
        ("etc/kiln-base-note", "This file ships with kiln-tiny; the hello example deletes it.\n".to_string()),
        ("etc/motd", "kiln-tiny\n".to_string()),
    ]);
    for (path, text) in files {
        fs::write(root.join(path), text).map_err(|err| e(path, err))?;
    }
    Ok(found)
}

/// Where an imported root file system comes from.
fn unpack_source(source: &Path, into: &Path) -> Result<(), StageError> {
    let err = |e: std::io::Error| io_error(format!("read {}", source.display()), e);
    let mut f = File::open(source).map_err(err)?;
    let mut magic = [0u8; 6];
    let n = f.read(&mut magic).map_err(err)?;
    drop(f);
    let file = BufReader::new(File::open(source).map_err(err)?);
    let magic = &magic[..n];
    let count = if magic.starts_with(&[0x1f, 0x8b]) {
        layer::unpack_tar(flate2::read::GzDecoder::new(file), into, Whiteouts::Apply)
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::read::Decoder::new(file)
            .and_then(|d| layer::unpack_tar(d, into, Whiteouts::Apply))
    } else {
        layer::unpack_tar(file, into, Whiteouts::Apply)
    }
    .map_err(|e| {
        StageError::new(
            ErrorKind::InvalidPipeline,
            format!(
                "{} is not a root file system tarball (tar, tar.gz or tar.zst): {e}",
                source.display()
            ),
        )
    })?;
    if count == 0 {
        return Err(StageError::new(
            ErrorKind::InvalidPipeline,
            format!("{} is empty", source.display()),
        ));
    }
    Ok(())
}

impl LocalCloud {
    /// Imports a root file system (a folder, or a tar / tar.gz / tar.zst) as image `name` in
    /// `region`: one layer, no parent. Returns the new image.
    pub fn import(
        &self,
        name: &str,
        source: &Path,
        region: &str,
    ) -> Result<ImageRecord, StageError> {
        let meta = fs::metadata(source).map_err(|e| {
            StageError::new(
                ErrorKind::InvalidPipeline,
                format!("cannot read {}: {e}", source.display()),
            )
        })?;
        if meta.is_dir() {
            return self.import_dir(
                name,
                source,
                region,
                &format!("kiln image import {}", source.display()),
            );
        }
        let tmp = self.scratch()?;
        let result = unpack_source(source, &tmp).and_then(|_| {
            self.import_dir(
                name,
                &tmp,
                region,
                &format!("kiln image import {}", source.display()),
            )
        });
        let _ = layer::remove_any(&tmp);
        result
    }

    /// A fresh scratch folder in the home (same file system as the stores).
    pub fn scratch(&self) -> Result<PathBuf, StageError> {
        let dir = self
            .home
            .join("scratch")
            .join(uuid::Uuid::new_v4().simple().to_string());
        fs::create_dir_all(&dir).map_err(|e| io_error("create scratch", e))?;
        Ok(dir)
    }

    /// Writes folder `dir` as a one-layer image named `name`.
    pub fn import_dir(
        &self,
        name: &str,
        dir: &Path,
        region: &str,
        created_by: &str,
    ) -> Result<ImageRecord, StageError> {
        let layout = self.layout(region)?;
        let e = |what: &str, err: &dyn std::fmt::Display| {
            io_error(format!("import {name}: {what}"), err)
        };
        let (layer, l) = layout
            .put_layer(dir, false, &BTreeSet::new())
            .map_err(|err| e("write layer", &err))?;
        let created = super::compute::now_text();
        let manifest = layout
            .put_image(None, &layer, &l.diff_id, created_by, &created)
            .map_err(|err| e("manifest", &err))?;
        let record = ImageRecord {
            id: super::compute::new_id("ami"),
            name: name.to_string(),
            created,
            tags: BTreeMap::from([("kiln:source".to_string(), created_by.to_string())]),
            launch_permissions: Vec::new(),
            build_id: None,
            deprecated: None,
            manifest,
        };
        layout.add(record.clone()).map_err(|err| e("index", &err))?;
        Ok(record)
    }

    /// Creates `kiln-tiny` (or `name`) in `region` from this machine's programs, offline.
    pub fn bootstrap_tiny(&self, name: &str, region: &str) -> Result<ImageRecord, StageError> {
        let tmp = self.scratch()?;
        let result = tiny_rootfs(&tmp).and_then(|programs| {
            self.import_dir(
                name,
                &tmp,
                region,
                &format!(
                    "kiln image bootstrap --variant tiny ({} host programs)",
                    programs.len()
                ),
            )
        });
        let _ = layer::remove_any(&tmp);
        result
    }

    /// Creates a Debian image with mmdebstrap (`suite`: stable, bookworm, …).
    pub fn bootstrap_debian(
        &self,
        name: &str,
        region: &str,
        suite: &str,
        include: &[String],
        apt_options: &[String],
    ) -> Result<ImageRecord, StageError> {
        let tmp = self.scratch()?;
        // Root of a user namespace (an ordinary user with subordinate ids): mmdebstrap's root
        // mode in a mount and PID namespace of its own, without device nodes it may not make
        // (an instance's /dev never comes from its image).
        let in_userns = crate::userns::unprivileged();
        let mut c = if in_userns {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--pid", "--fork", "--mount-proc", "mmdebstrap"]);
            c
        } else {
            Command::new("mmdebstrap")
        };
        c.args(["--variant=minbase", "--mode=root", "--format=directory"]);
        if in_userns {
            c.arg("--skip=output/dev");
        }
        if !include.is_empty() {
            c.arg(format!("--include={}", include.join(",")));
        }
        for o in apt_options {
            c.arg(format!("--aptopt={o}"));
        }
        c.arg(suite).arg(&tmp);
        let result = match c.status() {
            Ok(s) if s.success() => self.import_dir(
                name,
                &tmp,
                region,
                &format!("kiln image bootstrap --suite {suite} (mmdebstrap)"),
            ),
            Ok(s) => Err(StageError::new(
                ErrorKind::Internal,
                format!("mmdebstrap {suite} failed ({s})"),
            )),
            Err(e) => Err(StageError::new(
                ErrorKind::InvalidPipeline,
                format!("cannot run mmdebstrap ({e}); install it (Debian package `mmdebstrap`) or use `kiln image import`"),
            )),
        };
        let _ = layer::remove_any(&tmp);
        result
    }

    /// Writes the image's root file system (its layers applied in order) as a tarball.
    pub fn export(&self, region: &str, id: &str, out: &Path) -> Result<u64, StageError> {
        let layout = self.layout(region)?;
        let image = layout
            .image(id)
            .map_err(|e| io_error("read images", e))?
            .ok_or_else(|| {
                StageError::new(
                    ErrorKind::InvalidPipeline,
                    format!("no image {id} in {region}"),
                )
            })?;
        let tmp = self.scratch()?;
        let result = (|| {
            for d in layout
                .layers(&image.manifest)
                .map_err(|e| io_error("layers", e))?
            {
                layer::unpack(&layout.blob_path(&d.digest), &tmp, Whiteouts::Apply)
                    .map_err(|e| io_error(format!("apply {}", d.digest), e))?;
            }
            let f = File::create(out).map_err(|e| io_error(out.display(), e))?;
            layer::write_plain(&tmp, BufWriter::new(f))
                .map_err(|e| io_error("write tarball", e))?;
            fs::metadata(out)
                .map(|m| m.len())
                .map_err(|e| io_error(out.display(), e))
        })();
        let _ = layer::remove_any(&tmp);
        result
    }
}
