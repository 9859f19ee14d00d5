//! The embedded store: SQLite with the records and the conditional transitions of the DynamoDB
//! store. Status changes are `UPDATE … WHERE status IN (…)`, so a stale retry never moves a build
//! backwards, and the lock is one row per pipeline with an expiry.

use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use crate::errors::{ErrorKind, StageError};
use crate::model::build::{Build, BuildId, BuildStatus};
use crate::ports::{PipelineRecord, PortResult, Store};

#[derive(Debug)]
pub struct SqliteStore {
    db: Mutex<Connection>,
}

fn internal(e: impl std::fmt::Display) -> StageError {
    StageError::new(ErrorKind::Internal, format!("embedded store: {e}"))
}

fn ready<'a, T: Send + 'a>(v: Result<T, StageError>) -> PortResult<'a, T> {
    Box::pin(async move { v })
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS pipelines (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    record TEXT NOT NULL,
    applied TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS builds (
    pipeline TEXT NOT NULL,
    id TEXT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (pipeline, id)
);
CREATE INDEX IF NOT EXISTS builds_by_status ON builds (status, id);
CREATE TABLE IF NOT EXISTS schedules (
    pipeline TEXT PRIMARY KEY,
    cron TEXT NOT NULL,
    timezone TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    disabled_reason TEXT,
    next_run TEXT
);
CREATE TABLE IF NOT EXISTS locks (
    pipeline TEXT PRIMARY KEY,
    build TEXT NOT NULL,
    expires INTEGER NOT NULL
);
";

/// Creates the database file readable by its user only (0600), or tightens an existing one: it
/// holds every pipeline's components and parameters.
fn private_file(path: &Path) -> Result<(), StageError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| internal(format!("{}: {e}", path.display())))?;
    private_file_if_present(path)
}

fn private_file_if_present(path: &Path) -> Result<(), StageError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match std::fs::metadata(path) {
        Ok(m) if m.mode() & 0o077 != 0 => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| internal(format!("make {} private: {e}", path.display())))
        }
        _ => Ok(()),
    }
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StageError> {
        private_file(path)?;
        let db = Connection::open(path).map_err(internal)?;
        db.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(internal)?;
        db.execute_batch("PRAGMA journal_mode = WAL;")
            .map_err(internal)?;
        db.execute_batch(SCHEMA).map_err(internal)?;
        // SQLite gives its -wal and -shm files the database's mode; older ones are tightened.
        for suffix in ["-wal", "-shm"] {
            let mut side = path.as_os_str().to_os_string();
            side.push(suffix);
            private_file_if_present(Path::new(&side))?;
        }
        Ok(SqliteStore { db: Mutex::new(db) })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StageError>,
    ) -> Result<T, StageError> {
        let mut db = self
            .db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut db)
    }

    /// Builds in any of `statuses`, across pipelines (the janitor, `kiln builds list`).
    pub fn builds_in(&self, statuses: &[BuildStatus]) -> Result<Vec<Build>, StageError> {
        self.with(|db| {
            let mut q = db
                .prepare("SELECT body FROM builds WHERE status = ?1 ORDER BY id")
                .map_err(internal)?;
            let mut out = Vec::new();
            for s in statuses {
                let rows = q
                    .query_map([s.as_str()], |r| r.get::<_, String>(0))
                    .map_err(internal)?;
                for body in rows {
                    out.push(serde_json::from_str(&body.map_err(internal)?).map_err(internal)?);
                }
            }
            Ok(out)
        })
    }

    /// Every build, oldest first.
    pub fn all_builds(&self) -> Result<Vec<Build>, StageError> {
        self.with(|db| {
            let mut q = db
                .prepare("SELECT body FROM builds ORDER BY id")
                .map_err(internal)?;
            let rows = q
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(internal)?;
            rows.map(|b| serde_json::from_str(&b.map_err(internal)?).map_err(internal))
                .collect()
        })
    }

    /// Finds a build by id (or a unique prefix of it) in any pipeline.
    pub fn find_build(&self, id: &str) -> Result<Option<Build>, StageError> {
        crate::model::build::find_by_prefix(self.all_builds()?, id)
            .map_err(|e| StageError::new(ErrorKind::InvalidPipeline, e))
    }
}

/// A pipeline's schedule as `kiln apply` recorded it for `kiln serve`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleRow {
    pub pipeline: String,
    pub cron: String,
    pub timezone: String,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    /// RFC 3339, in UTC.
    pub next_run: Option<String>,
}

impl SqliteStore {
    /// Creates or replaces (and enables) a pipeline's schedule.
    pub fn put_schedule(&self, row: &ScheduleRow) -> Result<(), StageError> {
        self.with(|db| {
            db.execute(
                "INSERT INTO schedules (pipeline, cron, timezone, enabled, disabled_reason, next_run)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (pipeline) DO UPDATE SET cron = excluded.cron, timezone = excluded.timezone,
                   enabled = excluded.enabled, disabled_reason = excluded.disabled_reason, next_run = excluded.next_run",
                params![row.pipeline, row.cron, row.timezone, row.enabled, row.disabled_reason, row.next_run],
            )
            .map_err(internal)?;
            Ok(())
        })
    }

