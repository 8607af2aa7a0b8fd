//! A stage's gRPC server: the stage's own service plus what every stage serves the same way —
//! `orderflow.v1.EventLog` over its outbox, `grpc.health.v1`, and reflection (v1 and v1alpha).
//!
//! [`StageServer::bind`] opens the store and binds the socket (so callers learn the address before
//! serving); [`StageServer::serve`] runs until the shutdown token is cancelled, then drains: health
//! turns NOT_SERVING, the listener stops accepting, `Subscribe` streams end, in-flight calls finish
//! within the grace period, and the stage's background tasks complete the batch they hold.

use std::{net::SocketAddr, time::Duration};

use orderflow_proto::v1::event_log_server::EventLogServer;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{service::Routes, transport::Server};
use tonic_health::ServingStatus;

use crate::{
    config::{ServerArgs, ensure_data_dir},
    eventlog::{EventLogService, run_retention},
    store::{Store, StoreError},
};

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

/// Fully-qualified names of the services every stage serves besides its own.
const EVENT_LOG_SERVICE: &str = "orderflow.v1.EventLog";
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
const REFLECTION_V1_SERVICE: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA_SERVICE: &str = "grpc.reflection.v1alpha.ServerReflection";

/// Starts one of a stage's background tasks, given the shutdown token it must honour.
type TaskStarter = Box<dyn FnOnce(CancellationToken) -> JoinHandle<()> + Send>;

/// A stage whose store is open and whose socket is bound, ready to serve.
pub struct StageServer {
    stage: &'static str,
    args: ServerArgs,
    listener: TcpListener,
    local_addr: SocketAddr,
    store: Store,
    service: Option<(Routes, &'static str)>,
    tasks: Vec<TaskStarter>,
}

impl StageServer {
    /// Opens `<data-dir>/<stage>.redb` (recovering from any crash) and binds `--listen`.
    pub async fn bind(stage: &'static str, args: ServerArgs) -> Result<Self, ServeError> {
        ensure_data_dir(&args.data_dir).map_err(ServeError::Config)?;
        let path = args.data_dir.join(format!("{stage}.redb"));
        let store = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Store::open(&path)).await?
        }
        .map_err(|source| ServeError::Store {
            path: path.display().to_string(),
            source,
        })?;
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
        Ok(StageServer {
            stage,
            args,
            listener,
            local_addr,
            store,
            service: None,
            tasks: Vec::new(),
        })
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

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves the stage's service plus the shared ones and runs its tasks until `shutdown`, then
    /// drains.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), ServeError> {
        let StageServer {
            stage,
            args,
            listener,
            local_addr,
            store,
            service,
            tasks,
        } = self;
        let (mut routes, service) = match service {
            Some((routes, name)) => (routes, name),
            None => (Routes::default(), ""),
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        for name in ["", service, EVENT_LOG_SERVICE] {
            health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        // Advertise exactly what this stage serves: the descriptor set holds every stage's services.
        let reflection = || {
            let builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(orderflow_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
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
            .add_service(EventLogServer::new(EventLogService::new(
                store.clone(),
                streams.clone(),
            )));
        let tasks: Vec<_> = tasks
            .into_iter()
            .map(|start| start(shutdown.clone()))
            .collect();
        let retention = tokio::spawn(run_retention(
            store.clone(),
            args.retention(),
            shutdown.clone(),
        ));

        tracing::info!(stage, addr = %local_addr, data_dir = %args.data_dir.display(), "serving");
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
        let server = Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_routes(routes)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), drain);
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
            retention.await
        };
        match tokio::time::timeout(args.shutdown_grace, finish).await {
            Ok(joined) => joined?,
            Err(_) => tracing::warn!(
                stage,
                "background tasks did not finish within the grace period"
            ),
        }
        tracing::info!(stage, "stopped");
        Ok(())
    }
}

/// The whole life of a stage binary once its configuration is parsed: bind, print
/// `<binary> listening on <addr>` on stdout (tests and scripts read it), serve until SIGINT/SIGTERM,
/// drain. Startup errors are printed and give exit code 1.
pub async fn run_main(
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
    println!("{binary} listening on {}", stage.local_addr());
    match stage.serve(shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{binary}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
