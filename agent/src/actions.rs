//! The Linux action modules. Everything here receives values as data: files are written with
//! std::fs, programs get argument vectors, and only ExecuteBash runs shell code — the document's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln::component::actions::{self as schema, Platform, StrOrInt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value as Json};

use crate::exec;
use crate::report::PhaseReport;

/// How an action ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Success(Json),
    Failed(String),
    /// Reboot the machine, then `rerun` this step (exit 194) or go on after it (Reboot action).
    Reboot {
        rerun: bool,
    },
}

#[derive(Debug, Clone)]
pub struct ActionResult {
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub nested: Vec<PhaseReport>,
}

impl ActionResult {
    fn ok(outputs: Json) -> Self {
        ActionResult {
            outcome: Outcome::Success(outputs),
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            nested: Vec::new(),
        }
    }
    fn fail(message: impl Into<String>) -> Self {
        ActionResult {
            outcome: Outcome::Failed(message.into()),
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            nested: Vec::new(),
        }
    }
}

/// Runs ExecuteDocument's nested document; supplied by the runner.
pub trait Nested {
    fn run_document(
        &self,
        document: &Path,
        phases: Option<&str>,
        parameters: &[(String, String)],
    ) -> ActionResult;
}

/// What an action needs from its surroundings.
pub struct Context<'a> {
    pub work_dir: &'a Path,
    /// Where ExecuteBash makes each script's private folder ([`exec::script_base`]).
    pub scripts: &'a Path,
    /// Relative document paths (ExecuteDocument) resolve against this folder.
    pub document_dir: &'a Path,
    pub timeout: Option<Duration>,
    /// Parameters as environment variables, for ExecuteBash and ExecuteBinary.
    pub env: &'a [(String, String)],
    pub echo: bool,
    pub nested: &'a dyn Nested,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("work_dir", &self.work_dir)
            .finish_non_exhaustive()
    }
}

/// The exit code with which a step asks for a reboot (AWSTOE, SSM Run Command).
pub const REBOOT_EXIT_CODE: i32 = 194;

fn decode<T: DeserializeOwned>(inputs: &Json) -> Result<T, String> {
    serde_json::from_value(inputs.clone()).map_err(|e| format!("invalid inputs: {e}"))
}

/// Runs one action with resolved inputs.
pub fn execute(action: &str, inputs: &Json, ctx: &Context<'_>) -> ActionResult {
    let Some(spec) = schema::find(action) else {
        return ActionResult::fail(format!("unknown action `{action}`"));
    };
    if spec.platform == Platform::Windows {
        return ActionResult::fail(format!(
            "`{action}` is a Windows action: unsupported on this platform"
        ));
    }
    let result = match action {
        "ExecuteBash" => decode::<schema::ExecuteBash>(inputs).map(|i| execute_bash(&i, ctx)),
        "ExecuteBinary" => decode::<schema::ExecuteBinary>(inputs).map(|i| execute_binary(&i, ctx)),
        "ExecuteDocument" => {
            decode::<schema::ExecuteDocument>(inputs).map(|i| execute_document(&i, ctx))
        }
        "Assert" => Ok(assert(inputs)),
        "UpdateOS" => (if inputs.is_null() {
            Ok(schema::UpdateOs::default())
        } else {
            decode::<schema::UpdateOs>(inputs)
        })
        .map(|i| update_os(&i, ctx)),
        "Reboot" => (if inputs.is_null() {
            Ok(schema::Reboot::default())
        } else {
            decode::<schema::Reboot>(inputs)
        })
        .map(|i| reboot(&i)),
        "S3Download" | "S3Upload" => {
            each::<schema::S3Transfer>(inputs, |i| crate::s3::transfer(action == "S3Upload", i))
        }
        "WebDownload" => each::<schema::WebDownload>(inputs, web_download),
        "AppendFile" => each::<schema::AppendFile>(inputs, append_file),
        "CreateFile" => each::<schema::CreateFile>(inputs, create_file),
        "CreateFolder" => each::<schema::CreateFolder>(inputs, create_folder),
        "CreateSymlink" => each::<schema::CreateSymlink>(inputs, create_symlink),
        "CopyFile" => each::<schema::CopyOrMove>(inputs, |i| copy_or_move(i, false, false)),
        "CopyFolder" => each::<schema::CopyOrMove>(inputs, |i| copy_or_move(i, true, false)),
        "MoveFile" => each::<schema::CopyOrMove>(inputs, |i| copy_or_move(i, false, true)),
        "MoveFolder" => each::<schema::CopyOrMove>(inputs, |i| copy_or_move(i, true, true)),
        "DeleteFile" => each::<schema::Delete>(inputs, |i| delete(i, false)),
        "DeleteFolder" => each::<schema::Delete>(inputs, |i| delete(i, true)),
        "ListFiles" => each::<schema::ListFiles>(inputs, list_files),
        "ReadFile" => each::<schema::ReadFile>(inputs, read_file),
        "SetFileEncoding" => each::<schema::SetFileEncoding>(inputs, set_file_encoding),
        "SetFileOwner" | "SetFolderOwner" => each::<schema::SetOwner>(inputs, set_owner),
        "SetFilePermissions" | "SetFolderPermissions" => {
            each::<schema::SetPermissions>(inputs, set_permissions)
        }
        other => Err(format!("`{other}` is not implemented on this platform")),
    };
    result.unwrap_or_else(ActionResult::fail)
}

