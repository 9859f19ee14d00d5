//! The test-image stage as a Lambda function: wiring only; the stage lives in `kiln::stages`.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    kiln::lambda::run(kiln::lambda::TEST_IMAGE).await
}
