//! The wake function: keeps the task tokens of the state machine's waits and answers them when
//! EventBridge delivers the EC2 or SSM event that ends them. Wiring only; the code lives in
//! `kiln::stages::wake`.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    kiln::lambda::run(kiln::lambda::WAKE).await
}
