//! The HTTP/JSON door of the receiver (`--http-listen`), over the same functions as the gRPC service:
//!
//! - `POST /v1/orders` with `{"customer_id": "alice", "lines": [{"sku": "KB-01", "quantity": 2}],
//!   "idempotency_key": "…"}` (or an `Idempotency-Key` header) → `201 Created` (`200 OK` for an
//!   idempotent retry) with `{"order_id", "status", "offset", "replayed"}`;
//! - `GET /v1/orders/{id}` → `200 OK` with the order and its progress.
//!
//! Errors carry `{"error": {"code", "message", "field_violations"?}}` with the HTTP status of the
//! gRPC code: INVALID_ARGUMENT 400, NOT_FOUND 404, ALREADY_EXISTS 409, RESOURCE_EXHAUSTED 429 (with
//! `Retry-After`; 507 when the data volume is below `--min-free-space`), UNAVAILABLE 503 (with
//! `Retry-After` when the store cannot commit), anything else 500. A `traceparent` header is honoured like the
//! gRPC metadata.
//!
//! The door is open to the internet, so it bounds what a client can hold: request headers must
//! arrive within [`HEADER_READ_TIMEOUT`] (an idle keep-alive connection is closed after as long),
//! a body within [`BODY_TIMEOUT`] and at most [`orderflow_runtime::MAX_REQUEST_BYTES`], a whole
//! request within [`REQUEST_TIMEOUT`], and at most `--http-max-connections` connections are served
//! at once: further ones wait in the kernel's accept queue, so slow or half-open clients can never
//! take the file descriptors the gRPC server and the store need.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Path, State, rejection::JsonRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use axum_server::accept::NoDelayAcceptor;
use orderflow_proto::v1::{
    GetOrderRequest, LineRejection, Money, Order, OrderLine, OrderStatus, PlaceOrderRequest,
};
use orderflow_runtime::{ServerIdentity, telemetry};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, PollSemaphore};
use tonic::{Code, Status};
use tonic_types::StatusExt;
use tower::Service;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};

use crate::{Receiver, STAGE};

/// How long a client has to send a request's headers, and how long an idle keep-alive connection
/// stays open.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send a request's body once its headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take in all; longer: 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once unless `--http-max-connections` says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// A bound, not yet serving, HTTP door.
pub(crate) struct Door {
    listener: std::net::TcpListener,
    local_addr: SocketAddr,
    tls: Option<ServerIdentity>,
    receiver: Arc<Receiver>,
    max_connections: usize,
}

