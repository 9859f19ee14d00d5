//! `kiln image …`, `kiln builds …` and `kiln gc`: the embedded cloud's images, builds and
//! leftovers.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use kiln::local::oci::ImageRecord;
use kiln::local::LocalCloud;
use kiln::model::build::Build;
use kiln::ports::InstanceState;
use serde_json::{json, Value as Json};

use crate::{exit, Output};

const DEFAULT_REGION: &str = "us-east-1";

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import a root file system (a folder, or a tar / tar.gz / tar.zst) as an image.
    Import {
        name: String,
        #[arg(value_name = "FILE|DIR")]
        source: PathBuf,
        /// Regions to import into (repeat; default us-east-1).
        #[arg(long = "region")]
        regions: Vec<String>,
    },
    /// Create a base image: Debian with mmdebstrap, or kiln-tiny from this machine's programs.
    Bootstrap {
        name: String,
        #[arg(long, value_enum, default_value_t = Variant::Debian)]
        variant: Variant,
        /// The Debian suite (stable, bookworm, trixie, …).
        #[arg(long, default_value = "stable")]
        suite: String,
        /// Extra packages (comma-separated).
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
        /// An apt option for mmdebstrap (kept in the image), e.g.
        /// 'Acquire::Check-Valid-Until "false"' for a snapshot mirror (repeat).
        #[arg(long = "apt-option", value_name = "OPTION")]
        apt_options: Vec<String>,
        #[arg(long = "region")]
        regions: Vec<String>,
    },
    /// List images.
    List {
        #[arg(long)]
        region: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show an image: its record, manifest and config.
    Inspect {
        #[arg(value_name = "ID|NAME")]
        image: String,
        #[arg(long, default_value = DEFAULT_REGION)]
        region: String,
    },
    /// Write an image's root file system as a tarball.
    Export {
        #[arg(value_name = "ID|NAME")]
        image: String,
        #[arg(value_name = "FILE.tar")]
        file: PathBuf,
        #[arg(long, default_value = DEFAULT_REGION)]
        region: String,
    },
    /// Deregister images and delete the blobs only they used.
    Rm {
        #[arg(required = true, value_name = "ID|NAME")]
        images: Vec<String>,
        #[arg(long, default_value = DEFAULT_REGION)]
        region: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// mmdebstrap --variant=minbase (needs the Debian mirror).
    Debian,
    /// bash and core tools copied from this machine, with their libraries (offline).
    Tiny,
}

#[derive(Debug, Subcommand)]
pub enum BuildsCommand {
    /// List builds, newest last.
    List {
        /// Only this pipeline's builds.
        pipeline: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        /// The builds of a deployed stack (its DynamoDB table) instead of this machine's.
        #[arg(long, value_name = "NAME")]
        stack: Option<String>,
    },
    /// Show one build document (id or unique prefix).
    Show { build: String },
    /// The events of one build, oldest first.
    History { build: String },
}

fn usage(stderr: &mut dyn Write, message: impl std::fmt::Display) -> anyhow::Result<i32> {
    writeln!(stderr, "{message}")?;
    Ok(exit::INVALID)
}

fn find_image(cloud: &LocalCloud, region: &str, key: &str) -> Result<ImageRecord, String> {
    let images = cloud
        .layout(region)
        .map_err(|e| e.to_string())?
        .images()
        .map_err(|e| e.to_string())?;
    images
        .iter()
        .find(|i| i.id == key)
        .or_else(|| {
            images
                .iter()
                .filter(|i| i.name == key)
                .max_by(|a, b| a.created.cmp(&b.created))
        })
        .cloned()
        .ok_or_else(|| format!("no image `{key}` in {region}; see `kiln image list`"))
}

fn regions_or_default(regions: Vec<String>) -> Vec<String> {
    if regions.is_empty() {
        vec![DEFAULT_REGION.to_string()]
    } else {
        regions
    }
}

pub fn image(
    command: ImageCommand,
    home: &Path,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    let cloud = match open(home) {
        Ok(c) => c,
        Err(e) => return usage(stderr, e),
    };
    match command {
        ImageCommand::Import {
            name,
            source,
            regions,
        } => {
            for region in regions_or_default(regions) {
                match cloud.import(&name, &source, &region) {
                    Ok(r) => writeln!(stdout, "{region}\t{}\t{}", r.id, r.name)?,
                    Err(e) => return usage(stderr, format!("kiln image import: {e}")),
                }
            }
            Ok(exit::OK)
        }
        ImageCommand::Bootstrap {
            name,
            variant,
            suite,
            include,
            apt_options,
            regions,
        } => {
            for region in regions_or_default(regions) {
                let made = match variant {
                    Variant::Tiny => cloud.bootstrap_tiny(&name, &region),
                    Variant::Debian => {
                        cloud.bootstrap_debian(&name, &region, &suite, &include, &apt_options)
                    }
                };
                match made {
                    Ok(r) => writeln!(stdout, "{region}\t{}\t{}", r.id, r.name)?,
                    Err(e) => {
                        writeln!(stderr, "kiln image bootstrap: {e}")?;
                        return Ok(exit::FAILED);
                    }
                }
            }
            Ok(exit::OK)
        }
        ImageCommand::List { region, output } => {
            let regions = match region {
                Some(r) => vec![r],
                None => cloud.regions(),
            };
            let mut rows = Vec::new();
            for region in regions {
                for i in cloud.layout(&region)?.images()? {
                    let size: u64 = cloud
                        .layout(&region)?
                        .layers(&i.manifest)?
                        .iter()
                        .map(|l| l.size)
                        .sum();
                    rows.push(json!({
                        "region": region,
                        "id": i.id,
                        "name": i.name,
                        "created": i.created,
                        "buildId": i.build_id,
                        "compressedBytes": size,
                        "tags": i.tags,
                        "launchPermissions": i.launch_permissions,
                    }));
                }
            }
            match output {
                Output::Json => writeln!(stdout, "{}", serde_json::to_string_pretty(&rows)?)?,
                Output::Text => {
                    writeln!(
                        stdout,
                        "{:<12} {:<22} {:<40} {:>10}  CREATED",
                        "REGION", "ID", "NAME", "SIZE"
                    )?;
                    for r in &rows {
                        writeln!(
                            stdout,
                            "{:<12} {:<22} {:<40} {:>10}  {}",
                            r["region"].as_str().unwrap_or_default(),
                            r["id"].as_str().unwrap_or_default(),
                            r["name"].as_str().unwrap_or_default(),
                            human(r["compressedBytes"].as_u64().unwrap_or(0)),
                            r["created"].as_str().unwrap_or_default()
                        )?;
                    }
                }
            }
            Ok(exit::OK)
        }
        ImageCommand::Inspect { image, region } => {
            let record = match find_image(&cloud, &region, &image) {
                Ok(r) => r,
                Err(e) => return usage(stderr, e),
            };
            let layout = cloud.layout(&region)?;
            let manifest = layout.read_json(&record.manifest.digest)?;
            let config = manifest["config"]["digest"]
                .as_str()
                .map(|d| layout.read_json(d))
                .transpose()?;
            writeln!(
                stdout,
                "{}",
                serde_json::to_string_pretty(&json!({
                    "region": region,
                    "image": record,
                    "layout": layout.dir,
                    "manifest": manifest,
                    "config": config,
                }))?
            )?;
            Ok(exit::OK)
        }
        ImageCommand::Export {
            image,
            file,
            region,
        } => {
            let record = match find_image(&cloud, &region, &image) {
                Ok(r) => r,
                Err(e) => return usage(stderr, e),
            };
            let bytes = cloud.export(&region, &record.id, &file)?;
            writeln!(
                stdout,
                "{}\t{}\t{}",
                record.id,
                file.display(),
                human(bytes)
            )?;
            Ok(exit::OK)
        }
        ImageCommand::Rm { images, region } => {
            let layout = cloud.layout(&region)?;
            for key in images {
                let record = match find_image(&cloud, &region, &key) {
                    Ok(r) => r,
                    Err(e) => return usage(stderr, e),
                };
                layout.remove(&record.id)?;
                writeln!(stdout, "removed {} ({})", record.id, record.name)?;
            }
            // The unpacked trees only the removed images used go with them.
            for (path, bytes) in cloud.unused_layer_dirs()? {
                kiln::local::layer::remove_any(&path)?;
                writeln!(
                    stdout,
                    "freed {} ({})",
                    path.file_name().unwrap_or_default().to_string_lossy(),
                    human(bytes)
                )?;
            }
            Ok(exit::OK)
        }
    }
}

fn open(home: &Path) -> Result<LocalCloud, String> {
    // Images and builds need no sandbox: the agent is only located, not required.
    let agent = crate::run::agent_binary().unwrap_or_else(|_| PathBuf::from("kiln-agent"));
    LocalCloud::open(home, &agent).map_err(|e| e.to_string())
}

pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

pub fn builds(
    command: BuildsCommand,
    home: &Path,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    let cloud = match open(home) {
        Ok(c) => c,
        Err(e) => return usage(stderr, e),
    };
    let find = |id: &str| -> Result<Build, String> {
        cloud
            .store
            .find_build(id)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no build `{id}`; see `kiln builds list`"))
    };
    match command {
        BuildsCommand::List {
            pipeline,
            output,
            stack: _,
        } => {
            let all: Vec<Build> = cloud
                .store
                .all_builds()?
                .into_iter()
                .filter(|b| pipeline.as_ref().is_none_or(|p| &b.pipeline == p))
                .collect();
            write_builds(&all, output, stdout)?;
            Ok(exit::OK)
        }
        BuildsCommand::Show { build } => match find(&build) {
            Ok(b) => {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&b)?)?;
                Ok(exit::OK)
            }
            Err(e) => usage(stderr, e),
        },
        BuildsCommand::History { build } => {
            let b = match find(&build) {
                Ok(b) => b,
                Err(e) => return usage(stderr, e),
            };
            let text = std::fs::read_to_string(cloud.home.join("events.jsonl")).unwrap_or_default();
            for line in text.lines() {
                let Ok(e) = serde_json::from_str::<Json>(line) else {
                    continue;
                };
                if e["detail"]["build"] == json!(b.id.0) {
                    writeln!(
                        stdout,
                        "{}  {:<12} {}",
                        e["time"].as_str().unwrap_or_default(),
                        e["detail"]["state"].as_str().unwrap_or_default(),
                        // The reason carries the failure's output tail: what an instance printed.
                        crate::terminal_safe(
                            e["detail"]["failureReason"].as_str().unwrap_or_default()
                        )
                    )?;
                }
            }
            Ok(exit::OK)
        }
    }
}

