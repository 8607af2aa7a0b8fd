#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = orderflow_stock::Config::from_args();
    orderflow_runtime::telemetry::init_logging();
    orderflow_runtime::run_main("orderflow-stock", orderflow_stock::bind(config)).await
}
