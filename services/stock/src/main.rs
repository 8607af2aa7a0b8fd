#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = orderflow_stock::Config::from_args();
    let args = config.server.clone();
    orderflow_runtime::run_main(
        "orderflow-stock",
        orderflow_stock::STAGE,
        &args,
        orderflow_stock::bind(config),
    )
    .await
}
