//! The customize stage as a Lambda function: wiring only; the stage lives in `kiln::stages`.

use kiln::stages::handler::Function;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    kiln::lambda::run(Function::Customize).await
}
