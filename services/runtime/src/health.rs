//! `orderflow-<stage> health`: asks a running stage — the one these flags and variables configure —
//! whether it is SERVING. Container images use it as their `HEALTHCHECK`, since they ship no probe
//! binary.

use std::{net::IpAddr, process::ExitCode, time::Duration};

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::config::ServerArgs;

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
