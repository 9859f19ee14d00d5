//! Lifecycle: old images of a pipeline deprecated and deleted in every region it distributes to.
//!
//! Rules, per region, over the pipeline's available images (newest first):
//! - images carrying every `excludeTags` tag are never touched;
//! - the newest image is never touched (a pipeline always keeps a current image);
//! - `keepLatest: N`: images after the newest N are deleted;
//! - `deleteAfterDays: D`: images created more than D days ago are deleted, except the newest N
//!   when `keepLatest` is set;
//! - `deprecateAfterDays: D`: images created more than D days ago and not deprecated yet are
//!   deprecated (deprecated images still launch for their owner; they drop out of listings).
//!
//! Deleting deregisters the image and deletes its snapshots (embedded: removes it and the blobs
//! no other image uses).

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::errors::StageError;
use crate::model::build::ImageId;
use crate::model::pipeline::Pipeline;
use crate::ports::{ImageInfo, Ports};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Deprecate,
    Delete,
}

/// One thing lifecycle does (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Action {
    pub region: String,
    pub image: ImageId,
    pub name: String,
    #[serde(serialize_with = "rfc3339")]
    pub created: DateTime<Utc>,
    pub verdict: Verdict,
    pub reason: String,
}

fn version_key(image: &ImageInfo) -> Vec<u64> {
    image
        .tags
        .get("kiln:version")
        .map(|v| {
            v.split(['.', '/'])
                .map(|n| n.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default()
}

fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

fn excluded(rules: &crate::model::pipeline::Lifecycle, image: &ImageInfo) -> bool {
    let exclude = &rules.exclude_tags;
    !exclude.is_empty() && exclude.iter().all(|(k, v)| image.tags.get(k) == Some(v))
}

/// The actions the pipeline's lifecycle calls for in one region's images at `now`.
pub fn decide(
    pipeline: &Pipeline,
    region: &str,
    mut images: Vec<ImageInfo>,
    now: DateTime<Utc>,
) -> Vec<Action> {
    let Some(rules) = &pipeline.lifecycle else {
        return Vec::new();
    };
    // Newest first; images made within the same second (EC2 dates have seconds) by their
    // `kiln:version` (`x.y.z/n`, numerically).
    images.sort_by(|a, b| {
        b.created
            .cmp(&a.created)
            .then_with(|| version_key(b).cmp(&version_key(a)))
            .then_with(|| b.id.cmp(&a.id))
    });
    let keep = rules.keep_latest.map(|n| n as usize).unwrap_or(1).max(1);
    let mut out = Vec::new();
    let mut rank = 0usize;
    for image in images {
        if excluded(rules, &image) {
            continue;
        }
        rank += 1;
        if rank == 1 {
            continue;
        }
        let age = now - image.created;
        let action = |verdict, reason: String| Action {
            region: region.to_string(),
            image: image.id.clone(),
            name: image.name.clone(),
            created: image.created,
            verdict,
            reason,
        };
        if let Some(n) = rules.keep_latest.filter(|_| rank > keep) {
            out.push(action(
                Verdict::Delete,
                format!("keepLatest {n}: it is number {rank}"),
            ));
            continue;
        }
        if let Some(d) = rules.delete_after_days {
            // The newest N of keepLatest stay, whatever their age.
            let protected = rules.keep_latest.is_some() && rank <= keep;
            if !protected && age > Duration::days(i64::from(d)) {
                out.push(action(
                    Verdict::Delete,
                    format!("deleteAfterDays {d}: {} days old", age.num_days()),
                ));
                continue;
            }
        }
        if let Some(d) = rules.deprecate_after_days {
            if image.deprecated.is_none() && age > Duration::days(i64::from(d)) {
                out.push(action(
                    Verdict::Deprecate,
                    format!("deprecateAfterDays {d}: {} days old", age.num_days()),
                ));
            }
        }
    }
    out
}

/// The regions a pipeline's images live in: where it builds and where it distributes.
pub fn regions(pipeline: &Pipeline) -> Vec<String> {
    let mut r: Vec<String> = std::iter::once(pipeline.home_region().to_string())
        .chain(pipeline.distribution.iter().map(|d| d.region.clone()))
        .collect();
    r.sort();
    r.dedup();
    r
}

/// What lifecycle would do now, in every region of the pipeline.
pub async fn plan(ports: &Ports<'_>, pipeline: &Pipeline) -> Result<Vec<Action>, StageError> {
    let now = ports.clock.now();
    let mut out = Vec::new();
    for region in regions(pipeline) {
        let images = ports
            .compute
            .pipeline_images(&region, &pipeline.name)
            .await?;
        out.extend(decide(pipeline, &region, images, now));
    }
    Ok(out)
}

/// Carries the actions out.
pub async fn apply(ports: &Ports<'_>, actions: &[Action]) -> Result<(), StageError> {
    let now = ports.clock.now();
    for a in actions {
        match a.verdict {
            Verdict::Deprecate => {
                ports
                    .compute
                    .deprecate_image(&a.region, &a.image, now)
                    .await?
            }
            Verdict::Delete => ports.compute.delete_image(&a.region, &a.image).await?,
        }
    }
    Ok(())
}

/// The daily run: every applied pipeline's lifecycle, applied. One pipeline's failure does not
/// stop the others; it is reported with the rest.
pub async fn run_all(ports: &Ports<'_>) -> Result<serde_json::Value, StageError> {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for name in ports.store.pipeline_names().await? {
        let Some(record) = ports.store.pipeline(&name).await? else {
            continue;
        };
        if record.pipeline.lifecycle.is_none() {
            continue;
        }
        let result = async {
            let actions = plan(ports, &record.pipeline).await?;
            apply(ports, &actions).await?;
            Ok::<_, StageError>(actions)
        }
        .await;
        match result {
            Ok(actions) => done.extend(actions),
            Err(e) => failed.push(serde_json::json!({"pipeline": name, "error": e.to_string()})),
        }
    }
    Ok(serde_json::json!({"actions": done, "failed": failed}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn pipeline(lifecycle: &str) -> Pipeline {
        let text = format!(
            "name: p\nversion: 1.0.0\nparent:\n  ami: ami-0123456789abcdef0\ncomponents:\n  - inline:\n      name: c\n      schemaVersion: 1.0\n      phases:\n        - name: build\n          steps:\n            - name: s\n              action: ExecuteBash\n              inputs:\n                commands: [\"true\"]\ndistribution:\n  - region: us-east-1\nlifecycle:\n{lifecycle}"
        );
        crate::model::load_str(std::path::Path::new("p.yaml"), &text)
            .expect("valid")
            .pipeline
    }

    fn image(n: u32, days_old: i64, now: DateTime<Utc>) -> ImageInfo {
        ImageInfo {
            id: ImageId(format!("ami-{n:017}")),
            name: format!("p-{n}"),
            created: now - Duration::days(days_old),
            tags: BTreeMap::from([("kiln:pipeline".to_string(), "p".to_string())]),
            deprecated: None,
        }
    }

    fn verdicts(actions: &[Action]) -> Vec<(String, Verdict)> {
        actions
            .iter()
            .map(|a| (a.name.clone(), a.verdict))
            .collect()
    }

    #[test]
    fn keep_latest_deletes_all_but_the_newest_n() {
        let now = Utc::now();
        let p = pipeline("  keepLatest: 2\n");
        let images = (1..=4).map(|n| image(n, i64::from(10 - n), now)).collect();
        assert_eq!(
            verdicts(&decide(&p, "us-east-1", images, now)),
            [
                ("p-2".into(), Verdict::Delete),
                ("p-1".into(), Verdict::Delete)
            ]
        );
    }

    #[test]
    fn age_rules_deprecate_then_delete_but_never_the_newest() {
        let now = Utc::now();
        let p = pipeline("  deprecateAfterDays: 30\n  deleteAfterDays: 90\n");
        // Ages 200, 100, 40 and 5 days: the newest stays, 40 is deprecated, the rest deleted.
        let images = vec![
            image(1, 200, now),
            image(2, 100, now),
            image(3, 40, now),
            image(4, 5, now),
        ];
        assert_eq!(
            verdicts(&decide(&p, "us-east-1", images, now)),
            [
                ("p-3".into(), Verdict::Deprecate),
                ("p-2".into(), Verdict::Delete),
                ("p-1".into(), Verdict::Delete)
            ]
        );
        // A lone old image stays: a pipeline keeps a current image.
        assert!(decide(&p, "us-east-1", vec![image(9, 400, now)], now).is_empty());
    }

    #[test]
    fn excluded_images_are_never_touched_and_do_not_count() {
        let now = Utc::now();
        let p = pipeline("  keepLatest: 1\n  excludeTags:\n    keep: \"true\"\n");
        let mut pinned = image(1, 50, now);
        pinned.tags.insert("keep".into(), "true".into());
        let images = vec![pinned, image(2, 20, now), image(3, 10, now)];
        assert_eq!(
            verdicts(&decide(&p, "us-east-1", images, now)),
            [("p-2".into(), Verdict::Delete)]
        );
    }

    #[test]
    fn images_of_the_same_second_are_ordered_by_build_number() {
        let now = Utc::now();
        let p = pipeline("  keepLatest: 1\n");
        let images: Vec<ImageInfo> = [10, 9, 11]
            .into_iter()
            .map(|n| {
                let mut i = image(n, 0, now);
                i.tags.insert("kiln:version".into(), format!("1.0.0/{n}"));
                i
            })
            .collect();
        assert_eq!(
            verdicts(&decide(&p, "us-east-1", images, now)),
            [
                ("p-10".into(), Verdict::Delete),
                ("p-9".into(), Verdict::Delete)
            ]
        );
    }

    #[test]
    fn deprecated_images_are_not_deprecated_again() {
        let now = Utc::now();
        let p = pipeline("  deprecateAfterDays: 1\n");
        let mut old = image(1, 10, now);
        old.deprecated = Some(now - Duration::days(2));
        let images = vec![old, image(2, 0, now)];
        assert!(decide(&p, "us-east-1", images, now).is_empty());
    }
}
