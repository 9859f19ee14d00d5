//! A clean image: the builder's sanitize step (what Image Builder removes before its snapshot:
//! host keys, the key pair, cloud-init's and the SSM agent's instance state, machine-id,
//! histories, logs, leases, temporary files) and the test instance's check that the image carries
//! none of it and nothing of kiln.
//!
//! Sanitizing records every non-empty file it removes or empties with its SHA-256 (never the
//! content). The check on the test instance then needs no list of what "should" be there: a
//! recorded path that exists with the recorded content is the builder's file, still in the image.
//! A test instance makes its own host keys, machine-id and cloud-init state at boot, which differ.

use std::fs;
use std::path::{Path, PathBuf};

use kiln::model::pipeline::SanitizeItem;
use serde::{Deserialize, Serialize};

use crate::report::{DocumentReport, Failure, PhaseReport, Status, StepReport};

/// The report's name for the check on the test instance.
pub const CHECK_NAME: &str = "kiln-clean-image";
/// The report's name for the sanitize step on the builder.
pub const SANITIZE_NAME: &str = "kiln-sanitize";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    Remove,
    Empty,
}

/// What an item removes (or empties): absolute patterns where `*` matches within one name.
fn targets(item: SanitizeItem) -> Vec<(How, String)> {
    use How::*;
    const HISTORIES: [&str; 7] = [
        ".bash_history",
        ".zsh_history",
        ".python_history",
        ".lesshst",
        ".viminfo",
        ".mysql_history",
        ".psql_history",
    ];
    let fixed: Vec<(How, &str)> = match item {
        SanitizeItem::SshHostKeys => vec![(Remove, "/etc/ssh/ssh_host_*")],
        SanitizeItem::AuthorizedKeys => vec![
            (Remove, "/root/.ssh/authorized_keys"),
            (Remove, "/home/*/.ssh/authorized_keys"),
        ],
        SanitizeItem::CloudInit => vec![
            (Remove, "/var/lib/cloud/instance"),
            (Remove, "/var/lib/cloud/instances/*"),
            (Remove, "/var/lib/cloud/data/*"),
            (Remove, "/var/lib/cloud/sem/*"),
            (Remove, "/var/lib/cloud/handlers/*"),
            (Remove, "/var/log/cloud-init.log"),
            (Remove, "/var/log/cloud-init-output.log"),
        ],
        SanitizeItem::MachineId => vec![
            (Empty, "/etc/machine-id"),
            (Remove, "/var/lib/dbus/machine-id"),
        ],
        SanitizeItem::ShellHistory => {
            return HISTORIES
                .iter()
                .flat_map(|h| {
                    [
                        (Remove, format!("/root/{h}")),
                        (Remove, format!("/home/*/{h}")),
                    ]
                })
                .collect()
        }
        SanitizeItem::SsmAgent => vec![
            (Remove, "/var/lib/amazon/ssm/i-*"),
            (Remove, "/var/lib/amazon/ssm/mi-*"),
            (Remove, "/var/log/amazon/ssm/*"),
        ],
        SanitizeItem::Logs => vec![
            (Empty, "/var/log/audit/audit.log"),
            (Empty, "/var/log/boot.log"),
            (Empty, "/var/log/dmesg"),
            (Empty, "/var/log/cron"),
            (Empty, "/var/log/messages"),
            (Empty, "/var/log/secure"),
            (Empty, "/var/log/syslog"),
            (Empty, "/var/log/auth.log"),
            (Empty, "/var/log/wtmp"),
            (Empty, "/var/log/btmp"),
            (Empty, "/var/log/lastlog"),
            (Remove, "/var/log/journal/*"),
        ],
        SanitizeItem::DhcpLeases => vec![
            (Remove, "/var/lib/dhclient/*"),
            (Remove, "/var/lib/dhcp/*.leases"),
            (Remove, "/var/lib/NetworkManager/*.lease"),
        ],
        SanitizeItem::Tmp => vec![(Remove, "/tmp/*"), (Remove, "/var/tmp/*")],
    };
    fixed.into_iter().map(|(h, p)| (h, p.to_string())).collect()
}

