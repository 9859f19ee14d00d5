//! The cold-start bench's baseline for a first real operation: a Rust Lambda function as a user
//! would write it with the AWS SDK — aws-config's default chain, the DynamoDB client made once,
//! one GetItem of `{pk: event.pk, sk: event.sk}` from `KILN_TABLE` per invocation.

use aws_sdk_dynamodb::types::AttributeValue;
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::{json, Value as Json};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let table = std::env::var("KILN_TABLE")?;
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&config);
    let (table, dynamodb) = (&table, &dynamodb);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Json>| async move {
        let key = |k: &str| AttributeValue::S(event.payload[k].as_str().unwrap_or_default().into());
        let item = dynamodb
            .get_item()
            .table_name(table)
            .key("pk", key("pk"))
            .key("sk", key("sk"))
            .send()
            .await?;
        Ok::<Json, lambda_runtime::Error>(json!({"found": item.item().is_some()}))
    }))
    .await
}