impl Door {
    pub(crate) async fn bind(
        addr: SocketAddr,
        tls: Option<ServerIdentity>,
        receiver: Arc<Receiver>,
        max_connections: usize,
    ) -> Result<Door, String> {
        let refuse = |e: std::io::Error| {
            format!("cannot listen on {addr} (--http-listen, ORDERFLOW_HTTP_LISTEN): {e}")
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .and_then(|l| l.into_std())
            .map_err(refuse)?;
        let local_addr = listener.local_addr().map_err(refuse)?;
        Ok(Door {
            listener,
            local_addr,
            tls,
            receiver,
            max_connections: max_connections.max(1),
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown`, then lets requests in flight finish within `grace`.
    pub(crate) async fn serve(self, shutdown: CancellationToken, grace: Duration) {
        let handle = axum_server::Handle::new();
        let stopper = handle.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            stopper.graceful_shutdown(Some(grace));
        });
        let app = ConnectionLimit::new(
            router(self.receiver).into_make_service(),
            self.max_connections,
        );
        // Nagle off, as on the gRPC port: an answer is never held back for an acknowledgement.
        let served = match self.tls.map(|identity| identity.rustls_config()) {
            Some(Ok(config)) => {
                let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(
                    axum_server::tls_rustls::RustlsConfig::from_config(config),
                )
                .acceptor(NoDelayAcceptor::new());
                let mut server = axum_server::from_tcp(self.listener).acceptor(acceptor);
                bound_connections(server.http_builder());
                server.handle(handle).serve(app).await
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "HTTP door not started");
                return;
            }
            None => {
                let mut server =
                    axum_server::from_tcp(self.listener).acceptor(NoDelayAcceptor::new());
                bound_connections(server.http_builder());
                server.handle(handle).serve(app).await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP door failed");
        }
    }
}

/// The time limits of one connection: headers (and idle keep-alive) for HTTP/1, and pings that
/// close a dead HTTP/2 peer.
fn bound_connections(
    builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
) {
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(HEADER_READ_TIMEOUT)
        .keep_alive_timeout(HEADER_READ_TIMEOUT);
}

/// Serves at most `max` connections at once. The server asks its connection maker to be ready
/// before it makes the service of the next accepted connection; this one is ready only with a
/// permit in hand, which the connection's service keeps until the connection closes. While every
/// permit is taken the accept loop waits, and new connections wait in the kernel's queue instead
/// of taking file descriptors. (A `tower` concurrency limit counts requests, which a client that
/// never finishes its headers does not make.)
#[derive(Clone)]
struct ConnectionLimit<M> {
    make: M,
    permits: PollSemaphore,
    permit: Option<Arc<OwnedSemaphorePermit>>,
}

impl<M> ConnectionLimit<M> {
    fn new(make: M, max: usize) -> Self {
        ConnectionLimit {
            make,
            permits: PollSemaphore::new(Arc::new(Semaphore::new(max))),
            permit: None,
        }
    }
}

impl<M, T> Service<T> for ConnectionLimit<M>
where
    M: Service<T>,
    M::Future: Send + 'static,
{
    type Response = Limited<M::Response>;
    type Error = M::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, M::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), M::Error>> {
        if self.permit.is_none() {
            match self.permits.poll_acquire(cx) {
                Poll::Ready(Some(permit)) => self.permit = Some(Arc::new(permit)),
                // The semaphore is never closed; should it be, serve without a limit.
                Poll::Ready(None) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
        self.make.poll_ready(cx)
    }

    fn call(&mut self, target: T) -> Self::Future {
        let permit = self.permit.take();
        let made = self.make.call(target);
        Box::pin(async move {
            Ok(Limited {
                service: made.await?,
                _permit: permit,
            })
        })
    }
}

/// One connection's service, holding its place among the connections served.
#[derive(Clone)]
struct Limited<S> {
    service: S,
    _permit: Option<Arc<OwnedSemaphorePermit>>,
}

impl<S: Service<R>, R> Service<R> for Limited<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.service.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> S::Future {
        self.service.call(request)
    }
}

fn router(receiver: Arc<Receiver>) -> Router {
    Router::new()
        .route("/v1/orders", post(post_order))
        .route("/v1/orders/{id}", get(get_order))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "no such resource: try POST /v1/orders or GET /v1/orders/{id}",
            )
        })
        .with_state(receiver)
        .layer(DefaultBodyLimit::max(orderflow_runtime::MAX_REQUEST_BYTES))
        .layer(RequestBodyTimeoutLayer::new(BODY_TIMEOUT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaceOrderBody {
    customer_id: String,
    lines: Vec<LineBody>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineBody {
    sku: String,
    quantity: u32,
}

/// A server span for an HTTP call, child of the caller's `traceparent` if any, decided before it
/// is built as a gRPC call's is: a call whose trace is not sampled has none.
fn http_span(name: &'static str, headers: &HeaderMap) -> telemetry::OrderSpan {
    let make = || {
        tracing::info_span!(
            "http",
            otel.name = name,
            otel.kind = "server",
            orderflow.stage = STAGE,
            order.id = tracing::field::Empty,
            customer.id = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
        )
    };
    telemetry::OrderSpan::of_call(headers, make)
}

async fn post_order(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Result<Json<PlaceOrderBody>, JsonRejection>,
) -> Response {
    let span = http_span("POST /v1/orders", &headers);
    let response = span
        .run(async move {
            let Json(body) = body.map_err(|rejection| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    rejection.body_text(),
                )
            })?;
            let header_key = headers
                .get("idempotency-key")
                .map(|v| {
                    v.to_str().map(str::to_owned).map_err(|_| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "INVALID_ARGUMENT",
                            "the Idempotency-Key header must be visible ASCII",
                        )
                    })
                })
                .transpose()?;
            let request = PlaceOrderRequest {
                customer_id: body.customer_id,
                lines: body
                    .lines
                    .into_iter()
                    .map(|l| OrderLine {
                        sku: l.sku,
                        quantity: l.quantity,
                    })
                    .collect(),
                idempotency_key: body.idempotency_key.or(header_key).unwrap_or_default(),
            };
            let placed = crate::place_order::place_order(&receiver, request, None).await?;
            let code = if placed.replayed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            let location = HeaderValue::from_str(&format!("/v1/orders/{}", placed.order_id)).ok();
            let mut response = (
                code,
                Json(json!({
                    "order_id": placed.order_id,
                    "status": status_name(placed.status()),
                    "offset": placed.offset,
                    "replayed": placed.replayed,
                })),
            )
                .into_response();
            if let Some(location) = location {
                response.headers_mut().insert(header::LOCATION, location);
            }
            Ok::<_, ApiError>(response)
        })
        .await
        .unwrap_or_else(IntoResponse::into_response);
    span.record("http.response.status_code", response.status().as_u16());
    response
}

async fn get_order(
    State(receiver): State<Arc<Receiver>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let span = http_span("GET /v1/orders/{id}", &headers);
    span.record("order.id", id.as_str());
    let response = span
        .run(async move {
            let found =
                crate::get_order::get_order(&receiver, GetOrderRequest { order_id: id }, None)
                    .await?;
            let order = found.order.unwrap_or_default();
            Ok::<_, ApiError>(Json(order_json(&order)).into_response())
        })
        .await
        .unwrap_or_else(IntoResponse::into_response);
    span.record("http.response.status_code", response.status().as_u16());
    response
}

/// `ORDER_STATUS_INVOICED` → `INVOICED`.
fn status_name(status: OrderStatus) -> &'static str {
    status
        .as_str_name()
        .strip_prefix("ORDER_STATUS_")
        .unwrap_or("UNSPECIFIED")
}

fn timestamp(ts: Option<&prost_types::Timestamp>) -> Value {
    ts.and_then(|ts| std::time::SystemTime::try_from(*ts).ok())
        .map_or(Value::Null, |t| {
            Value::String(humantime::format_rfc3339_millis(t).to_string())
        })
}

fn money(m: Option<&Money>) -> Value {
    m.map_or(Value::Null, |m| {
        json!({ "amount_minor": m.amount_minor, "currency": m.currency, "display": m.to_string() })
    })
}

fn rejection(r: &LineRejection) -> Value {
    json!({
        "sku": r.sku,
        "requested": r.requested,
        "available": r.available,
        "reason": r.reason().as_str_name().strip_prefix("REJECTION_REASON_").unwrap_or("UNSPECIFIED"),
    })
}

/// The order as JSON: the gRPC `Order`'s fields with snake_case names, statuses as short names,
/// times as RFC 3339 and money as minor units plus currency (the HTTP door's and `orderflow get
/// --json`'s format).
pub fn order_json(order: &Order) -> Value {
    json!({
        "order_id": order.order_id,
        "customer_id": order.customer_id,
        "lines": order.lines.iter().map(|l| json!({"sku": l.sku, "quantity": l.quantity})).collect::<Vec<_>>(),
        "placed_at": timestamp(order.placed_at.as_ref()),
        "status": status_name(order.status()),
        "terminal": order.terminal,
        "offset": order.offset,
        "transitions": order.transitions.iter().map(|t| json!({
            "status": status_name(t.status()),
            "at": timestamp(t.at.as_ref()),
            "stage": t.stage,
        })).collect::<Vec<_>>(),
        "invoice": order.invoice.as_ref().map_or(Value::Null, |i| json!({
            "number": i.number,
            "total": money(i.total.as_ref()),
            "tax": money(i.tax.as_ref()),
            "payment_attempts": i.payment_attempts,
        })),
        "rejections": order.rejections.iter().map(rejection).collect::<Vec<_>>(),
        "failure_reason": (!order.failure_reason.is_empty()).then_some(&order.failure_reason),
        "stock_released_at": timestamp(order.stock_released_at.as_ref()),
    })
}

/// An error answer: HTTP status, gRPC-style code name, message, and details when there are some.
struct ApiError {
    status: StatusCode,
    body: Value,
    retry_after: Option<Duration>,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: json!({ "error": { "code": code, "message": message.into() } }),
            retry_after: None,
        }
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        let http = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::ResourceExhausted
                if status
                    .get_details_error_info()
                    .is_some_and(|info| info.reason == crate::place_order::VOLUME_LOW_REASON) =>
            {
                StatusCode::INSUFFICIENT_STORAGE
            }
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut error = ApiError::new(http, &code_name(status.code()), status.message());
        if let Some(bad) = status.get_details_bad_request() {
            let violations: Vec<_> = bad
                .field_violations
                .iter()
                .map(|v| json!({ "field": v.field, "description": v.description }))
                .collect();
            error.body["error"]["field_violations"] = Value::Array(violations);
        }
        // What became of a refused order (`NOT_STORED`, `MAYBE_STORED`, `DATA_VOLUME_LOW`).
        if let Some(info) = status.get_details_error_info() {
            error.body["error"]["reason"] = Value::String(info.reason);
        }
        error.retry_after = status
            .get_details_retry_info()
            .and_then(|info| info.retry_delay);
        error
    }
}

/// `InvalidArgument` → `INVALID_ARGUMENT`.
/// A gRPC code's name as the specification spells it: `INVALID_ARGUMENT`.
pub(crate) fn code_name(code: Code) -> String {
    screaming(&format!("{code:?}"))
}

fn screaming(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(after) = self.retry_after {
            let seconds = after.as_secs().max(1).to_string();
            if let Ok(value) = HeaderValue::from_str(&seconds) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_http() {
        let cases = [
            (Status::invalid_argument("x"), 400, "INVALID_ARGUMENT"),
            (Status::not_found("x"), 404, "NOT_FOUND"),
            (Status::already_exists("x"), 409, "ALREADY_EXISTS"),
            (Status::resource_exhausted("x"), 429, "RESOURCE_EXHAUSTED"),
            (Status::unavailable("x"), 503, "UNAVAILABLE"),
            (Status::internal("x"), 500, "INTERNAL"),
        ];
        for (status, http, code) in cases {
            let error = ApiError::from(status);
            assert_eq!(error.status.as_u16(), http);
            assert_eq!(error.body["error"]["code"], code);
        }
    }
}