/// One file the builder removed or emptied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub item: SanitizeItem,
    /// Absolute, as the instance sees it.
    pub path: String,
    pub sha256: String,
}

/// What the sanitize step did, for the test stage's check.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    pub items: Vec<SanitizeItem>,
    pub removed: Vec<Removed>,
}

/// `*` within one name: a literal prefix and suffix around at most one star.
fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((pre, post)) => {
            name.len() >= pre.len() + post.len() && name.starts_with(pre) && name.ends_with(post)
        }
    }
}

/// The paths under `root` that `pattern` names. Never descends through a symbolic link: a
/// `/home/*` that is a link is not followed.
fn expand(root: &Path, pattern: &str) -> Vec<PathBuf> {
    let mut found = vec![PathBuf::from("/")];
    let parts: Vec<&str> = pattern.trim_start_matches('/').split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        let part = *part;
        let mut next = Vec::new();
        for dir in &found {
            let host = root.join(dir.strip_prefix("/").unwrap_or(dir));
            if !part.contains('*') {
                let p = dir.join(part);
                if root
                    .join(p.strip_prefix("/").unwrap_or(&p))
                    .symlink_metadata()
                    .is_ok()
                {
                    next.push(p);
                }
                continue;
            }
            let Ok(entries) = fs::read_dir(&host) else {
                continue;
            };
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| name_matches(part, n))
                .collect();
            names.sort();
            next.extend(names.into_iter().map(|n| dir.join(n)));
        }
        // Only the last part may be a link; the ones before must be real folders.
        found = next;
        if i + 1 < parts.len() {
            found.retain(|p| {
                root.join(p.strip_prefix("/").unwrap_or(p))
                    .symlink_metadata()
                    .is_ok_and(|m| m.is_dir())
            });
        }
    }
    found
}

/// Every non-empty regular file at or below `host` (links not followed), with the instance's path.
fn files_below(host: &Path, shown: &Path, out: &mut Vec<(PathBuf, PathBuf)>) {
    let Ok(meta) = host.symlink_metadata() else {
        return;
    };
    if meta.is_file() && meta.len() > 0 {
        out.push((host.to_path_buf(), shown.to_path_buf()));
    } else if meta.is_dir() {
        if let Ok(entries) = fs::read_dir(host) {
            for e in entries.flatten() {
                files_below(&e.path(), &shown.join(e.file_name()), out);
            }
        }
    }
}

/// Removes (or empties) what `items` name below `root`; the record of what it took.
pub fn sanitize(root: &Path, items: &[SanitizeItem]) -> Result<Record, String> {
    let mut record = Record {
        items: items.to_vec(),
        removed: Vec::new(),
    };
    for &item in items {
        for (how, pattern) in targets(item) {
            for shown in expand(root, &pattern) {
                let host = root.join(shown.strip_prefix("/").unwrap_or(&shown));
                let mut files = Vec::new();
                files_below(&host, &shown, &mut files);
                for (h, s) in &files {
                    let sha256 = kiln::digest::sha256_file(h)
                        .map_err(|e| format!("read {}: {e}", s.display()))?;
                    record.removed.push(Removed {
                        item,
                        path: s.display().to_string(),
                        sha256,
                    });
                }
                let meta = host
                    .symlink_metadata()
                    .map_err(|e| format!("{}: {e}", shown.display()))?;
                let done = match how {
                    How::Empty if meta.is_file() => fs::File::create(&host).map(drop),
                    How::Empty => Ok(()),
                    How::Remove if meta.is_dir() => fs::remove_dir_all(&host),
                    How::Remove => fs::remove_file(&host),
                };
                done.map_err(|e| format!("{} ({}): {e}", shown.display(), item.as_str()))?;
            }
        }
    }
    Ok(record)
}