/// Runs a list-form action item by item; outputs are the list of each item's outputs, and the
/// stdout of all items together.
fn each<T: DeserializeOwned>(
    inputs: &Json,
    mut f: impl FnMut(&T) -> Result<Json, String>,
) -> Result<ActionResult, String> {
    let items: Vec<T> = decode(inputs)?;
    let mut outputs = Vec::new();
    let mut stdout = String::new();
    for (i, item) in items.iter().enumerate() {
        match f(item) {
            Ok(out) => {
                if let Some(s) = out.get("stdout").and_then(Json::as_str) {
                    stdout.push_str(s);
                }
                outputs.push(out);
            }
            Err(e) => {
                return Ok(ActionResult::fail(if items.len() > 1 {
                    format!("item {i}: {e}")
                } else {
                    e
                }))
            }
        }
    }
    let mut result = ActionResult::ok(if outputs.len() == 1 {
        outputs.remove(0)
    } else {
        Json::Array(outputs)
    });
    result.stdout = stdout;
    Ok(result)
}

fn process_result(f: exec::Finished, what: &str, timeout: Option<Duration>) -> ActionResult {
    let outcome = match (f.timed_out, f.exit_code) {
        (true, _) => Outcome::Failed(format!(
            "{what} timed out after {}s; its process group was killed",
            timeout.map(|t| t.as_secs()).unwrap_or(0)
        )),
        (false, Some(0)) => {
            Outcome::Success(json!({ "stdout": f.stdout.trim_end_matches(['\n', '\r']) }))
        }
        (false, Some(REBOOT_EXIT_CODE)) => Outcome::Reboot { rerun: true },
        (false, Some(code)) => Outcome::Failed(format!("{what} exited with code {code}")),
        (false, None) => Outcome::Failed(format!("{what} was killed by a signal")),
    };
    ActionResult {
        outcome,
        exit_code: f.exit_code,
        stdout: f.stdout,
        stderr: f.stderr,
        nested: Vec::new(),
    }
}