    pub fn schedules(&self) -> Result<Vec<ScheduleRow>, StageError> {
        self.with(|db| {
            let mut q = db
                .prepare("SELECT pipeline, cron, timezone, enabled, disabled_reason, next_run FROM schedules ORDER BY pipeline")
                .map_err(internal)?;
            let rows = q
                .query_map([], |r| {
                    Ok(ScheduleRow {
                        pipeline: r.get(0)?,
                        cron: r.get(1)?,
                        timezone: r.get(2)?,
                        enabled: r.get(3)?,
                        disabled_reason: r.get(4)?,
                        next_run: r.get(5)?,
                    })
                })
                .map_err(internal)?;
            rows.map(|r| r.map_err(internal)).collect()
        })
    }

    pub fn set_next_run(&self, pipeline: &str, next: Option<&str>) -> Result<(), StageError> {
        self.with(|db| {
            db.execute(
                "UPDATE schedules SET next_run = ?2 WHERE pipeline = ?1",
                params![pipeline, next],
            )
            .map_err(internal)?;
            Ok(())
        })
    }

    /// Removes a pipeline's schedule; false when it had none.
    pub fn delete_schedule(&self, pipeline: &str) -> Result<bool, StageError> {
        self.with(|db| {
            Ok(db
                .execute("DELETE FROM schedules WHERE pipeline = ?1", [pipeline])
                .map_err(internal)?
                > 0)
        })
    }
}

impl crate::ports::Triggers for SqliteStore {
    fn disable<'a>(&'a self, pipeline: &'a str, reason: &'a str) -> PortResult<'a, bool> {
        ready(self.with(|db| {
            Ok(db
                .execute(
                    "UPDATE schedules SET enabled = 0, disabled_reason = ?2 WHERE pipeline = ?1 AND enabled = 1",
                    params![pipeline, reason],
                )
                .map_err(internal)?
                > 0)
        }))
    }
}

fn stale(build: &Build, stored: BuildStatus, expected: BuildStatus) -> StageError {
    StageError::new(
        ErrorKind::Internal,
        format!(
            "build {} is {}, not {} (a stale update)",
            build.id,
            stored.as_str(),
            expected.as_str()
        ),
    )
    .with_code("ConditionalCheckFailedException")
}

impl Store for SqliteStore {
    fn put_pipeline<'a>(&'a self, record: &'a PipelineRecord) -> PortResult<'a, ()> {
        ready(self.with(|db| {
            let p = &record.pipeline;
            let text = serde_json::to_string(record).map_err(internal)?;
            // Insert first, compare after: two processes registering the same version at once
            // both succeed (one inserts, the other finds the same content) instead of one
            // failing on the unique key between a check and an insert.
            let inserted = db
                .execute(
                    "INSERT INTO pipelines (name, version, record, applied) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (name, version) DO NOTHING",
                    params![p.name, p.version, text, Utc::now().to_rfc3339()],
                )
                .map_err(internal)?;
            if inserted == 1 {
                return Ok(());
            }
            let existing: String = db
                .query_row(
                    "SELECT record FROM pipelines WHERE name = ?1 AND version = ?2",
                    params![p.name, p.version],
                    |r| r.get(0),
                )
                .map_err(internal)?;
            let existing: PipelineRecord = serde_json::from_str(&existing).map_err(internal)?;
            if &existing != record {
                return Err(StageError::new(
                    ErrorKind::InvalidPipeline,
                    format!(
                        "pipeline {} version {} exists with other content; raise `version`",
                        p.name, p.version
                    ),
                ));
            }
            // The same definition applied again is the pipeline's current one again.
            db.execute(
                "UPDATE pipelines SET applied = ?3 WHERE name = ?1 AND version = ?2",
                params![p.name, p.version, Utc::now().to_rfc3339()],
            )
            .map_err(internal)?;
            Ok(())
        }))
    }

