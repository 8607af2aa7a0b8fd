/// jemalloc instead of the system allocator: the hot path allocates per order, and jemalloc's
/// thread caches cut the stage's CPU per order (BENCHMARKS.md, "2026-11-28, evening" and "late").
/// Built with one arena for all threads (`.cargo/config.toml`), which keeps the peak RSS flat.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