fn execute_bash(i: &schema::ExecuteBash, ctx: &Context<'_>) -> ActionResult {
    // The commands form one script, run by one bash: `cd` and variables carry over between lines,
    // and the script's exit status (its last command's, or an explicit `exit`) is the step's.
    // The script never sits in the work folder: another user may share that one (`/tmp`).
    let body = format!("{}\n", i.commands.join("\n"));
    let script = match exec::Script::create(ctx.scripts, body.as_bytes()) {
        Ok(s) => s,
        Err(e) => return ActionResult::fail(e),
    };
    let mut cmd = Command::new("bash");
    cmd.arg(script.path())
        .envs(ctx.env.iter().map(|(k, v)| (k, v)));
    let result = match exec::run(cmd, ctx.work_dir, ctx.timeout, ctx.echo) {
        Ok(f) => process_result(f, "the script", ctx.timeout),
        Err(e) => ActionResult::fail(format!("cannot start bash: {e}")),
    };
    // Zeroes what is left of the script (it has no name since bash opened it).
    drop(script);
    result
}

fn execute_binary(i: &schema::ExecuteBinary, ctx: &Context<'_>) -> ActionResult {
    let mut cmd = Command::new(&i.path);
    cmd.args(&i.arguments)
        .envs(ctx.env.iter().map(|(k, v)| (k, v)));
    match exec::run(cmd, ctx.work_dir, ctx.timeout, ctx.echo) {
        Ok(f) => process_result(f, &i.path, ctx.timeout),
        Err(e) => ActionResult::fail(format!("cannot run `{}`: {e}", i.path)),
    }
}

fn execute_document(i: &schema::ExecuteDocument, ctx: &Context<'_>) -> ActionResult {
    if i.document.starts_with("s3://") || i.document.starts_with("arn:") {
        return ActionResult::fail(format!(
            "document `{}`: kiln-agent runs nested documents from local files; download it first (S3Download) and pass its path",
            i.document
        ));
    }
    let path = ctx.document_dir.join(&i.document);
    let params: Vec<(String, String)> = i
        .parameters
        .iter()
        .map(|p| (p.name.clone(), p.value.text()))
        .collect();
    ctx.nested.run_document(&path, i.phases.as_deref(), &params)
}

fn assert(inputs: &Json) -> ActionResult {
    let mut problems = Vec::new();
    let Some(cond) = kiln::component::condition::parse(inputs, &mut Vec::new(), &mut problems)
    else {
        return ActionResult::fail(format!(
            "invalid assertion: {}",
            problems.first().map(|p| p.message.as_str()).unwrap_or("?")
        ));
    };
    match crate::eval::evaluate(&cond) {
        Ok(true) => ActionResult::ok(json!({})),
        Ok(false) => ActionResult::fail(format!(
            "assertion failed: {}",
            serde_json::to_string(inputs).unwrap_or_default()
        )),
        Err(e) => ActionResult::fail(e),
    }
}

/// The package manager of this system, in the order AWSTOE looks for them.
pub fn package_manager() -> Option<&'static str> {
    ["apt-get", "dnf", "yum", "zypper"]
        .into_iter()
        .find(|pm| crate::eval::binary_exists(pm))
}

