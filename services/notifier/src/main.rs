#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = orderflow_notifier::Config::from_args();
    orderflow_runtime::telemetry::init_logging();
    orderflow_runtime::run_main("orderflow-notifier", orderflow_notifier::bind(config)).await
}