    fn pipeline_names(&self) -> PortResult<'_, Vec<String>> {
        ready(self.with(|db| {
            let mut q = db
                .prepare("SELECT DISTINCT name FROM pipelines ORDER BY name")
                .map_err(internal)?;
            let rows = q
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(internal)?;
            rows.map(|r| r.map_err(internal)).collect()
        }))
    }

    fn pipeline<'a>(&'a self, name: &'a str) -> PortResult<'a, Option<PipelineRecord>> {
        ready(self.with(|db| {
            let text: Option<String> = db
                .query_row(
                    "SELECT record FROM pipelines WHERE name = ?1 ORDER BY applied DESC, rowid DESC LIMIT 1",
                    [name],
                    |r| r.get(0),
                )
                .optional()
                .map_err(internal)?;
            text.map(|t| serde_json::from_str(&t).map_err(internal))
                .transpose()
        }))
    }

    fn create_build<'a>(&'a self, build: &'a Build) -> PortResult<'a, ()> {
        ready(self.with(|db| {
            let body = serde_json::to_string(build).map_err(internal)?;
            let tx = db.transaction().map_err(internal)?;
            let existing: Option<String> = tx
                .query_row(
                    "SELECT body FROM builds WHERE pipeline = ?1 AND id = ?2",
                    params![build.pipeline, build.id.0],
                    |r| r.get(0),
                )
                .optional()
                .map_err(internal)?;
            match existing {
                Some(e) => {
                    let e: Build = serde_json::from_str(&e).map_err(internal)?;
                    if &e != build {
                        return Err(StageError::new(
                            ErrorKind::Internal,
                            format!("build {} exists with other content", build.id),
                        ));
                    }
                }
                None => {
                    tx.execute(
                        "INSERT INTO builds (pipeline, id, status, body) VALUES (?1, ?2, ?3, ?4)",
                        params![build.pipeline, build.id.0, build.status.as_str(), body],
                    )
                    .map_err(internal)?;
                }
            }
            tx.commit().map_err(internal)
        }))
    }

    fn save_build<'a>(&'a self, build: &'a Build, expected: BuildStatus) -> PortResult<'a, ()> {
        ready(self.with(|db| {
            let body = serde_json::to_string(build).map_err(internal)?;
            // The statuses the stored build may be in for this write to apply.
            let allowed: Vec<&str> = [expected, build.status]
                .into_iter()
                .filter(|s| s.can_become(build.status) || *s == build.status)
                .map(BuildStatus::as_str)
                .collect();
            let changed = db
                .execute(
                    "UPDATE builds SET status = ?1, body = ?2
                     WHERE pipeline = ?3 AND id = ?4 AND status IN (?5, ?6)",
                    params![
                        build.status.as_str(),
                        body,
                        build.pipeline,
                        build.id.0,
                        allowed.first().copied().unwrap_or(""),
                        allowed.get(1).copied().unwrap_or("")
                    ],
                )
                .map_err(internal)?;
            if changed == 1 {
                return Ok(());
            }
            let stored: Option<String> = db
                .query_row(
                    "SELECT status FROM builds WHERE pipeline = ?1 AND id = ?2",
                    params![build.pipeline, build.id.0],
                    |r| r.get(0),
                )
                .optional()
                .map_err(internal)?;
            match stored.and_then(|s| BuildStatus::parse(&s)) {
                None => Err(StageError::new(
                    ErrorKind::Internal,
                    format!("no build {}", build.id),
                )),
                Some(s) if s != expected && s != build.status => Err(stale(build, s, expected)),
                Some(s) => Err(StageError::new(
                    ErrorKind::Internal,
                    format!(
                        "build {} cannot move from {} to {}",
                        build.id,
                        s.as_str(),
                        build.status.as_str()
                    ),
                )
                .with_code("ConditionalCheckFailedException")),
            }
        }))
    }

    fn build<'a>(&'a self, pipeline: &'a str, id: &'a BuildId) -> PortResult<'a, Option<Build>> {
        ready(self.with(|db| {
            let body: Option<String> = db
                .query_row(
                    "SELECT body FROM builds WHERE pipeline = ?1 AND id = ?2",
                    params![pipeline, id.0],
                    |r| r.get(0),
                )
                .optional()
                .map_err(internal)?;
            body.map(|b| serde_json::from_str(&b).map_err(internal))
                .transpose()
        }))
    }

    fn builds<'a>(&'a self, pipeline: &'a str) -> PortResult<'a, Vec<Build>> {
        ready(self.with(|db| {
            let mut q = db
                .prepare("SELECT body FROM builds WHERE pipeline = ?1 ORDER BY id")
                .map_err(internal)?;
            let rows = q
                .query_map([pipeline], |r| r.get::<_, String>(0))
                .map_err(internal)?;
            rows.map(|b| serde_json::from_str(&b.map_err(internal)?).map_err(internal))
                .collect()
        }))
    }

    fn lock<'a>(
        &'a self,
        pipeline: &'a str,
        build: &'a BuildId,
        now: DateTime<Utc>,
        ttl_seconds: i64,
    ) -> PortResult<'a, ()> {
        ready(self.with(|db| {
            let changed = db
                .execute(
                    "INSERT INTO locks (pipeline, build, expires) VALUES (?1, ?2, ?3)
                     ON CONFLICT (pipeline) DO UPDATE SET build = excluded.build, expires = excluded.expires
                     WHERE locks.build = excluded.build OR locks.expires <= ?4",
                    params![pipeline, build.0, now.timestamp() + ttl_seconds, now.timestamp()],
                )
                .map_err(internal)?;
            if changed == 1 {
                return Ok(());
            }
            let holder: String = db
                .query_row(
                    "SELECT build FROM locks WHERE pipeline = ?1",
                    [pipeline],
                    |r| r.get(0),
                )
                .map_err(internal)?;
            Err(StageError::new(
                ErrorKind::Locked,
                format!("pipeline {pipeline} is being built by build {holder}"),
            ))
        }))
    }

    fn unlock<'a>(&'a self, pipeline: &'a str, build: &'a BuildId) -> PortResult<'a, ()> {
        ready(self.with(|db| {
            db.execute(
                "DELETE FROM locks WHERE pipeline = ?1 AND build = ?2",
                params![pipeline, build.0],
            )
            .map_err(internal)?;
            Ok(())
        }))
    }
}