fn update_os(i: &schema::UpdateOs, ctx: &Context<'_>) -> ActionResult {
    let Some(pm) = package_manager() else {
        return ActionResult::fail(
            "no supported package manager found (apt-get, dnf, yum, zypper)",
        );
    };
    let mut runs: Vec<Vec<String>> = Vec::new();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    match pm {
        "apt-get" => {
            runs.push(s(&["apt-get", "update"]));
            if !i.exclude.is_empty() {
                runs.push([s(&["apt-mark", "hold"]), i.exclude.clone()].concat());
            }
            if i.include.is_empty() {
                runs.push(s(&["apt-get", "-y", "upgrade"]));
            } else {
                runs.push(
                    [
                        s(&["apt-get", "-y", "install", "--only-upgrade"]),
                        i.include.clone(),
                    ]
                    .concat(),
                );
            }
            if !i.exclude.is_empty() {
                runs.push([s(&["apt-mark", "unhold"]), i.exclude.clone()].concat());
            }
        }
        "zypper" => {
            runs.push(s(&["zypper", "--non-interactive", "refresh"]));
            if !i.exclude.is_empty() {
                runs.push(
                    [
                        s(&["zypper", "--non-interactive", "addlock"]),
                        i.exclude.clone(),
                    ]
                    .concat(),
                );
            }
            runs.push(
                [
                    s(&["zypper", "--non-interactive", "update"]),
                    i.include.clone(),
                ]
                .concat(),
            );
            if !i.exclude.is_empty() {
                runs.push(
                    [
                        s(&["zypper", "--non-interactive", "removelock"]),
                        i.exclude.clone(),
                    ]
                    .concat(),
                );
            }
        }
        dnf_or_yum => {
            let excludes = i.exclude.iter().map(|e| format!("--exclude={e}"));
            runs.push(
                [
                    s(&[dnf_or_yum, "-y", "update"]),
                    excludes.collect(),
                    i.include.clone(),
                ]
                .concat(),
            );
        }
    }
    let (mut stdout, mut stderr) = (String::new(), String::new());
    for argv in runs {
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env("DEBIAN_FRONTEND", "noninteractive");
        match exec::run(cmd, ctx.work_dir, ctx.timeout, ctx.echo) {
            Ok(f) => {
                stdout.push_str(&f.stdout);
                stderr.push_str(&f.stderr);
                if f.exit_code != Some(0) {
                    let mut r = process_result(f, &argv.join(" "), ctx.timeout);
                    (r.stdout, r.stderr) = (stdout, stderr);
                    return r;
                }
            }
            Err(e) => return ActionResult::fail(format!("cannot run {}: {e}", argv[0])),
        }
    }
    ActionResult {
        outcome: Outcome::Success(json!({ "packageManager": pm })),
        exit_code: Some(0),
        stdout,
        stderr,
        nested: Vec::new(),
    }
}

fn reboot(i: &schema::Reboot) -> ActionResult {
    if let Some(d) = i.delay_seconds {
        std::thread::sleep(Duration::from_secs(u64::from(d)));
    }
    ActionResult {
        outcome: Outcome::Reboot { rerun: false },
        exit_code: None,
        stdout: String::new(),
        stderr: String::new(),
        nested: Vec::new(),
    }
}

fn web_download(i: &schema::WebDownload) -> Result<Json, String> {
    let dest = download_destination(&i.source, &i.destination);
    if dest.exists() && i.overwrite != Some(true) {
        return Err(format!(
            "{} already exists; set `overwrite: true` to replace it",
            dest.display()
        ));
    }
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let attempts = i.max_retries.unwrap_or(3).max(1);
    let mut last = String::new();
    for attempt in 1..=attempts {
        match crate::http::download(&i.source, &dest, i.ignore_certificate_errors == Some(true)) {
            Ok(()) => {
                if let Some(expected) = &i.checksum {
                    let algorithm = i.algorithm.unwrap_or(schema::ChecksumAlgorithm::SHA256);
                    let actual = checksum(&dest, algorithm)?;
                    if !actual.eq_ignore_ascii_case(expected.trim()) {
                        let _ = std::fs::remove_file(&dest);
                        return Err(format!("checksum mismatch for {}: expected {expected}, got {actual} ({algorithm:?})", i.source));
                    }
                }
                return Ok(json!({ "destination": dest }));
            }
            Err(e) => {
                last = e;
                if attempt < attempts {
                    std::thread::sleep(Duration::from_millis(500 * u64::from(attempt)));
                }
            }
        }
    }
    Err(format!(
        "downloading {} failed after {attempts} attempt{}: {last}",
        i.source,
        if attempts == 1 { "" } else { "s" }
    ))
}

/// A destination ending in `/` (or an existing folder) receives the file under its URL name.
pub fn download_destination(source: &str, destination: &str) -> PathBuf {
    let dest = PathBuf::from(destination);
    if destination.ends_with('/') || dest.is_dir() {
        let name = source
            .split(['?', '#'])
            .next()
            .unwrap_or_default()
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("download");
        dest.join(name)
    } else {
        dest
    }
}