/// Builds as a table (or JSON).
pub fn write_builds(all: &[Build], output: Output, stdout: &mut dyn Write) -> anyhow::Result<()> {
    match output {
        Output::Json => writeln!(stdout, "{}", serde_json::to_string_pretty(&all)?)?,
        Output::Text => {
            writeln!(
                stdout,
                "{:<26} {:<20} {:<10} {:<12} {:<20} IMAGES",
                "BUILD", "PIPELINE", "VERSION", "STATUS", "STARTED"
            )?;
            for b in all {
                let images: Vec<String> = b
                    .regions
                    .iter()
                    .filter_map(|r| r.image.as_ref().map(|i| format!("{}={i}", r.region)))
                    .collect();
                writeln!(
                    stdout,
                    "{:<26} {:<20} {:<10} {:<12} {:<20} {}",
                    b.id,
                    b.pipeline,
                    b.version(),
                    b.status.as_str(),
                    b.build_date,
                    images.join(" ")
                )?;
            }
        }
    }
    Ok(())
}

/// What `kiln gc` found and removed.
#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Collected {
    pub builds_cleaned: Vec<String>,
    pub instances_terminated: Vec<String>,
    /// In a dry run, what would be freed and removed: nothing is.
    pub bytes_freed: u64,
    pub layer_dirs_removed: usize,
    pub dry_run: bool,
    /// Every path removed (or that would be), with its bytes.
    pub removed: Vec<Removed>,
}

