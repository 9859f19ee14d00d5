//! The trigger function: parent-image events become deduplicated StartExecution calls; wiring
//! only, the logic lives in `kiln::aws::control`.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    kiln::lambda::run_trigger().await
}