fn step(name: &str, started: &str, problems: &[String]) -> StepReport {
    let ended = crate::report::now();
    StepReport {
        name: name.to_string(),
        action: "KilnCleanImage".into(),
        status: if problems.is_empty() {
            Status::Success
        } else {
            Status::Failed
        },
        attempts: 1,
        iterations: 1,
        start_time: started.to_string(),
        end_time: ended,
        duration_seconds: 0.0,
        exit_code: None,
        stdout_tail: String::new(),
        stderr_tail: problems.join("\n"),
        outputs: serde_json::Value::Null,
        failure_message: (!problems.is_empty()).then(|| {
            let shown: Vec<&str> = problems.iter().take(10).map(String::as_str).collect();
            let more = problems.len().saturating_sub(10);
            format!(
                "{}{}",
                shown.join("; "),
                if more > 0 {
                    format!("; and {more} more")
                } else {
                    String::new()
                }
            )
        }),
        nested: Vec::new(),
    }
}

/// The report of a step run by kiln itself, as one document of one phase.
fn document(name: &str, phase: &str, steps: Vec<StepReport>) -> (DocumentReport, Option<Failure>) {
    let failed = steps.iter().find(|s| s.status == Status::Failed);
    let failure = failed.map(|s| Failure {
        document: name.to_string(),
        phase: phase.to_string(),
        step: s.name.clone(),
        message: s.failure_message.clone().unwrap_or_default(),
        output_tail: s.stderr_tail.clone(),
    });
    let status = if failure.is_some() {
        Status::Failed
    } else {
        Status::Success
    };
    (
        DocumentReport {
            name: name.to_string(),
            path: format!("(built into kiln-agent {})", env!("CARGO_PKG_VERSION")),
            status,
            phases: vec![PhaseReport {
                name: phase.to_string(),
                status,
                steps,
            }],
        },
        failure,
    )
}

/// The sanitize step as a report document (one step per item); `Err` when removing failed.
pub fn sanitize_report(
    root: &Path,
    items: &[SanitizeItem],
) -> (Record, DocumentReport, Option<Failure>) {
    let mut steps = Vec::new();
    let mut record = Record {
        items: items.to_vec(),
        removed: Vec::new(),
    };
    for &item in items {
        let started = crate::report::now();
        let problems = match sanitize(root, &[item]) {
            Ok(r) => {
                record.removed.extend(r.removed);
                Vec::new()
            }
            Err(e) => vec![e],
        };
        steps.push(step(item.as_str(), &started, &problems));
    }
    let (doc, failure) = document(SANITIZE_NAME, "build", steps);
    (record, doc, failure)
}

/// How the check on a test instance treats a file the builder removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// The builder's if it is here with the recorded content (keys, machine-id, histories, logs,
    /// leases, temporary files: a new instance makes its own, which differ).
    Content,
    /// The builder's if it is here at all: it sits under the builder's instance id
    /// (`/var/lib/cloud/instances/i-…`, `/var/lib/amazon/ssm/i-…`).
    Exists,
    /// Not checked: a new instance legitimately has the same (cloud-init's per-boot data, the
    /// key pair's `authorized_keys` when the test instance is launched with the same key pair).
    Skip,
}

fn check_of(r: &Removed) -> Check {
    match r.item {
        SanitizeItem::AuthorizedKeys => Check::Skip,
        SanitizeItem::CloudInit if r.path.starts_with("/var/lib/cloud/instances/") => Check::Exists,
        SanitizeItem::CloudInit if r.path.starts_with("/var/log/") => Check::Content,
        SanitizeItem::CloudInit => Check::Skip,
        SanitizeItem::SsmAgent if r.path.starts_with("/var/lib/amazon/ssm/") => Check::Exists,
        _ => Check::Content,
    }
}

