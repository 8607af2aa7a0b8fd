//! Health, both ends:
//! - [`HealthService`]: `grpc.health.v1` as every stage serves it — the statuses kept by
//!   tonic-health's reporter, decoded with orderflow's strict codec so that a malformed request is
//!   `INVALID_ARGUMENT` like on every other service (tonic-health's own codec says `INTERNAL`).
//! - `orderflow-<stage> health`: asks a running stage — the one these flags and variables
//!   configure — whether it is SERVING. Container images use it as their `HEALTHCHECK`, since they
//!   ship no probe binary.

use std::{net::IpAddr, pin::Pin, process::ExitCode, time::Duration};

use futures::{Stream, StreamExt};
use orderflow_proto::health as strict;
use tonic::{Request, Response, Status};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    health_server::Health as _,
};

use crate::config::ServerArgs;

/// `grpc.health.v1.Health` over the statuses of a [`tonic_health::server::HealthReporter`].
pub struct HealthService(tonic_health::server::HealthService);

impl HealthService {
    /// The service answering what `reporter` is told.
    pub fn new(reporter: tonic_health::server::HealthReporter) -> Self {
        HealthService(tonic_health::server::HealthService::from_health_reporter(
            reporter,
        ))
    }

    /// The tonic server for it.
    pub fn server(self) -> strict::health_server::HealthServer<Self> {
        strict::health_server::HealthServer::new(self)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<strict::HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl strict::health_server::Health for HealthService {
    async fn check(
        &self,
        request: Request<strict::HealthCheckRequest>,
    ) -> Result<Response<strict::HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        let answer = self
            .0
            .check(Request::new(HealthCheckRequest { service }))
            .await?;
        Ok(Response::new(strict::HealthCheckResponse {
            status: answer.into_inner().status,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<strict::HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let service = request.into_inner().service;
        let answers = self
            .0
            .watch(Request::new(HealthCheckRequest { service }))
            .await?;
        let stream = answers
            .into_inner()
            .map(|answer| answer.map(|a| strict::HealthCheckResponse { status: a.status }));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Checks the stage's overall health on its `--listen` port (loopback when it listens on all
/// addresses), over TLS when it serves TLS: then `--tls-ca` must trust its certificate, which must
/// name `localhost`. Prints the answer; exit code 0 for SERVING, 1 otherwise.
pub async fn check(binary: &str, args: &ServerArgs, timeout: Duration) -> ExitCode {
    match tokio::time::timeout(timeout, ask(args)).await {
        Ok(Ok(ServingStatus::Serving)) => {
            println!("{binary}: SERVING");
            ExitCode::SUCCESS
        }
        Ok(Ok(status)) => {
            println!("{binary}: {}", status.as_str_name());
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            println!("{binary}: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            println!(
                "{binary}: no answer within {}",
                humantime::format_duration(timeout)
            );
            ExitCode::FAILURE
        }
    }
}

async fn ask(args: &ServerArgs) -> Result<ServingStatus, String> {
    let ip = match args.listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1]),
        ip => ip,
    };
    let port = args.listen.port();
    let url = if args.tls_cert.is_some() {
        format!("https://localhost:{port}")
    } else {
        format!("http://{}", std::net::SocketAddr::new(ip, port))
    };
    let endpoint = crate::tls::endpoint(&url, &args.client_tls()?)?;
    let channel = if args.tls_cert.is_some() {
        // Connect to the address it listens on, but check the certificate against `localhost`.
        let connector = tower::service_fn(move |_: http::Uri| async move {
            tokio::net::TcpStream::connect((ip, port))
                .await
                .map(hyper_util::rt::TokioIo::new)
        });
        endpoint.connect_with_connector(connector).await
    } else {
        endpoint.connect().await
    }
    .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|status| {
            format!(
                "health check failed: {:?} {}",
                status.code(),
                status.message()
            )
        })?;
    Ok(response.into_inner().status())
}
