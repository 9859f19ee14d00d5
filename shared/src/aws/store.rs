//! The store over one DynamoDB table: `pk`/`sk` strings (`PIPELINE#<name>` with `DEF#<version>`,
//! `DEF#LATEST`, `BUILD#<ulid>`, `LOCK`), a GSI `by-status` (`gsi1pk` = `STATUS#<status>`) for
//! the janitor and `kiln builds list`, TTL on `expires`. Status changes are conditional writes.

use std::collections::HashMap;

use aws_sdk_dynamodb::error::ProvideErrorMetadata as _;
use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};

use super::{sdk_error, AwsPorts};
use crate::errors::{ErrorKind, StageError};
use crate::model::build::{Build, BuildId, BuildStatus};
use crate::ports::{PipelineRecord, PortResult, Store};

type Item = HashMap<String, AttributeValue>;

pub(super) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn text<'i>(item: &'i Item, key: &str) -> Option<&'i str> {
    item.get(key)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

fn internal(e: impl std::fmt::Display) -> StageError {
    StageError::new(ErrorKind::Internal, e.to_string())
}

fn build_item(build: &Build) -> Result<Item, StageError> {
    Ok(HashMap::from([
        ("pk".into(), s(format!("PIPELINE#{}", build.pipeline))),
        ("sk".into(), s(format!("BUILD#{}", build.id))),
        ("status".into(), s(build.status.as_str())),
        (
            "gsi1pk".into(),
            s(format!("STATUS#{}", build.status.as_str())),
        ),
        ("gsi1sk".into(), s(build.id.as_str())),
        (
            "record".into(),
            s(serde_json::to_string(build).map_err(internal)?),
        ),
    ]))
}

fn parse_build(item: &Item) -> Result<Build, StageError> {
    serde_json::from_str(
        text(item, "record").ok_or_else(|| internal("a build item has no record"))?,
    )
    .map_err(internal)
}

/// Creates the table (for tests and `kiln run --backend aws`; the SAM template creates it in a
/// stack).
pub async fn create_table(client: &aws_sdk_dynamodb::Client, name: &str) -> Result<(), StageError> {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType,
        Projection, ProjectionType, ScalarAttributeType,
    };
    let attr = |n: &str| {
        AttributeDefinition::builder()
            .attribute_name(n)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(internal)
    };
    let key = |n: &str, t: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(n)
            .key_type(t)
            .build()
            .map_err(internal)
    };
    let result = client
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("pk")?)
        .attribute_definitions(attr("sk")?)
        .attribute_definitions(attr("gsi1pk")?)
        .attribute_definitions(attr("gsi1sk")?)
        .key_schema(key("pk", KeyType::Hash)?)
        .key_schema(key("sk", KeyType::Range)?)
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name("by-status")
                .key_schema(key("gsi1pk", KeyType::Hash)?)
                .key_schema(key("gsi1sk", KeyType::Range)?)
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::All)
                        .build(),
                )
                .build()
                .map_err(internal)?,
        )
        .send()
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("ResourceInUseException") => Ok(()),
        Err(e) => Err(sdk_error("CreateTable", e)),
    }
}

impl AwsPorts {
    async fn get_item(&self, pk: String, sk: String) -> Result<Option<Item>, StageError> {
        let out = self
            .dynamodb()
            .get_item()
            .table_name(&self.settings.table)
            .key("pk", s(pk))
            .key("sk", s(sk))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("GetItem", e))?;
        Ok(out.item().cloned())
    }
}

