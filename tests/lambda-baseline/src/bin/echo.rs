//! The cold-start bench's floor: a Rust Lambda function that answers its event and does nothing
//! else (`lambda_runtime` and tokio, as the stage functions start them).

use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::Value as Json;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::run(service_fn(|event: LambdaEvent<Json>| async move {
        Ok::<Json, lambda_runtime::Error>(event.payload)
    }))
    .await
}