#[derive(Debug, serde::Serialize)]
pub struct Removed {
    pub path: String,
    pub bytes: u64,
}

/// Builds whose `kiln run` process is gone are cleaned up (instances terminated, partial images
/// removed, CANCELLED, lock released); instances of no running build are terminated; blobs,
/// unpacked layers and scratch space nothing refers to are deleted.
pub fn gc(
    home: &Path,
    dry_run: bool,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    let cloud = match crate::run::open_cloud(home) {
        Ok(c) => c,
        Err(e) => return usage(stderr, e),
    };
    let mut done = Collected::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let active: Vec<Build> = cloud
        .store
        .all_builds()?
        .into_iter()
        .filter(|b| !b.status.is_final())
        .collect();
    let mut running = BTreeSet::new();
    for b in active {
        if crate::run::owner_alive(&cloud, &b) {
            running.insert(b.id.0.clone());
            continue;
        }
        done.builds_cleaned.push(b.id.0.clone());
        if !dry_run {
            let ports = kiln::ports::PortsProvider::ports(&cloud);
            let event = json!({
                "op": "run",
                "build": b,
                "error": {"Error": "Kiln.Cancelled", "Cause": "abandoned: the kiln run that started it is gone (kiln gc)"}
            });
            if let Err(e) = runtime.block_on(kiln::stages::handler::handle(
                &ports,
                kiln::stages::handler::Function::Cleanup,
                event,
            )) {
                writeln!(stderr, "cleanup of {}: {e}", b.id)?;
            }
        }
    }
    let host_instances = cloud.instances();
    for r in host_instances {
        let build = r.tags.get("kiln:build-id").cloned().unwrap_or_default();
        if r.state != InstanceState::Terminated && !running.contains(&build) {
            done.instances_terminated.push(r.id.clone());
            if !dry_run {
                cloud.terminate_instance(&r.id)?;
            }
        }
    }
    let swept = cloud.sweep(dry_run)?;
    done.bytes_freed = swept.bytes;
    done.layer_dirs_removed = swept.layer_dirs;
    done.dry_run = dry_run;
    done.removed = swept
        .paths
        .iter()
        .map(|(path, bytes)| Removed {
            path: path.display().to_string(),
            bytes: *bytes,
        })
        .collect();
    writeln!(stdout, "{}", serde_json::to_string_pretty(&done)?)?;
    Ok(exit::OK)
}
