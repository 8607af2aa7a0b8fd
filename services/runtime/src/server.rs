//! A stage's gRPC server: the stage's own service plus what every stage serves the same way —
//! `orderflow.v1.EventLog` over its outbox, `grpc.health.v1`, reflection (v1 and v1alpha), and
//! Prometheus metrics on their own port.
//!
//! [`StageServer::bind`] opens the store and binds the sockets (so callers learn the addresses
//! before serving); [`StageServer::serve`] runs until the shutdown token is cancelled, then drains:
//! health turns NOT_SERVING (all but the liveness name), the listener stops accepting, `Subscribe`
//! streams end, in-flight calls finish within the grace period, and the stage's background tasks
//! complete the batch they hold.
//!
//! Every call to the stage's own service runs in a server span named after the method, a child of
//! the caller's span when the request carries `traceparent` ([`CallSpans`]). The span is decided
//! before it is built: a call whose trace is not sampled runs without one, its context passed on
//! ([`telemetry::OrderSpan`]). Health, reflection and `EventLog` calls (the pipeline's own
//! plumbing) are not traced.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::StreamExt;

use orderflow_proto::stored::event_log_server::EventLogServer;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{
    Response, Status,
    service::Routes,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::ServingStatus;

use crate::{
    auth::AdminGuard,
    config::{ServerArgs, StageCommand, ensure_data_dir},
    disk::FreeSpace,
    eventlog::EventLogService,
    partition::Partition,
    retention::run_retention,
    store::{Condition, Store, StoreError},
    telemetry::{self, Telemetry, TelemetryConfig},
    tls::ServerIdentity,
};

/// Largest request any stage decodes: a maximal order is about 10 KiB. Larger: `OUT_OF_RANGE`
/// naming the limit. Malformed: `INVALID_ARGUMENT`.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Largest response any stage encodes (pages and batches are capped far below it by byte size).
pub const MAX_RESPONSE_BYTES: usize = crate::eventlog::MAX_MESSAGE_BYTES;

/// Why a stage could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("cannot open the store at {path}: {source}")]
    Store { path: String, source: StoreError },
    #[error("cannot listen on {addr} (--listen, ORDERFLOW_LISTEN): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reflection set-up failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl ServeError {
    /// A start-up failure for a `String` message.
    pub fn config(message: impl Into<String>) -> Self {
        ServeError::Config(message.into())
    }
}

/// Fully-qualified names of the services every stage serves besides its own.
const EVENT_LOG_SERVICE: &str = "orderflow.v1.EventLog";
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
const REFLECTION_V1_SERVICE: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA_SERVICE: &str = "grpc.reflection.v1alpha.ServerReflection";
/// The health service name for liveness probes: SERVING for as long as the process answers, while
/// `""` (readiness) follows the store. A full volume makes a stage unready, not dead: it recovers by
/// itself once there is room, and restarting it would not make any.
const LIVENESS: &str = "liveness";

/// Starts one of a stage's background tasks, given the shutdown token it must honour.
type TaskStarter = Box<dyn FnOnce(CancellationToken) -> JoinHandle<()> + Send>;