impl Store for AwsPorts {
    fn put_pipeline<'a>(&'a self, record: &'a PipelineRecord) -> PortResult<'a, ()> {
        Box::pin(async move {
            let p = &record.pipeline;
            let body = serde_json::to_string(record).map_err(internal)?;
            let pk = format!("PIPELINE#{}", p.name);
            // Definition versions are immutable: the same version with other content is refused.
            let put = self
                .dynamodb()
                .put_item()
                .table_name(&self.settings.table)
                .item("pk", s(&pk))
                .item("sk", s(format!("DEF#{}", p.version)))
                .item("record", s(&body))
                .condition_expression("attribute_not_exists(pk) OR #r = :r")
                .expression_attribute_names("#r", "record")
                .expression_attribute_values(":r", s(&body))
                .send()
                .await;
            match put {
                Ok(_) => {}
                Err(e) if e.code() == Some("ConditionalCheckFailedException") => {
                    return Err(StageError::new(
                        ErrorKind::InvalidPipeline,
                        format!(
                            "pipeline {} version {} exists with other content; raise `version`",
                            p.name, p.version
                        ),
                    ));
                }
                Err(e) => return Err(sdk_error("PutItem", e)),
            }
            self.dynamodb()
                .put_item()
                .table_name(&self.settings.table)
                .item("pk", s(&pk))
                .item("sk", s("DEF#LATEST"))
                .item("version", s(&p.version))
                .send()
                .await
                .map_err(|e| sdk_error("PutItem", e))?;
            Ok(())
        })
    }