/// The test instance's check: for each item, none of the builder's recorded files is here (with
/// its content, or at all when its path names the builder); and none of `absent` (kiln's
/// folders on the builder) exists. `authorized-keys` is reported skipped.
pub fn verify(
    root: &Path,
    items: &[SanitizeItem],
    record: &Record,
    absent: &[String],
) -> (DocumentReport, Option<Failure>) {
    let mut steps = Vec::new();
    let started = crate::report::now();
    let kiln: Vec<String> = absent
        .iter()
        .filter(|p| {
            root.join(p.trim_start_matches('/'))
                .symlink_metadata()
                .is_ok()
        })
        .map(|p| format!("{p} is in the image"))
        .collect();
    steps.push(step("kiln-files", &started, &kiln));
    for &item in items {
        let started = crate::report::now();
        let problems: Vec<String> = if !record.items.contains(&item) {
            vec![format!(
                "the builder did not sanitize {} (its record lists {})",
                item.as_str(),
                SanitizeItem::list(&record.items)
            )]
        } else {
            record
                .removed
                .iter()
                .filter(|r| r.item == item)
                .filter(|r| {
                    let here = root.join(r.path.trim_start_matches('/'));
                    match check_of(r) {
                        Check::Skip => false,
                        Check::Exists => here.symlink_metadata().is_ok(),
                        Check::Content => {
                            here.symlink_metadata().is_ok_and(|m| m.is_file())
                                && kiln::digest::sha256_file(&here).is_ok_and(|h| h == r.sha256)
                        }
                    }
                })
                .map(|r| format!("{} is the builder's ({})", r.path, item.as_str()))
                .collect()
        };
        let mut s = step(item.as_str(), &started, &problems);
        if item == SanitizeItem::AuthorizedKeys && problems.is_empty() {
            s.status = Status::Skipped;
            s.stdout_tail = "not checked: a test instance launched with the same key pair has the same authorized_keys".into();
        }
        steps.push(s);
    }
    document(CHECK_NAME, "test", steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, path: &str, body: &str) {
        let p = root.join(path.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, body).unwrap();
    }

    #[test]
    fn sanitize_removes_what_each_item_names_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "/etc/ssh/ssh_host_ed25519_key", "secret");
        write(
            root,
            "/etc/ssh/ssh_host_ed25519_key.pub",
            "ssh-ed25519 AAAA",
        );
        write(root, "/etc/ssh/sshd_config", "PermitRootLogin no");
        write(root, "/etc/machine-id", "0123456789abcdef\n");
        write(root, "/home/ec2-user/.bash_history", "aws configure");
        write(
            root,
            "/home/ec2-user/.ssh/authorized_keys",
            "ssh-rsa builder",
        );
        write(root, "/var/lib/cloud/instances/i-0abc/obj.pkl", "x");
        write(root, "/var/log/amazon/ssm/amazon-ssm-agent.log", "log");
        write(root, "/tmp/build/cache", "c");
        // A link out of the tree is removed as a link, never followed.
        let outside = tempfile::tempdir().unwrap();
        write(outside.path(), "/keep", "keep");
        std::os::unix::fs::symlink(outside.path(), root.join("tmp/escape")).unwrap();
        let record = sanitize(root, &SanitizeItem::ALL).unwrap();
        for gone in [
            "etc/ssh/ssh_host_ed25519_key",
            "etc/ssh/ssh_host_ed25519_key.pub",
            "home/ec2-user/.bash_history",
            "home/ec2-user/.ssh/authorized_keys",
            "var/lib/cloud/instances/i-0abc",
            "var/log/amazon/ssm/amazon-ssm-agent.log",
            "tmp/build",
            "tmp/escape",
        ] {
            assert!(root.join(gone).symlink_metadata().is_err(), "{gone}");
        }
        assert_eq!(fs::read(root.join("etc/machine-id")).unwrap(), b"");
        assert!(root.join("etc/ssh/sshd_config").exists());
        assert!(root.join("tmp").is_dir());
        assert!(outside.path().join("keep").exists());
        let paths: Vec<&str> = record.removed.iter().map(|r| r.path.as_str()).collect();
        assert!(paths.contains(&"/etc/machine-id"), "{paths:?}");
        assert!(paths.contains(&"/var/lib/cloud/instances/i-0abc/obj.pkl"));
        assert!(!paths.iter().any(|p| p.contains("keep")));
    }

    #[test]
    fn a_linked_home_folder_is_not_followed_out_of_the_tree() {
        // GIVEN /home/evil, a link to a folder outside the image holding a history and keys
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "/home/ec2-user/.bash_history", "mine");
        let outside = tempfile::tempdir().unwrap();
        write(outside.path(), "/.bash_history", "the host's");
        write(outside.path(), "/.ssh/authorized_keys", "the host's keys");
        std::os::unix::fs::symlink(outside.path(), root.join("home/evil")).unwrap();
        // WHEN the image is sanitized
        let record = sanitize(root, &SanitizeItem::ALL).unwrap();
        // THEN the image's own history goes, and nothing behind the link is touched or recorded
        assert!(!root.join("home/ec2-user/.bash_history").exists());
        assert!(outside.path().join(".bash_history").exists());
        assert!(outside.path().join(".ssh/authorized_keys").exists());
        assert!(
            !record
                .removed
                .iter()
                .any(|r| r.path.starts_with("/home/evil")),
            "{:?}",
            record.removed
        );
    }

    #[test]
    fn verify_names_the_builders_files_still_in_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "/etc/ssh/ssh_host_rsa_key", "builder key");
        write(root, "/etc/machine-id", "builder\n");
        let record = sanitize(root, &SanitizeItem::ALL).unwrap();
        // A fresh instance's own key and machine-id: clean.
        write(root, "/etc/ssh/ssh_host_rsa_key", "new key");
        write(root, "/etc/machine-id", "new\n");
        let (doc, failure) = verify(root, &SanitizeItem::ALL, &record, &[]);
        assert!(failure.is_none(), "{doc:?}");
        // The builder's key back in the image, and kiln's folder: named.
        write(root, "/etc/ssh/ssh_host_rsa_key", "builder key");
        write(root, "/var/lib/kiln/b-1/customize/params.json", "{}");
        let (doc, failure) = verify(
            root,
            &SanitizeItem::ALL,
            &record,
            &["/var/lib/kiln/b-1/customize".into()],
        );
        let failure = failure.expect("a failure");
        assert_eq!(failure.document, CHECK_NAME);
        assert_eq!(failure.step, "kiln-files");
        let failed: Vec<&str> = doc.phases[0]
            .steps
            .iter()
            .filter(|s| s.status == Status::Failed)
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(failed, ["kiln-files", "ssh-host-keys"]);
        // cloud-init's per-boot data and the key pair's authorized_keys are the same on a new
        // instance: not the builder's; the builder's instance folder is, whatever it holds.
        let dir2 = tempfile::tempdir().unwrap();
        let root2 = dir2.path();
        write(
            root2,
            "/var/lib/cloud/data/previous-datasource",
            "DataSourceEc2Local",
        );
        write(
            root2,
            "/var/lib/cloud/instances/i-0builder/boot-finished",
            "1",
        );
        write(root2, "/root/.ssh/authorized_keys", "ssh-rsa keypair");
        let record2 = sanitize(root2, &SanitizeItem::ALL).unwrap();
        write(
            root2,
            "/var/lib/cloud/data/previous-datasource",
            "DataSourceEc2Local",
        );
        write(root2, "/root/.ssh/authorized_keys", "ssh-rsa keypair");
        let (doc2, failure2) = verify(root2, &SanitizeItem::ALL, &record2, &[]);
        assert!(failure2.is_none(), "{doc2:?}");
        let skipped = doc2.phases[0]
            .steps
            .iter()
            .find(|s| s.name == "authorized-keys")
            .unwrap();
        assert_eq!(skipped.status, Status::Skipped);
        write(
            root2,
            "/var/lib/cloud/instances/i-0builder/boot-finished",
            "2",
        );
        let (_, failure2) = verify(root2, &SanitizeItem::ALL, &record2, &[]);
        assert_eq!(failure2.unwrap().step, "cloud-init");
        // An item the builder never sanitized fails too.
        let partial = Record {
            items: vec![SanitizeItem::Tmp],
            removed: Vec::new(),
        };
        let (_, failure) = verify(root, &[SanitizeItem::MachineId], &partial, &[]);
        assert!(failure
            .unwrap()
            .message
            .contains("did not sanitize machine-id"));
    }
}
