//! An OCI image layout per region: `oci-layout`, `index.json`, `blobs/sha256/…`. Each image is
//! one manifest in the index; its id (shaped like an AMI id) is the manifest's
//! `org.opencontainers.image.ref.name`, so `skopeo inspect oci:<dir>:<id>` finds it. Names, tags,
//! launch permissions and the build id are annotations. Changes to the index are atomic (write
//! then rename) and serialised by a lock file, so several kiln processes may share a home.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};

use crate::model::pipeline::LaunchPermission;

pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CREATED: &str = "org.opencontainers.image.created";
const NAME: &str = "io.kiln.image.name";
const TAGS: &str = "io.kiln.image.tags";
const PERMISSIONS: &str = "io.kiln.image.launch-permissions";
const BUILD: &str = "io.kiln.build-id";
const DEPRECATED: &str = "io.kiln.image.deprecated";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image as the index describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    pub id: String,
    pub name: String,
    pub created: String,
    pub tags: BTreeMap<String, String>,
    pub launch_permissions: Vec<LaunchPermission>,
    pub build_id: Option<String>,
    pub deprecated: Option<String>,
    pub manifest: Descriptor,
}

impl ImageRecord {
    fn from_descriptor(d: &Descriptor) -> Option<ImageRecord> {
        let a = &d.annotations;
        Some(ImageRecord {
            id: a.get(REF_NAME)?.clone(),
            name: a.get(NAME).cloned().unwrap_or_default(),
            created: a.get(CREATED).cloned().unwrap_or_default(),
            tags: a
                .get(TAGS)
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or_default(),
            launch_permissions: a
                .get(PERMISSIONS)
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or_default(),
            build_id: a.get(BUILD).cloned(),
            deprecated: a.get(DEPRECATED).cloned(),
            manifest: d.clone(),
        })
    }

    fn descriptor(&self) -> Descriptor {
        let mut d = self.manifest.clone();
        let a = &mut d.annotations;
        a.insert(REF_NAME.into(), self.id.clone());
        a.insert(NAME.into(), self.name.clone());
        a.insert(CREATED.into(), self.created.clone());
        a.insert(TAGS.into(), json!(self.tags).to_string());
        a.insert(
            PERMISSIONS.into(),
            json!(self.launch_permissions).to_string(),
        );
        match &self.build_id {
            Some(b) => a.insert(BUILD.into(), b.clone()),
            None => a.remove(BUILD),
        };
        match &self.deprecated {
            Some(b) => a.insert(DEPRECATED.into(), b.clone()),
            None => a.remove(DEPRECATED),
        };
        d
    }
}

/// A region's image store.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
    /// The blobs this handle (and its clones) added, when it keeps account (`journaled`).
    written: Option<Arc<Mutex<Vec<String>>>>,
}