fn checksum(path: &Path, algorithm: schema::ChecksumAlgorithm) -> Result<String, String> {
    use sha2::Digest;
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(match algorithm {
        schema::ChecksumAlgorithm::MD5 => hex::encode(md5::Md5::digest(&data)),
        schema::ChecksumAlgorithm::SHA1 => hex::encode(sha1::Sha1::digest(&data)),
        schema::ChecksumAlgorithm::SHA256 => hex::encode(sha2::Sha256::digest(&data)),
        schema::ChecksumAlgorithm::SHA512 => hex::encode(sha2::Sha512::digest(&data)),
    })
}

/// Text encodings AWSTOE's file modules accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Utf8,
    Utf16Le,
    Utf16Be,
    Utf32Le,
    Ascii,
}

impl Encoding {
    pub fn parse(name: Option<&str>) -> Result<Encoding, String> {
        let Some(name) = name else {
            return Ok(Encoding::Utf8);
        };
        match name.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "utf8" => Ok(Encoding::Utf8),
            "utf16" | "unicode" | "utf16le" => Ok(Encoding::Utf16Le),
            "bigendianunicode" | "utf16be" => Ok(Encoding::Utf16Be),
            "utf32" | "utf32le" => Ok(Encoding::Utf32Le),
            "ascii" => Ok(Encoding::Ascii),
            _ => Err(format!("unsupported encoding `{name}` (utf8, utf16, unicode, bigendianunicode, utf32, ascii)")),
        }
    }

    pub fn encode(self, text: &str) -> Result<Vec<u8>, String> {
        Ok(match self {
            Encoding::Utf8 => text.as_bytes().to_vec(),
            Encoding::Ascii => {
                if let Some(c) = text.chars().find(|c| !c.is_ascii()) {
                    return Err(format!("`{c}` cannot be written as ASCII"));
                }
                text.as_bytes().to_vec()
            }
            // UTF-16 and UTF-32 files start with a byte-order mark, as Windows tools write them.
            Encoding::Utf16Le => [0xFF, 0xFE]
                .into_iter()
                .chain(text.encode_utf16().flat_map(u16::to_le_bytes))
                .collect(),
            Encoding::Utf16Be => [0xFE, 0xFF]
                .into_iter()
                .chain(text.encode_utf16().flat_map(u16::to_be_bytes))
                .collect(),
            Encoding::Utf32Le => [0xFF, 0xFE, 0, 0]
                .into_iter()
                .chain(text.chars().flat_map(|c| (c as u32).to_le_bytes()))
                .collect(),
        })
    }

    /// Reads bytes written in any supported encoding (told apart by byte-order mark, else UTF-8).
    pub fn decode_any(bytes: &[u8]) -> Result<String, String> {
        let units16 = |b: &[u8], le: bool| -> Vec<u16> {
            b.chunks_exact(2)
                .map(|c| {
                    if le {
                        u16::from_le_bytes([c[0], c[1]])
                    } else {
                        u16::from_be_bytes([c[0], c[1]])
                    }
                })
                .collect()
        };
        if let Some(rest) = bytes.strip_prefix(&[0xFF, 0xFE, 0, 0]) {
            return rest
                .chunks_exact(4)
                .map(|c| {
                    char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .ok_or("invalid UTF-32".to_string())
                })
                .collect();
        }
        if let Some(rest) = bytes.strip_prefix(&[0xFF, 0xFE]) {
            return String::from_utf16(&units16(rest, true)).map_err(|e| e.to_string());
        }
        if let Some(rest) = bytes.strip_prefix(&[0xFE, 0xFF]) {
            return String::from_utf16(&units16(rest, false)).map_err(|e| e.to_string());
        }
        let rest = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]).unwrap_or(bytes);
        String::from_utf8(rest.to_vec())
            .map_err(|_| "the file is not UTF-8 and has no byte-order mark".to_string())
    }
}

fn fs_err(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("cannot {what} {}: {e}", path.display())
}

