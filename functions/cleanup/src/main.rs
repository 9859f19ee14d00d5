//! The cleanup stage as a Lambda function, and the reaper of executions that ended outside
//! kiln's Catch: wiring only; both live in `kiln` (`stages::cleanup`, `aws::reaper`).

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    kiln::lambda::run_cleanup().await
}