/// A stage whose store is open and whose socket is bound, ready to serve.
pub struct StageServer {
    stage: &'static str,
    args: ServerArgs,
    listener: TcpListener,
    local_addr: SocketAddr,
    metrics: Option<TcpListener>,
    identity: Option<ServerIdentity>,
    /// The stores of the partitions this replica owns, ascending; never empty.
    stores: Vec<Store>,
    free_space: Arc<FreeSpace>,
    service: Option<(Routes, &'static str)>,
    tasks: Vec<TaskStarter>,
    announced: Vec<(&'static str, String)>,
}

impl StageServer {
    /// Opens the store of a stage that runs one partition (recovering from any crash; see
    /// [`store_path`]) and binds `--listen`. Refuses settings with more partitions or replicas:
    /// such a stage's service and tasks use [`StageServer::store`] alone.
    pub async fn bind(stage: &'static str, args: ServerArgs) -> Result<Self, ServeError> {
        if args.partitions != 1 || args.replicas != 1 {
            return Err(ServeError::Config(format!(
                "the {stage} stage runs only with 1 partition (--partitions / \
                 ORDERFLOW_PARTITIONS) and 1 replica (--replicas / ORDERFLOW_REPLICAS) until \
                 scale-out"
            )));
        }
        Self::bind_partitions(stage, args).await
    }

    /// Opens the store of each partition this replica owns (recovering from any crash; see
    /// [`store_path`]) and binds `--listen`. Its `EventLog` serves every one of them.
    pub async fn bind_partitions(
        stage: &'static str,
        args: ServerArgs,
    ) -> Result<Self, ServeError> {
        let identity = ServerIdentity::load(
            args.tls_cert.as_deref(),
            args.tls_key.as_deref(),
            args.tls_client_ca.as_deref(),
        )
        .map_err(ServeError::Config)?;
        ensure_data_dir(&args.data_dir).map_err(ServeError::Config)?;
        let owned = args.owned_partitions();
        if owned.is_empty() {
            return Err(ServeError::Config(
                args.check_replica().err().unwrap_or_else(|| {
                    "this replica owns no partition (--replica, --replicas, --partitions)"
                        .to_owned()
                }),
            ));
        }
        let mut stores = Vec::with_capacity(owned.len());
        for partition in owned {
            let path = store_path(&args.data_dir, stage, partition);
            let opening = path.clone();
            let store = tokio::task::spawn_blocking(move || {
                Store::open_partition(&opening, partition, crate::store::CACHE_BYTES)
            })
            .await?
            .map_err(|source| ServeError::Store {
                path: path.display().to_string(),
                source,
            })?;
            stores.push(store);
        }
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: args.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: args.listen,
            source,
        })?;
        let mut announced = Vec::new();
        let metrics = match args.metrics_listen.0 {
            Some(addr) => {
                let listener = crate::metrics::bind(addr)
                    .await
                    .map_err(ServeError::Config)?;
                let bound = listener.local_addr().map_or(addr, |a| a);
                announced.push(("metrics", format!("http://{bound}/metrics")));
                Some(listener)
            }
            None => None,
        };
        let free_space = FreeSpace::new(&args.data_dir, args.min_free_space);
        Ok(StageServer {
            stage,
            args,
            listener,
            local_addr,
            metrics,
            identity,
            stores,
            free_space,
            service: None,
            tasks: Vec::new(),
            announced,
        })
    }

    /// Keeps the outbox for `consumers` (the stages that read it) from now on, even before they
    /// first acknowledge — unless `--retain-for` names others. No one else can acknowledge.
    pub async fn retain_for(self, consumers: &[&str]) -> Result<Self, ServeError> {
        self.retain_for_and(consumers, |_| Vec::new()).await
    }