fn write_text(
    path: &Path,
    content: &str,
    encoding: Option<&str>,
    append: bool,
) -> Result<(), String> {
    use std::io::Write;
    let bytes = Encoding::parse(encoding)?.encode(content)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| fs_err("create", parent, e))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)
        .map_err(|e| fs_err("open", path, e))?;
    f.write_all(&bytes).map_err(|e| fs_err("write", path, e))
}

fn create_file(i: &schema::CreateFile) -> Result<Json, String> {
    let path = Path::new(&i.path);
    if path.exists() && i.overwrite != Some(true) {
        return Err(format!(
            "{} already exists; set `overwrite: true` to replace it",
            i.path
        ));
    }
    write_text(
        path,
        i.content.as_deref().unwrap_or_default(),
        i.encoding.as_deref(),
        false,
    )?;
    apply_mode_and_owner(
        path,
        i.permissions.as_ref(),
        i.owner.as_ref(),
        i.group.as_ref(),
        false,
    )?;
    Ok(json!({ "path": i.path }))
}

fn append_file(i: &schema::AppendFile) -> Result<Json, String> {
    write_text(
        Path::new(&i.path),
        i.content.as_deref().unwrap_or_default(),
        i.encoding.as_deref(),
        true,
    )?;
    Ok(json!({ "path": i.path }))
}

fn create_folder(i: &schema::CreateFolder) -> Result<Json, String> {
    let path = Path::new(&i.path);
    if path.exists() && !path.is_dir() {
        return Err(format!("{} exists and is not a folder", i.path));
    }
    std::fs::create_dir_all(path).map_err(|e| fs_err("create", path, e))?;
    apply_mode_and_owner(
        path,
        i.permissions.as_ref(),
        i.owner.as_ref(),
        i.group.as_ref(),
        false,
    )?;
    Ok(json!({ "path": i.path }))
}

fn create_symlink(i: &schema::CreateSymlink) -> Result<Json, String> {
    let path = Path::new(&i.path);
    if path.symlink_metadata().is_ok() {
        if i.force != Some(true) {
            return Err(format!(
                "{} already exists; set `force: true` to replace it",
                i.path
            ));
        }
        remove_any(path)?;
    }
    std::os::unix::fs::symlink(&i.target, path).map_err(|e| fs_err("create the link", path, e))?;
    Ok(json!({ "path": i.path, "target": i.target }))
}

fn remove_any(path: &Path) -> Result<(), String> {
    let meta = path
        .symlink_metadata()
        .map_err(|e| fs_err("inspect", path, e))?;
    if meta.is_dir() {
        std::fs::remove_dir_all(path).map_err(|e| fs_err("remove", path, e))
    } else {
        std::fs::remove_file(path).map_err(|e| fs_err("remove", path, e))
    }
}

fn copy_tree(from: &Path, to: &Path, overwrite: bool) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| fs_err("create", to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| fs_err("read", from, e))? {
        let entry = entry.map_err(|e| fs_err("read", from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let ty = entry.file_type().map_err(|e| fs_err("inspect", &src, e))?;
        if ty.is_dir() {
            copy_tree(&src, &dst, overwrite)?;
        } else if dst.symlink_metadata().is_ok() && !overwrite {
            return Err(format!(
                "{} already exists; set `overwrite: true` to replace it",
                dst.display()
            ));
        } else if ty.is_symlink() {
            let target = std::fs::read_link(&src).map_err(|e| fs_err("read the link", &src, e))?;
            let _ = std::fs::remove_file(&dst);
            std::os::unix::fs::symlink(target, &dst)
                .map_err(|e| fs_err("create the link", &dst, e))?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| fs_err("copy to", &dst, e))?;
        }
    }
    Ok(())
}

