//! The task tokens events answer, kept in the stack's table: one item per token under
//! `WAKE#<region>#<resource>`, expiring after a day (the table's TTL) should no event or answer
//! ever come; answered with Step Functions' SendTaskSuccess.

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use sha2::{Digest, Sha256};

use super::store::s;
use super::{sdk_error, AwsPorts};
use crate::errors::{ErrorKind, StageError};
use crate::model::build::Awaited;
use crate::ports::{PortResult, Wakeups};

/// How long a kept token outlives its registration at most (Step Functions' own limit for a
/// task is a year; kiln's stage timeouts are hours).
const KEEP_SECONDS: i64 = 24 * 3600;

fn key(region: &str, id: &str) -> String {
    format!("WAKE#{region}#{id}")
}

/// A token is up to 1024 characters (Step Functions), too long for a sort key beside the others:
/// its SHA-256 is the key.
fn token_key(token: &str) -> String {
    format!("TOKEN#{}", hex::encode(Sha256::digest(token.as_bytes())))
}

impl Wakeups for AwsPorts {
    fn register<'a>(&'a self, token: &'a str, awaited: &'a Awaited) -> PortResult<'a, ()> {
        Box::pin(async move {
            let body = serde_json::to_string(awaited)
                .map_err(|e| StageError::new(ErrorKind::Internal, e.to_string()))?;
            let expires = chrono::Utc::now().timestamp() + KEEP_SECONDS;
            self.dynamodb()
                .put_item()
                .table_name(&self.settings.table)
                .item("pk", s(key(&awaited.region, &awaited.id)))
                .item("sk", s(token_key(token)))
                .item("token", s(token))
                .item("awaited", s(body))
                .item("expires", AttributeValue::N(expires.to_string()))
                .send()
                .await
                .map_err(|e| sdk_error("PutItem", e))?;
            Ok(())
        })
    }

    fn registered<'a>(
        &'a self,
        region: &'a str,
        id: &'a str,
    ) -> PortResult<'a, Vec<(String, Awaited)>> {
        Box::pin(async move {
            let out = self
                .dynamodb()
                .query()
                .table_name(&self.settings.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(key(region, id)))
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| sdk_error("Query", e))?;
            Ok(out
                .items()
                .iter()
                .filter_map(|item| {
                    let text = |k: &str| match item.get(k) {
                        Some(AttributeValue::S(v)) => Some(v.clone()),
                        _ => None,
                    };
                    let awaited = serde_json::from_str(&text("awaited")?).ok()?;
                    Some((text("token")?, awaited))
                })
                .collect())
        })
    }

    fn wake<'a>(
        &'a self,
        token: &'a str,
        awaited: &'a Awaited,
        output: &'a serde_json::Value,
    ) -> PortResult<'a, bool> {
        Box::pin(async move {
            let sent = self
                .sfn()
                .send_task_success()
                .task_token(token)
                .output(output.to_string())
                .send()
                .await;
            let woken = match sent {
                Ok(_) => true,
                // The task stopped waiting: answered already, timed out, or its execution ended.
                Err(e)
                    if matches!(
                        e.code(),
                        Some("TaskDoesNotExist" | "TaskTimedOut" | "InvalidToken")
                    ) =>
                {
                    false
                }
                Err(e) => return Err(sdk_error("SendTaskSuccess", e)),
            };
            self.dynamodb()
                .delete_item()
                .table_name(&self.settings.table)
                .key("pk", s(key(&awaited.region, &awaited.id)))
                .key("sk", s(token_key(token)))
                .send()
                .await
                .map_err(|e| sdk_error("DeleteItem", e))?;
            Ok(woken)
        })
    }
}