    /// [`StageServer::retain_for`], and each partition's outbox also for the consumers `internal`
    /// names for it, whatever `--retain-for` says: the stage's own partitions reading each other
    /// (stock's shards), without which the stage cannot work.
    pub async fn retain_for_and(
        self,
        consumers: &[&str],
        internal: impl Fn(Partition) -> Vec<String>,
    ) -> Result<Self, ServeError> {
        let names: Vec<String> = match &self.args.retain_for {
            Some(names) => names.0.clone(),
            None => consumers.iter().map(|c| (*c).to_owned()).collect(),
        };
        for store in &self.stores {
            let mut names = names.clone();
            for name in internal(store.partition()) {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            store
                .call(move |store| store.outbox().retain_for(&names))
                .await
                .map_err(|status| {
                    ServeError::config(format!("cannot register consumers: {}", status.message()))
                })?;
        }
        Ok(self)
    }

    /// Another address this stage serves on (its HTTP door, say), printed at start before the
    /// `listening on` line.
    pub fn announce(mut self, what: &'static str, address: String) -> Self {
        self.announced.push((what, address));
        self
    }

    /// What [`StageServer::announce`] collected, metrics first.
    pub fn announced(&self) -> &[(&'static str, String)] {
        &self.announced
    }

    /// The checker of admin RPCs for this stage's `--admin-token`.
    pub fn admin_guard(&self) -> AdminGuard {
        AdminGuard::new(self.args.admin_token.clone())
    }

    /// The TLS identity this stage serves with, if any (for extra listeners such as HTTP).
    pub fn tls_identity(&self) -> Option<&ServerIdentity> {
        self.identity.as_ref()
    }

    /// The stage's settings.
    pub fn args(&self) -> &ServerArgs {
        &self.args
    }

    /// The stage's own gRPC service (`routes`), whose fully-qualified name is `name`.
    pub fn with_service(mut self, routes: Routes, name: &'static str) -> Self {
        self.service = Some((routes, name));
        self
    }

    /// A background task (subscription, writer) started when serving begins. It must end on its own
    /// once the token it is given is cancelled, after finishing the batch it holds.
    pub fn with_task(
        mut self,
        start: impl FnOnce(CancellationToken) -> JoinHandle<()> + Send + 'static,
    ) -> Self {
        self.tasks.push(Box::new(start));
        self
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The store of the first partition this replica owns: of a stage bound with
    /// [`StageServer::bind`], its one store.
    pub fn store(&self) -> &Store {
        // `bind` opened at least one store.
        &self.stores[0]
    }

    /// The stores of every partition this replica owns, ascending by partition.
    pub fn stores(&self) -> &[Store] {
        &self.stores
    }

    /// The free space of the stage's data volume against `--min-free-space`.
    pub fn free_space(&self) -> Arc<FreeSpace> {
        self.free_space.clone()
    }

    /// Serves the stage's service plus the shared ones and runs its tasks until `shutdown`, then
    /// drains.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), ServeError> {
        let StageServer {
            stage,
            args,
            listener,
            local_addr,
            metrics,
            identity,
            stores,
            free_space,
            service,
            tasks,
            announced: _,
        } = self;
        // Cancelled by the process's signal, or when the store cannot be recovered.
        let shutdown = shutdown.child_token();
        let (mut routes, service) = match service {
            Some((routes, name)) => (routes, name),
            None => (Routes::default(), ""),
        };
        let health = tonic_health::server::HealthReporter::new();
        let health_service = crate::health::HealthService::new(health.clone()).server();
        for name in ["", service, EVENT_LOG_SERVICE, LIVENESS] {
            health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        // Advertise exactly what this stage serves: the descriptor set holds every stage's services.
        let reflection = || {
            let builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(orderflow_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
                .include_reflection_service(false);
            [
                service,
                EVENT_LOG_SERVICE,
                HEALTH_SERVICE,
                REFLECTION_V1_SERVICE,
                REFLECTION_V1ALPHA_SERVICE,
            ]
            .into_iter()
            .filter(|name| !name.is_empty())
            .fold(builder, |builder, name| builder.with_service_name(name))
        };
        let streams = CancellationToken::new();
        routes = routes
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(
                EventLogServer::new(EventLogService::partitions(
                    stores.iter().map(Store::outbox).collect(),
                    args.replicas,
                    streams.clone(),
                    args.link_guard(),
                ))
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
            );
        let tasks: Vec<_> = tasks
            .into_iter()
            .map(|start| start(shutdown.clone()))
            .collect();
        let retention: Vec<_> = stores
            .iter()
            .map(|store| {
                tokio::spawn(run_retention(
                    stage,
                    store.clone(),
                    args.retention(),
                    shutdown.clone(),
                ))
            })
            .collect();
        let metrics = tokio::spawn(crate::metrics::serve(metrics, shutdown.clone()));
        let monitor = tokio::spawn(free_space.monitor(stage, shutdown.clone()));
        let reporter = tokio::spawn(report_store_condition(
            stage,
            stores.clone(),
            health.clone(),
            [service, EVENT_LOG_SERVICE],
            shutdown.clone(),
        ));
        let recovery: Vec<_> = stores
            .iter()
            .map(|store| {
                let (store, shutdown) = (store.clone(), shutdown.clone());
                tokio::spawn(async move {
                    let result = store.recover(shutdown.clone()).await;
                    if let Err(e) = &result {
                        tracing::error!(stage, partition = %store.partition(), error = %e, "the store cannot be opened again; stopping so that the process is restarted");
                        shutdown.cancel();
                    }
                    (store.partition(), result)
                })
            })
            .collect();

        let partitions = stores
            .iter()
            .map(|store| store.partition().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        tracing::info!(stage, addr = %local_addr, data_dir = %args.data_dir.display(), %partitions, "serving");
        let drain = {
            let shutdown = shutdown.clone();
            let health = health.clone();
            async move {
                shutdown.cancelled().await;
                for name in ["", service, EVENT_LOG_SERVICE] {
                    health
                        .set_service_status(name, ServingStatus::NotServing)
                        .await;
                }
                streams.cancel();
            }
        };
        let mut builder = Server::builder();
        if let Some(identity) = &identity {
            builder = builder.tls_config(identity.grpc())?;
        }
        // Builder::tcp_nodelay does not apply to a listener of our own: the incoming stream sets it.
        // Without it Nagle holds each small reply or stream batch back until the previous segment
        // is acknowledged, which cost milliseconds per hop (BENCHMARKS.md, "2026-11-28, late").
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let server = builder
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(CallSpans { stage })
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, drain);
        let grace = async {
            shutdown.cancelled().await;
            tokio::time::sleep(args.shutdown_grace).await;
        };
        tokio::select! {
            result = server => result?,
            () = grace => tracing::warn!(stage, "grace period over; closing remaining connections"),
        }
        // A connection still open after the grace period may hold a service clone that a task waits
        // on (the receiver's writer ends when its last sender goes); bound that wait too. Whatever a
        // task still holds was never acknowledged, so nothing promised is lost.
        let finish = async {
            for task in tasks {
                task.await?;
            }
            metrics.await?;
            monitor.await?;
            reporter.await?;
            for retention in retention {
                retention.await?;
            }
            Ok::<_, tokio::task::JoinError>(())
        };
        match tokio::time::timeout(args.shutdown_grace, finish).await {
            Ok(joined) => joined?,
            Err(_) => tracing::warn!(
                stage,
                "background tasks did not finish within the grace period"
            ),
        }
        for recovery in recovery {
            if let Ok(Ok((partition, Err(e)))) =
                tokio::time::timeout(Duration::from_secs(1), recovery).await
            {
                return Err(ServeError::Store {
                    path: store_path(&args.data_dir, stage, partition)
                        .display()
                        .to_string(),
                    source: e,
                });
            }
        }
        tracing::info!(stage, "stopped");
        Ok(())
    }
}

/// Where the store of `partition` of `stage` lives in `data_dir`: `<stage>.redb` in a pipeline of one
/// partition (as before there were partitions), `<stage>-<p>.redb` in one of several, so that a
/// volume holding the partitions a replica owns names each store.
pub fn store_path(data_dir: &Path, stage: &str, partition: Partition) -> PathBuf {
    if partition.count == 1 {
        data_dir.join(format!("{stage}.redb"))
    } else {
        data_dir.join(format!("{stage}-{}.redb", partition.index))
    }
}

/// A change to one store's condition or to the upstream logs refusing it.
enum StoreChange {
    /// The store of this partition changed condition.
    Condition(Condition, u32),
    Refusals,
}

/// Every change to `store`'s condition and refusals from now on.
fn store_changes(store: &Store) -> futures::stream::BoxStream<'static, StoreChange> {
    let partition = store.partition().index;
    let conditions = futures::stream::unfold(store.condition(), move |mut rx| async move {
        rx.changed().await.ok()?;
        let condition = rx.borrow_and_update().clone();
        Some((StoreChange::Condition(condition, partition), rx))
    });
    let refusals = futures::stream::unfold(store.refusals(), |mut rx| async move {
        rx.changed().await.ok()?;
        rx.borrow_and_update();
        Some((StoreChange::Refusals, rx))
    });
    futures::stream::select(conditions, refusals).boxed()
}

/// Keeps health and metrics in step with the stores: NOT_SERVING (for the whole server, the stage's
/// service and its log) while any of them cannot commit or an upstream log refuses it
/// ([`Refusal`](crate::Refusal)), SERVING again once all of that is over, until `shutdown` (after
/// which the drain owns health).
async fn report_store_condition(
    stage: &'static str,
    stores: Vec<Store>,
    health: tonic_health::server::HealthReporter,
    services: [&'static str; 2],
    shutdown: CancellationToken,
) {
    let mut changes = futures::stream::select_all(stores.iter().map(store_changes));
    // The recorder is installed on first use: make sure it exists before the first value is set.
    let _ = crate::metrics::handle();
    let healthy = |value: f64| {
        metrics::gauge!(crate::metrics::STORE_HEALTHY, "stage" => stage).set(value);
    };
    let all_healthy = || {
        stores
            .iter()
            .all(|store| matches!(*store.condition().borrow(), Condition::Healthy))
    };
    healthy(1.0);
    // Health starts SERVING; a refusal may already be recorded by the time this task runs.
    let mut serving = true;
    loop {
        let now = all_healthy()
            && stores
                .iter()
                .all(|store| store.refusals().borrow().is_empty());
        if shutdown.is_cancelled() {
            return;
        }
        if now != serving {
            serving = now;
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for name in ["", services[0], services[1]] {
                health.set_service_status(name, status).await;
            }
        }
        tokio::select! {
            change = changes.next() => match change {
                None => return,
                Some(StoreChange::Condition(condition, partition)) => {
                    if let Condition::Failing(fault) = condition {
                        metrics::counter!(
                            crate::metrics::STORE_FAULTS,
                            "stage" => stage,
                            "kind" => fault.kind.as_str(),
                            "partition" => partition.to_string()
                        )
                        .increment(1);
                    }
                    healthy(if all_healthy() { 1.0 } else { 0.0 });
                }
                Some(StoreChange::Refusals) => {}
            },
            () = shutdown.cancelled() => return,
        }
    }
}

/// Runs each call to the stage's own service in its span ([`call_span`]), or, when its trace is not
/// sampled, with no span and its context passed on.
#[derive(Clone, Copy)]
struct CallSpans {
    stage: &'static str,
}

impl<S> tower::Layer<S> for CallSpans {
    type Service = CallSpanService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallSpanService {
            inner,
            stage: self.stage,
        }
    }
}

/// The service [`CallSpans`] wraps around the stage's routes.
#[derive(Clone)]
struct CallSpanService<S> {
    inner: S,
    stage: &'static str,
}

type CallFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for CallSpanService<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = CallFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let span = call_span(self.stage, &request);
        let call = self.inner.call(request);
        match span {
            None => Box::pin(call),
            Some(span) => Box::pin(async move { span.run(call).await }),
        }
    }
}

/// The server span of one call to the stage's own service: `otel.name` is the full method name,
/// the parent is the caller's span when the request carries `traceparent`, and the sampler decides
/// before it is built (a root's on a trace id drawn first, a child's by its parent's flag).
/// Plumbing is not traced: `None`.
fn call_span<B>(stage: &'static str, request: &http::Request<B>) -> Option<telemetry::OrderSpan> {
    let path = request.uri().path();
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    if service.starts_with("grpc.") || service == EVENT_LOG_SERVICE {
        return None;
    }
    let make = || {
        tracing::info_span!(
            "rpc",
            otel.name = %format_args!("{service}/{method}"),
            otel.kind = "server",
            otel.status_description = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            orderflow.stage = stage,
            order.id = tracing::field::Empty,
            customer.id = tracing::field::Empty,
        )
    };
    Some(telemetry::OrderSpan::of_call(request.headers(), make))
}

/// Wraps an RPC's result into a response, recording its gRPC status code on the call's span. Server
/// faults (INTERNAL, UNAVAILABLE, …) mark the span as an error; a caller's mistake does not.
pub fn respond<T>(result: Result<T, Status>) -> Result<Response<T>, Status> {
    let span = tracing::Span::current();
    match &result {
        Ok(_) => {
            span.record("rpc.grpc.status_code", 0);
        }
        Err(status) => {
            span.record("rpc.grpc.status_code", status.code() as i32);
            if matches!(
                status.code(),
                tonic::Code::Unknown
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unimplemented
                    | tonic::Code::Internal
                    | tonic::Code::Unavailable
                    | tonic::Code::DataLoss
            ) {
                span.record("otel.status_description", status.message());
            }
        }
    }
    result.map(Response::new)
}

/// The whole life of a stage binary once its configuration is parsed: a `health` subcommand checks
/// a running stage and exits; a replica beyond `--replicas` refuses to start (exit code 1);
/// otherwise install logs and traces, bind, print the addresses (other
/// listeners as `<binary> <what> on <addr>`, then `<binary> listening on <addr>` last — tests and
/// scripts wait for it), serve until SIGINT/SIGTERM, drain, flush traces. Start-up errors are
/// printed and give exit code 1.
pub async fn run_main(
    binary: &str,
    stage: &'static str,
    args: &ServerArgs,
    bind: impl std::future::Future<Output = Result<StageServer, ServeError>>,
) -> std::process::ExitCode {
    if let Some(StageCommand::Health { timeout }) = &args.command {
        return crate::health::check(binary, args, *timeout).await;
    }
    if let Err(e) = args.check_replica() {
        eprintln!("{binary}: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let telemetry: Telemetry = telemetry::init(&TelemetryConfig::stage(stage, args.log_format));
    raise_open_files_limit();
    let code = serve_main(binary, bind).await;
    telemetry.shutdown().await;
    code
}

/// Raises the soft limit of open files to the hard one, as servers do: connections, the store and
/// the log sinks all take file descriptors, and the usual soft default (1024) is far below what the
/// system allows. Only logged if it cannot be done.
pub fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open files limit");
            } else {
                tracing::debug!(from = soft, to = hard, "open files limit raised");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open files limit"),
    }
}

async fn serve_main(
    binary: &str,
    bind: impl std::future::Future<Output = Result<StageServer, ServeError>>,
) -> std::process::ExitCode {
    let shutdown = crate::shutdown_on_signal();
    let stage = match bind.await {
        Ok(stage) => stage,
        Err(e) => {
            eprintln!("{binary}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    for (what, addr) in stage.announced() {
        println!("{binary} {what} on {addr}");
    }
    println!("{binary} listening on {}", stage.local_addr());
    match stage.serve(shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{binary}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_proto::v1::{
        Event, HeadRequest, SubscribeRequest, event_log_client::EventLogClient,
    };
    use tonic::Code;

    use super::*;
    use crate::config::Replica;

    /// Replica 1 of 2 over 4 partitions, on loopback in `dir`.
    fn second_of_two(dir: &Path) -> ServerArgs {
        let mut args = ServerArgs::new("127.0.0.1:0".parse().unwrap(), dir);
        (args.replica, args.replicas, args.partitions) = (Replica(1), 2, 4);
        args
    }

    /// A replica serves the log of every partition it owns, each from its own store, and only
    /// those; a stage of one partition refuses such settings before it makes any store.
    #[tokio::test]
    async fn a_replica_serves_each_partition_it_owns_from_its_own_store() {
        let dir = tempfile::tempdir().unwrap();
        let refused = StageServer::bind("stage", second_of_two(dir.path()))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            refused.contains("only with 1 partition") && refused.contains("ORDERFLOW_PARTITIONS"),
            "{refused}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let server = StageServer::bind_partitions("stage", second_of_two(dir.path()))
            .await
            .unwrap();
        let owned: Vec<u32> = server
            .stores()
            .iter()
            .map(|s| s.partition().index)
            .collect();
        assert_eq!(owned, [1, 3]);
        // Partition p's store holds p + 1 entries, each naming its partition.
        for store in server.stores() {
            let p = store.partition().index;
            store
                .write(|txn| {
                    for n in 0..=p {
                        txn.append(&Event {
                            order_id: format!("p{p}-{n}"),
                            ..Default::default()
                        });
                    }
                    Ok::<_, StoreError>(())
                })
                .unwrap();
        }
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".redb"))
            .collect();
        files.sort();
        assert_eq!(files, ["stage-1.redb", "stage-3.redb"]);

        let addr = server.local_addr();
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(server.serve(shutdown.clone()));
        let mut log = EventLogClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        for p in [1u32, 3] {
            let head = log
                .head(HeadRequest { partition: p })
                .await
                .unwrap()
                .into_inner();
            assert_eq!((head.partition, head.partitions, head.replicas), (p, 4, 2));
            assert_eq!(head.next_offset, u64::from(p) + 1);
            let mut stream = log
                .subscribe(SubscribeRequest {
                    partition: p,
                    stop_at_head: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let mut orders = Vec::new();
            while let Some(batch) = stream.message().await.unwrap() {
                orders.extend(batch.entries.into_iter().map(|e| e.event.unwrap().order_id));
            }
            let expected: Vec<String> = (0..=p).map(|n| format!("p{p}-{n}")).collect();
            assert_eq!(orders, expected);
        }
        // Another replica's partition, and one the pipeline does not have.
        let elsewhere = log.head(HeadRequest { partition: 2 }).await.unwrap_err();
        assert_eq!(elsewhere.code(), Code::FailedPrecondition);
        assert!(
            elsewhere.message().contains("serves partition 1, 3 of 4"),
            "{}",
            elsewhere.message()
        );
        let none = log.head(HeadRequest { partition: 4 }).await.unwrap_err();
        assert_eq!(none.code(), Code::InvalidArgument, "{}", none.message());

        shutdown.cancel();
        serving.await.unwrap().unwrap();
        // Each store keeps its partition: opened again as the same replica, it serves them again.
        let again = StageServer::bind_partitions("stage", second_of_two(dir.path()))
            .await
            .unwrap();
        let heads: Vec<u64> = again
            .stores()
            .iter()
            .map(|s| s.outbox().next_offset())
            .collect();
        assert_eq!(heads, [2, 4]);
    }
}
