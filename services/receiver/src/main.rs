#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = orderflow_receiver::Config::from_args();
    orderflow_runtime::telemetry::init_logging();
    orderflow_runtime::run_main("orderflow-receiver", orderflow_receiver::bind(config)).await
}