fn copy_or_move(i: &schema::CopyOrMove, folder: bool, moving: bool) -> Result<Json, String> {
    let (src, dst) = (Path::new(&i.source), Path::new(&i.destination));
    let overwrite = i.overwrite == Some(true);
    match (folder, src.is_dir(), src.exists()) {
        (_, _, false) => return Err(format!("{} does not exist", i.source)),
        (true, false, _) => return Err(format!("{} is not a folder", i.source)),
        (false, true, _) => {
            return Err(format!(
                "{} is a folder; use CopyFolder or MoveFolder",
                i.source
            ))
        }
        _ => {}
    }
    if dst.symlink_metadata().is_ok() && !overwrite && !folder {
        return Err(format!(
            "{} already exists; set `overwrite: true` to replace it",
            i.destination
        ));
    }
    if dst.exists() && folder && !overwrite {
        return Err(format!(
            "{} already exists; set `overwrite: true` to merge into it",
            i.destination
        ));
    }
    if let Some(parent) = dst.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| fs_err("create", parent, e))?;
    }
    if moving && !dst.exists() && std::fs::rename(src, dst).is_ok() {
        return Ok(json!({ "destination": i.destination }));
    }
    if folder {
        copy_tree(src, dst, overwrite)?;
    } else {
        std::fs::copy(src, dst).map_err(|e| fs_err("copy to", dst, e))?;
    }
    if moving {
        remove_any(src)?;
    }
    Ok(json!({ "destination": i.destination }))
}

fn delete(i: &schema::Delete, folder: bool) -> Result<Json, String> {
    let path = Path::new(&i.path);
    let Ok(meta) = path.symlink_metadata() else {
        return Err(format!("{} does not exist", i.path));
    };
    match (folder, meta.is_dir()) {
        (false, true) => return Err(format!("{} is a folder; use DeleteFolder", i.path)),
        (true, false) => return Err(format!("{} is not a folder", i.path)),
        (true, true) => {
            let empty = std::fs::read_dir(path)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty && i.force != Some(true) {
                return Err(format!(
                    "{} is not empty; set `force: true` to delete it with its contents",
                    i.path
                ));
            }
        }
        (false, false) => {}
    }
    remove_any(path)?;
    Ok(json!({ "path": i.path }))
}

/// `*` and `?` wildcards, matched against a file name.
pub fn wildcard(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(
        &pattern.chars().collect::<Vec<_>>(),
        &name.chars().collect::<Vec<_>>(),
    )
}

fn list_files(i: &schema::ListFiles) -> Result<Json, String> {
    fn walk(
        dir: &Path,
        recursive: bool,
        pattern: Option<&str>,
        found: &mut Vec<String>,
    ) -> Result<(), String> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| fs_err("list", dir, e))?
            .filter_map(Result::ok)
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if !is_dir && pattern.is_none_or(|p| wildcard(p, &e.file_name().to_string_lossy())) {
                found.push(path.display().to_string());
            }
            if is_dir && recursive {
                walk(&path, true, pattern, found)?;
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(
        Path::new(&i.path),
        i.recursive == Some(true),
        i.file_name_pattern.as_deref(),
        &mut files,
    )?;
    let stdout = files.iter().map(|f| format!("{f}\n")).collect::<String>();
    Ok(json!({ "files": files, "stdout": stdout }))
}

fn read_file(i: &schema::ReadFile) -> Result<Json, String> {
    let path = Path::new(&i.path);
    let bytes = std::fs::read(path).map_err(|e| fs_err("read", path, e))?;
    let content = Encoding::decode_any(&bytes).map_err(|e| format!("{}: {e}", i.path))?;
    let stdout = if i.print_file_content == Some(true) {
        content.clone()
    } else {
        String::new()
    };
    Ok(json!({ "content": content, "stdout": stdout }))
}

fn set_file_encoding(i: &schema::SetFileEncoding) -> Result<Json, String> {
    let path = Path::new(&i.path);
    let bytes = std::fs::read(path).map_err(|e| fs_err("read", path, e))?;
    let text = Encoding::decode_any(&bytes).map_err(|e| format!("{}: {e}", i.path))?;
    write_text(path, &text, i.encoding.as_deref(), false)?;
    Ok(json!({ "path": i.path }))
}

