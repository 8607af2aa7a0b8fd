#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = orderflow_receiver::Config::from_args();
    let args = config.server.clone();
    orderflow_runtime::run_main(
        "orderflow-receiver",
        orderflow_receiver::STAGE,
        &args,
        orderflow_receiver::bind(config),
    )
    .await
}
