#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = orderflow_notifier::Config::from_args();
    let args = config.server.clone();
    orderflow_runtime::run_main(
        "orderflow-notifier",
        orderflow_notifier::STAGE,
        &args,
        orderflow_notifier::bind(config),
    )
    .await
}