    fn pipeline_names(&self) -> PortResult<'_, Vec<String>> {
        Box::pin(async move {
            let mut out: Vec<String> = self
                .scan("sk = :v", "DEF#LATEST")
                .await?
                .iter()
                .filter_map(|item| match item.get("pk") {
                    Some(AttributeValue::S(pk)) => {
                        Some(pk.trim_start_matches("PIPELINE#").to_string())
                    }
                    _ => None,
                })
                .collect();
            out.sort();
            Ok(out)
        })
    }

    fn pipeline<'a>(&'a self, name: &'a str) -> PortResult<'a, Option<PipelineRecord>> {
        Box::pin(async move {
            let pk = format!("PIPELINE#{name}");
            let Some(latest) = self.get_item(pk.clone(), "DEF#LATEST".into()).await? else {
                return Ok(None);
            };
            let version = text(&latest, "version")
                .ok_or_else(|| internal("DEF#LATEST has no version"))?
                .to_string();
            let Some(item) = self.get_item(pk, format!("DEF#{version}")).await? else {
                return Ok(None);
            };
            Ok(Some(
                serde_json::from_str(
                    text(&item, "record").ok_or_else(|| internal("a definition has no record"))?,
                )
                .map_err(internal)?,
            ))
        })
    }

    fn create_build<'a>(&'a self, build: &'a Build) -> PortResult<'a, ()> {
        Box::pin(async move {
            let r = self
                .dynamodb()
                .put_item()
                .table_name(&self.settings.table)
                .set_item(Some(build_item(build)?))
                .condition_expression("attribute_not_exists(pk)")
                .send()
                .await;
            match r {
                Ok(_) => Ok(()),
                Err(e) if e.code() == Some("ConditionalCheckFailedException") => {
                    match self.build(&build.pipeline, &build.id).await? {
                        Some(existing) if &existing == build => Ok(()),
                        _ => Err(internal(format!(
                            "build {} exists with other content",
                            build.id
                        ))),
                    }
                }
                Err(e) => Err(sdk_error("PutItem", e)),
            }
        })
    }

    fn save_build<'a>(&'a self, build: &'a Build, expected: BuildStatus) -> PortResult<'a, ()> {
        Box::pin(async move {
            if !expected.can_become(build.status) {
                return Err(internal(format!(
                    "build {} cannot move from {} to {}",
                    build.id,
                    expected.as_str(),
                    build.status.as_str()
                )));
            }
            let r = self
                .dynamodb()
                .put_item()
                .table_name(&self.settings.table)
                .set_item(Some(build_item(build)?))
                .condition_expression("#st = :expected OR #st = :new")
                .expression_attribute_names("#st", "status")
                .expression_attribute_values(":expected", s(expected.as_str()))
                .expression_attribute_values(":new", s(build.status.as_str()))
                .send()
                .await;
            match r {
                Ok(_) => Ok(()),
                Err(e) if e.code() == Some("ConditionalCheckFailedException") => {
                    Err(StageError::new(
                        ErrorKind::Internal,
                        format!(
                            "build {} is no longer {} (a stale update)",
                            build.id,
                            expected.as_str()
                        ),
                    )
                    .with_code("ConditionalCheckFailedException"))
                }
                Err(e) => Err(sdk_error("PutItem", e)),
            }
        })
    }

    fn build<'a>(&'a self, pipeline: &'a str, id: &'a BuildId) -> PortResult<'a, Option<Build>> {
        Box::pin(async move {
            self.get_item(format!("PIPELINE#{pipeline}"), format!("BUILD#{id}"))
                .await?
                .map(|i| parse_build(&i))
                .transpose()
        })
    }

    fn builds<'a>(&'a self, pipeline: &'a str) -> PortResult<'a, Vec<Build>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let mut start: Option<Item> = None;
            loop {
                let page = self
                    .dynamodb()
                    .query()
                    .table_name(&self.settings.table)
                    .key_condition_expression("pk = :pk AND begins_with(sk, :b)")
                    .expression_attribute_values(":pk", s(format!("PIPELINE#{pipeline}")))
                    .expression_attribute_values(":b", s("BUILD#"))
                    .consistent_read(true)
                    .set_exclusive_start_key(start.take())
                    .send()
                    .await
                    .map_err(|e| sdk_error("Query", e))?;
                for item in page.items() {
                    out.push(parse_build(item)?);
                }
                match page.last_evaluated_key() {
                    Some(k) if !k.is_empty() => start = Some(k.clone()),
                    _ => break,
                }
            }
            Ok(out)
        })
    }

    fn lock<'a>(
        &'a self,
        pipeline: &'a str,
        build: &'a BuildId,
        now: DateTime<Utc>,
        ttl_seconds: i64,
    ) -> PortResult<'a, ()> {
        Box::pin(async move {
            let pk = format!("PIPELINE#{pipeline}");
            let r = self
                .dynamodb()
                .put_item()
                .table_name(&self.settings.table)
                .item("pk", s(&pk))
                .item("sk", s("LOCK"))
                .item("build", s(build.as_str()))
                .item(
                    "expires",
                    AttributeValue::N((now.timestamp() + ttl_seconds).to_string()),
                )
                .condition_expression("attribute_not_exists(pk) OR expires < :now OR #b = :me")
                .expression_attribute_names("#b", "build")
                .expression_attribute_values(":now", AttributeValue::N(now.timestamp().to_string()))
                .expression_attribute_values(":me", s(build.as_str()))
                .send()
                .await;
            match r {
                Ok(_) => Ok(()),
                Err(e) if e.code() == Some("ConditionalCheckFailedException") => {
                    let holder = self
                        .get_item(pk, "LOCK".into())
                        .await?
                        .and_then(|i| text(&i, "build").map(str::to_string))
                        .unwrap_or_else(|| "another build".into());
                    Err(StageError::new(
                        ErrorKind::Locked,
                        format!("pipeline {pipeline} is being built by build {holder}"),
                    ))
                }
                Err(e) => Err(sdk_error("PutItem", e)),
            }
        })
    }

    fn unlock<'a>(&'a self, pipeline: &'a str, build: &'a BuildId) -> PortResult<'a, ()> {
        Box::pin(async move {
            let r = self
                .dynamodb()
                .delete_item()
                .table_name(&self.settings.table)
                .key("pk", s(format!("PIPELINE#{pipeline}")))
                .key("sk", s("LOCK"))
                .condition_expression("#b = :me")
                .expression_attribute_names("#b", "build")
                .expression_attribute_values(":me", s(build.as_str()))
                .send()
                .await;
            match r {
                Ok(_) => Ok(()),
                Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(()),
                Err(e) => Err(sdk_error("DeleteItem", e)),
            }
        })
    }
}

impl AwsPorts {
    /// Every item matching `filter` (with `:v` bound to `value`), all pages of a scan: for the
    /// CLI and the daily lifecycle run, never on a build's path.
    async fn scan(&self, filter: &str, value: &str) -> Result<Vec<Item>, StageError> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .dynamodb()
                .scan()
                .table_name(&self.settings.table)
                .filter_expression(filter)
                .expression_attribute_values(":v", s(value))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("Scan", e))?;
            out.extend(page.items().iter().cloned());
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Every build in the table, oldest first (`kiln builds list --stack`).
    pub async fn all_builds(&self) -> Result<Vec<Build>, StageError> {
        let mut out = self
            .scan("begins_with(sk, :v)", "BUILD#")
            .await?
            .iter()
            .map(parse_build)
            .collect::<Result<Vec<Build>, _>>()?;
        out.sort_by(|a, b| a.id.0.cmp(&b.id.0));
        Ok(out)
    }
}