fn bad_data(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Writes `bytes` to `path` atomically (temporary file, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

impl Layout {
    /// Opens (creating when needed) the layout at `dir`.
    pub fn open(dir: &Path) -> io::Result<Layout> {
        fs::create_dir_all(dir.join("blobs/sha256"))?;
        fs::create_dir_all(dir.join("tmp"))?;
        let layout = dir.join("oci-layout");
        if !layout.exists() {
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = dir.join("index.json");
        if !index.exists() {
            write_atomic(
                &index,
                json!({
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": []
                })
                .to_string()
                .as_bytes(),
            )?;
        }
        Ok(Layout {
            dir: dir.to_path_buf(),
            written: None,
        })
    }

    /// A handle that remembers every blob it adds (not those that were there already), so that
    /// a writer that fails or is cancelled can take back exactly what it wrote.
    pub fn journaled(&self) -> Layout {
        Layout {
            dir: self.dir.clone(),
            written: Some(Arc::default()),
        }
    }

    /// Deletes the blobs this journaled handle added that no image of the index uses.
    pub fn take_back(&self) -> io::Result<()> {
        let Some(written) = &self.written else {
            return Ok(());
        };
        let mut keep = BTreeSet::new();
        for image in self.images()? {
            for d in self.blobs_of(&image.manifest)? {
                keep.insert(d.digest);
            }
        }
        let written = written.lock().map(|w| w.clone()).unwrap_or_default();
        for digest in written.iter().filter(|d| !keep.contains(*d)) {
            match fs::remove_file(self.blob_path(digest)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir.join("blobs/sha256").join(hex)
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).exists()
    }

    /// A temporary file in the layout (on the same file system as the blobs).
    pub fn temp_file(&self) -> io::Result<(PathBuf, File)> {
        let path = self
            .dir
            .join("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let f = File::create(&path)?;
        Ok((path, f))
    }

    /// Moves a finished temporary file into place as the blob `digest`.
    pub fn commit_blob(&self, tmp: &Path, digest: &str) -> io::Result<()> {
        let target = self.blob_path(digest);
        if target.exists() {
            return fs::remove_file(tmp);
        }
        fs::rename(tmp, target)?;
        if let Some(w) = &self.written {
            if let Ok(mut w) = w.lock() {
                w.push(format!("sha256:{}", digest.trim_start_matches("sha256:")));
            }
        }
        Ok(())
    }

    /// Writes folder `dir` as one tar+zstd layer blob (see `layer::write`).
    pub fn put_layer(
        &self,
        dir: &Path,
        overlay: bool,
        exclude: &BTreeSet<String>,
    ) -> io::Result<(Descriptor, crate::local::layer::Layer)> {
        let (tmp, file) = self.temp_file()?;
        match crate::local::layer::write(dir, overlay, exclude, 3, io::BufWriter::new(file)) {
            Ok(l) => {
                self.commit_blob(&tmp, &l.digest)?;
                let d = Descriptor {
                    media_type: LAYER_ZSTD.into(),
                    digest: l.digest.clone(),
                    size: l.size,
                    annotations: BTreeMap::new(),
                };
                Ok((d, l))
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Writes the config and manifest of `layer` stacked on `parent` (a manifest of this
    /// layout; `None` for a base image): diff_ids and history extended. Returns the manifest.
    pub fn put_image(
        &self,
        parent: Option<&Descriptor>,
        layer: &Descriptor,
        diff_id: &str,
        created_by: &str,
        created: &str,
    ) -> io::Result<Descriptor> {
        let (mut config, mut layers) = match parent {
            Some(p) => {
                let m = self.read_json(&p.digest)?;
                let digest = m["config"]["digest"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                (self.read_json(&digest)?, self.layers(p)?)
            }
            None => (config(&[], &[], created), Vec::new()),
        };
        let mut diff_ids: Vec<String> =
            serde_json::from_value(config["rootfs"]["diff_ids"].clone()).unwrap_or_default();
        diff_ids.push(diff_id.to_string());
        config["rootfs"]["diff_ids"] = json!(diff_ids);
        config["created"] = json!(created);
        if let Some(h) = config["history"].as_array_mut() {
            h.push(json!({"created": created, "created_by": created_by}));
        }
        let config = self.put_json(CONFIG, &config)?;
        layers.push(layer.clone());
        self.put_json(
            MANIFEST,
            &json!({
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": config,
                "layers": layers,
            }),
        )
    }

    pub fn put_json(&self, media_type: &str, value: &Json) -> io::Result<Descriptor> {
        let bytes = serde_json::to_vec(value).map_err(bad_data)?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if !self.has_blob(&digest) {
            let (tmp, mut f) = self.temp_file()?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            self.commit_blob(&tmp, &digest)?;
        }
        Ok(Descriptor {
            media_type: media_type.into(),
            digest,
            size: bytes.len() as u64,
            annotations: BTreeMap::new(),
        })
    }

    /// The image's architecture as EC2 names it (OCI's `amd64` is EC2's `x86_64`).
    pub fn architecture(&self, manifest: &Descriptor) -> io::Result<String> {
        let m = self.read_json(&manifest.digest)?;
        let digest = m["config"]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let config = self.read_json(&digest)?;
        Ok(match config["architecture"].as_str().unwrap_or_default() {
            "amd64" => "x86_64".to_string(),
            other => other.to_string(),
        })
    }

    pub fn read_json(&self, digest: &str) -> io::Result<Json> {
        let bytes = fs::read(self.blob_path(digest))?;
        serde_json::from_slice(&bytes).map_err(bad_data)
    }

    /// The layer descriptors of a manifest, bottom first.
    pub fn layers(&self, manifest: &Descriptor) -> io::Result<Vec<Descriptor>> {
        let m = self.read_json(&manifest.digest)?;
        serde_json::from_value(m.get("layers").cloned().unwrap_or(json!([]))).map_err(bad_data)
    }

    /// Every blob a manifest needs: the manifest, its config and its layers.
    pub fn blobs_of(&self, manifest: &Descriptor) -> io::Result<Vec<Descriptor>> {
        let m = self.read_json(&manifest.digest)?;
        let mut all = vec![manifest.clone()];
        let config: Descriptor =
            serde_json::from_value(m.get("config").cloned().unwrap_or(Json::Null))
                .map_err(bad_data)?;
        all.push(config);
        all.extend(self.layers(manifest)?);
        Ok(all)
    }

    fn read_index(&self) -> io::Result<Json> {
        let bytes = fs::read(self.dir.join("index.json"))?;
        serde_json::from_slice(&bytes).map_err(bad_data)
    }

    fn descriptors(index: &Json) -> Vec<Descriptor> {
        index
            .get("manifests")
            .and_then(|m| serde_json::from_value(m.clone()).ok())
            .unwrap_or_default()
    }

    pub fn images(&self) -> io::Result<Vec<ImageRecord>> {
        Ok(Self::descriptors(&self.read_index()?)
            .iter()
            .filter_map(ImageRecord::from_descriptor)
            .collect())
    }

    pub fn image(&self, id: &str) -> io::Result<Option<ImageRecord>> {
        Ok(self.images()?.into_iter().find(|i| i.id == id))
    }

    /// Changes the index under the layout's lock; `change` returns what to report.
    pub fn update<T>(
        &self,
        change: impl FnOnce(&mut Vec<ImageRecord>) -> io::Result<T>,
    ) -> io::Result<T> {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("index.lock"))?;
        let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io::Error::other(e.to_string()))?;
        let mut index = self.read_index()?;
        let descriptors = Self::descriptors(&index);
        // Entries kiln did not write (no ref name) are kept as they are.
        let (mut images, foreign): (Vec<_>, Vec<_>) = (
            descriptors
                .iter()
                .filter_map(ImageRecord::from_descriptor)
                .collect::<Vec<_>>(),
            descriptors
                .iter()
                .filter(|d| !d.annotations.contains_key(REF_NAME))
                .cloned()
                .collect::<Vec<_>>(),
        );
        let out = change(&mut images)?;
        let mut all: Vec<Descriptor> = images.iter().map(ImageRecord::descriptor).collect();
        all.extend(foreign);
        index["manifests"] = serde_json::to_value(all).map_err(bad_data)?;
        write_atomic(
            &self.dir.join("index.json"),
            serde_json::to_vec_pretty(&index)
                .map_err(bad_data)?
                .as_slice(),
        )?;
        Ok(out)
    }

    pub fn add(&self, record: ImageRecord) -> io::Result<()> {
        self.update(|images| {
            images.retain(|i| i.id != record.id);
            images.push(record);
            Ok(())
        })
    }

    /// Removes the image and the blobs no other image uses; a missing image is fine.
    pub fn remove(&self, id: &str) -> io::Result<bool> {
        let removed = self.update(|images| {
            let before = images.len();
            images.retain(|i| i.id != id);
            Ok(before != images.len())
        })?;
        if removed {
            self.sweep()?;
        }
        Ok(removed)
    }

    /// Blobs no manifest in the index refers to, and leftovers in `tmp/`, with their sizes.
    pub fn unreferenced(&self) -> io::Result<Vec<(PathBuf, u64)>> {
        let mut keep = BTreeSet::new();
        for image in self.images()? {
            for d in self.blobs_of(&image.manifest)? {
                keep.insert(d.digest.trim_start_matches("sha256:").to_string());
            }
        }
        let mut found = vec![];
        for e in fs::read_dir(self.dir.join("blobs/sha256"))? {
            let e = e?;
            if !keep.contains(e.file_name().to_string_lossy().as_ref()) {
                found.push((e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)));
            }
        }
        for e in fs::read_dir(self.dir.join("tmp"))? {
            let e = e?;
            found.push((e.path(), crate::local::layer::size_of(&e.path())));
        }
        Ok(found)
    }

    /// Deletes what [`Layout::unreferenced`] finds; returns the bytes freed.
    pub fn sweep(&self) -> io::Result<u64> {
        let mut freed = 0;
        for (path, bytes) in self.unreferenced()? {
            crate::local::layer::remove_any(&path)?;
            freed += bytes;
        }
        Ok(freed)
    }

    /// Copies a blob from `from` unless it is here already, checking its digest on the way.
    /// Returns the bytes copied.
    pub fn copy_blob(&self, from: &Layout, d: &Descriptor) -> io::Result<u64> {
        if self.has_blob(&d.digest) {
            return Ok(0);
        }
        let mut src = File::open(from.blob_path(&d.digest))?;
        let (tmp, mut dst) = self.temp_file()?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let read = src.read(&mut buf)?;
            if read == 0 {
                break;
            }
            hasher.update(&buf[..read]);
            dst.write_all(&buf[..read])?;
            n += read as u64;
        }
        dst.sync_all()?;
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        if got != d.digest || n != d.size {
            let _ = fs::remove_file(&tmp);
            return Err(bad_data(format!(
                "blob {} is corrupt in {} (read {got}, {n} bytes)",
                d.digest,
                from.dir.display()
            )));
        }
        self.commit_blob(&tmp, &d.digest)?;
        Ok(n)
    }
}

/// The image config for `diff_ids` (bottom first).
pub fn config(diff_ids: &[String], history: &[String], created: &str) -> Json {
    json!({
        "created": created,
        "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"]
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history.iter().map(|h| json!({"created": created, "created_by": h})).collect::<Vec<_>>()
    })
}
