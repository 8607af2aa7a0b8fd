#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = orderflow_invoice::Config::from_args();
    orderflow_runtime::telemetry::init_logging();
    orderflow_runtime::run_main("orderflow-invoice", orderflow_invoice::bind(config)).await
}