fn set_owner(i: &schema::SetOwner) -> Result<Json, String> {
    apply_mode_and_owner(
        Path::new(&i.path),
        None,
        Some(&i.owner),
        i.group.as_ref(),
        i.recursive == Some(true),
    )?;
    Ok(json!({ "path": i.path }))
}

fn set_permissions(i: &schema::SetPermissions) -> Result<Json, String> {
    apply_mode_and_owner(
        Path::new(&i.path),
        Some(&i.permissions),
        None,
        None,
        i.recursive == Some(true),
    )?;
    Ok(json!({ "path": i.path }))
}

/// Octal permissions as written in documents: `755`, `0755`, `'0644'`.
pub fn parse_mode(p: &StrOrInt) -> Result<u32, String> {
    let text = p.text();
    u32::from_str_radix(text.trim(), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("`{text}` is not an octal permission such as 0755"))
}

fn uid_of(owner: &StrOrInt) -> Result<nix::unistd::Uid, String> {
    let text = owner.text();
    if let Ok(n) = text.parse::<u32>() {
        return Ok(nix::unistd::Uid::from_raw(n));
    }
    nix::unistd::User::from_name(&text)
        .ok()
        .flatten()
        .map(|u| u.uid)
        .ok_or_else(|| format!("no user `{text}` on this system"))
}

fn gid_of(group: &StrOrInt) -> Result<nix::unistd::Gid, String> {
    let text = group.text();
    if let Ok(n) = text.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(n));
    }
    nix::unistd::Group::from_name(&text)
        .ok()
        .flatten()
        .map(|g| g.gid)
        .ok_or_else(|| format!("no group `{text}` on this system"))
}

fn apply_mode_and_owner(
    path: &Path,
    mode: Option<&StrOrInt>,
    owner: Option<&StrOrInt>,
    group: Option<&StrOrInt>,
    recursive: bool,
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if !path.exists() {
        return Err(format!("{} does not exist", path.display()));
    }
    let mode = mode.map(parse_mode).transpose()?;
    let uid = owner.map(uid_of).transpose()?;
    let gid = group.map(gid_of).transpose()?;
    let mut targets = vec![path.to_path_buf()];
    if recursive && path.is_dir() {
        collect_tree(path, &mut targets)?;
    }
    for t in targets {
        if let Some(m) = mode {
            std::fs::set_permissions(&t, std::fs::Permissions::from_mode(m))
                .map_err(|e| fs_err("set permissions on", &t, e))?;
        }
        if uid.is_some() || gid.is_some() {
            nix::unistd::chown(&t, uid, gid)
                .map_err(|e| format!("cannot change the owner of {}: {e}", t.display()))?;
        }
    }
    Ok(())
}

fn collect_tree(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    for e in std::fs::read_dir(dir)
        .map_err(|e| fs_err("list", dir, e))?
        .filter_map(Result::ok)
    {
        let p = e.path();
        out.push(p.clone());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_tree(&p, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_and_modes() {
        assert!(wildcard("*.log", "a.log"));
        assert!(!wildcard("*.log", "a.txt"));
        assert!(wildcard("a?c*", "abcdef"));
        assert_eq!(parse_mode(&StrOrInt::Int(755)), Ok(0o755));
        assert_eq!(parse_mode(&StrOrInt::Str("0644".into())), Ok(0o644));
        assert!(parse_mode(&StrOrInt::Int(999)).is_err());
    }

    #[test]
    fn encodings_round_trip() {
        for enc in ["utf8", "UTF-16", "bigendianunicode", "utf32"] {
            let e = Encoding::parse(Some(enc)).expect("known");
            let bytes = e.encode("héllo").expect("encodes");
            assert_eq!(
                Encoding::decode_any(&bytes).as_deref(),
                Ok("héllo"),
                "{enc}"
            );
        }
    }
}
