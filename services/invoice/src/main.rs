#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = orderflow_invoice::Config::from_args();
    let args = config.server.clone();
    orderflow_runtime::run_main(
        "orderflow-invoice",
        orderflow_invoice::STAGE,
        &args,
        orderflow_invoice::bind(config),
    )
    .await
}
