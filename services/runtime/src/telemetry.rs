//! Logs and traces of every orderflow process.
//!
//! # Logs
//! `tracing` to stderr, filtered by `RUST_LOG` (default `info`), as text or as one JSON object per
//! line (`--log-format json`). Every line written inside a span carries that span's OpenTelemetry
//! trace and span ids, so a log line leads to its trace in Jaeger. Lines of [`HELD_TARGET`] (the
//! notifier's `log` sink, one per notification) are held and written together by
//! [`write_held_lines`], one `write` per batch rather than per line.
//!
//! # Traces
//! OpenTelemetry through `tracing-opentelemetry`, exported with OTLP over gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. The standard
//! variables apply: `OTEL_SERVICE_NAME` (default `orderflow-<stage>`), `OTEL_TRACES_SAMPLER` /
//! `OTEL_TRACES_SAMPLER_ARG` (default parent-based always-on), `OTEL_BSP_*` for batching. Only spans
//! of orderflow's own code are exported, never those of its libraries. With no endpoint and no
//! `OTEL_TRACES_SAMPLER`, no order span is built at all ([`unsampled`]): nothing would read it, and
//! building one cost more than the order's work in the notifier. A sampler set without an endpoint
//! keeps the spans, for the trace ids in log lines.
//!
//! A process running several stages (`orderflow demo`, `orderflow up`) still shows four services in
//! Jaeger: spans carry `orderflow.stage`, and `StageRouter` exports each stage's spans under that
//! stage's service name.
//!
//! The W3C trace context of an order travels inside its events ([`inject`], [`set_parent`]), so each
//! stage's span for an order is a child of the previous stage's span: one trace per order. With a
//! parent-based sampler (the default), an order whose trace is not sampled costs no spans after the
//! one that decided it: the stages pass its context on untouched ([`OrderSpan`]). An order placed
//! on a `PlaceOrders` stream costs none at all: its root is decided before it is built
//! ([`OrderSpan::root`]), on the trace id the span then takes.

use std::{
    cell::Cell,
    collections::HashMap,
    future::Future,
    io::Write,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use opentelemetry::{
    KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{SpanId, SpanKind, TraceId, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{
        Config, IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, SdkTracerProvider,
        ShouldSample, SpanData, SpanExporter,
    },
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::filter_fn,
    fmt::{self, FormatEvent, FormatFields, MakeWriter, format::Writer, writer::EitherWriter},
    prelude::*,
    registry::LookupSpan,
};

/// Attribute naming the stage a span belongs to.
pub const STAGE_ATTRIBUTE: &str = "orderflow.stage";
/// The four stages, for per-stage service names.
const STAGES: [&str; 4] = ["receiver", "stock", "invoice", "notifier"];
/// Longest wait for the exporter to flush on shutdown: with no collector listening, the SDK's own
/// flush would hang for its export timeout.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);

/// Target of log lines that are held until [`write_held_lines`]: those the notifier's `log` sink
/// delivers notifications with.
pub const HELD_TARGET: &str = "orderflow::notification";

/// Lines of [`HELD_TARGET`] formatted and not yet written.
static HELD_LINES: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Writes the held lines of [`HELD_TARGET`] to stderr, in one `write` if the pipe takes it. Whoever
/// holds lines calls it before relying on them being out: the notifier before it records the
/// notifications they deliver.
pub fn write_held_lines() {
    let lines = match HELD_LINES.lock() {
        Ok(mut held) if !held.is_empty() => std::mem::take(&mut *held),
        _ => return,
    };
    let _ = std::io::stderr().lock().write_all(&lines);
}

/// The log writer: stderr, or the held lines for [`HELD_TARGET`].
struct LogWriter;

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = EitherWriter<std::io::Stderr, HeldLine>;

    fn make_writer(&'a self) -> Self::Writer {
        EitherWriter::A(std::io::stderr())
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        if meta.target() == HELD_TARGET {
            EitherWriter::B(HeldLine)
        } else {
            self.make_writer()
        }
    }
}

/// One formatted line of [`HELD_TARGET`], added to the held lines.
struct HeldLine;

impl Write for HeldLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match HELD_LINES.lock() {
            Ok(mut held) => held.extend_from_slice(buf),
            // Poisoned by a panic elsewhere: write the line itself rather than lose it.
            Err(_) => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// What a process needs to set up its logs and traces.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` when `OTEL_SERVICE_NAME` is unset, e.g. `orderflow-receiver`.
    pub service_name: String,
    /// Export each stage's spans under `orderflow-<stage>` (for a process running several stages).
    pub service_per_stage: bool,
    pub log_format: LogFormat,
    /// The log filter when `RUST_LOG` is unset.
    pub default_filter: String,
}

impl TelemetryConfig {
    /// One stage per process: `orderflow-<stage>`, text logs at `info`.
    pub fn stage(stage: &str, log_format: LogFormat) -> Self {
        TelemetryConfig {
            service_name: format!("orderflow-{stage}"),
            service_per_stage: false,
            log_format,
            default_filter: "info".into(),
        }
    }
}

/// The installed telemetry; [`Telemetry::shutdown`] flushes the exporter.
#[must_use = "call shutdown() before exiting, or buffered spans are lost"]
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

/// Installs the global subscriber and tracer provider. Must run inside a tokio runtime (the OTLP
/// channel is created on it). Calling it again in the same process keeps the first subscriber.
pub fn init(config: &TelemetryConfig) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    PARENT_DECIDES.store(sampler_follows_parent(), Ordering::Relaxed);
    // The sampler the provider builds from the same variables, to decide roots before they exist.
    let _ = ROOT_SAMPLER.set(Config::default().sampler);
    let (provider, exporting, export_error) = tracer_provider(config);
    SPANS_OFF.store(!exporting && !sampler_set(), Ordering::Relaxed);
    let tracer = provider.tracer("orderflow");
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&config.default_filter));
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_location(false)
        .with_filter(filter_fn(|meta| meta.target().starts_with("orderflow")));
    let logs = match config.log_format {
        LogFormat::Text => fmt::layer()
            .event_format(WithTraceIds(fmt::format()))
            .with_writer(LogWriter)
            // Colours only for a person at a terminal, not in files and log collectors.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => json_subscriber::fmt::layer()
            .with_writer(LogWriter)
            .with_opentelemetry_ids(true)
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(logs)
        .try_init()
        .is_ok();
    if let Some(error) = export_error {
        tracing::warn!(error = %error, "cannot export traces; continuing without");
    } else if exporting && installed {
        tracing::info!("exporting traces over OTLP");
    }
    Telemetry {
        provider,
        exporting,
    }
}

impl Telemetry {
    /// Flushes buffered spans, waiting at most a few seconds (an absent collector must not hold the
    /// process up).
    pub async fn shutdown(self) {
        write_held_lines();
        let provider = self.provider;
        let exporting = self.exporting;
        let flush =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_FLUSH));
        match tokio::time::timeout(SHUTDOWN_FLUSH + Duration::from_secs(1), flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) if exporting => tracing::warn!(error = %e, "trace flush failed"),
            Ok(_) => {}
            Err(_) => tracing::warn!("trace flush timed out; some spans were not exported"),
        }
    }
}

/// The OTLP endpoint from the standard variables, if one is set.
fn otlp_endpoint() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .filter_map(|name| std::env::var(name).ok())
    .find(|value| !value.trim().is_empty())
}

fn tracer_provider(config: &TelemetryConfig) -> (SdkTracerProvider, bool, Option<String>) {
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(config.service_name.clone());
    }
    let builder = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_id_generator(ChosenTraceIds::default());
    if otlp_endpoint().is_none() {
        return (builder.build(), false, None);
    }
    let exporter = || {
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
    };
    let built = if config.service_per_stage {
        STAGES
            .iter()
            .map(|stage| exporter().map(|e| (*stage, e)))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|stages| {
                exporter()
                    .map(|default| builder.with_batch_exporter(StageRouter { default, stages }))
            })
    } else {
        exporter().map(|e| builder.with_batch_exporter(e))
    };
    match built {
        Ok(builder) => (builder.build(), true, None),
        Err(e) => (
            SdkTracerProvider::builder().build(),
            false,
            Some(e.to_string()),
        ),
    }
}

/// Exports each stage's spans (by their [`STAGE_ATTRIBUTE`]) under the service `orderflow-<stage>`,
/// the rest under the process's own service name.
#[derive(Debug)]
struct StageRouter<E> {
    default: E,
    stages: Vec<(&'static str, E)>,
}

impl<E: SpanExporter> SpanExporter for StageRouter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut by_stage: Vec<Vec<SpanData>> = self.stages.iter().map(|_| Vec::new()).collect();
        let mut rest = Vec::new();
        for span in batch {
            let stage = span
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == STAGE_ATTRIBUTE)
                .and_then(|kv| {
                    let value = kv.value.as_str();
                    self.stages.iter().position(|(s, _)| *s == value)
                });
            match stage {
                Some(i) => by_stage[i].push(span),
                None => rest.push(span),
            }
        }
        let mut result = Ok(());
        for ((_, exporter), spans) in self.stages.iter().zip(by_stage) {
            if !spans.is_empty() {
                result = result.and(exporter.export(spans).await);
            }
        }
        if !rest.is_empty() {
            result = result.and(self.default.export(rest).await);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let mut result = self.default.shutdown_with_timeout(timeout);
        for (_, exporter) in &self.stages {
            result = result.and(exporter.shutdown_with_timeout(timeout));
        }
        result
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.default.set_resource(resource);
        for (stage, exporter) in &mut self.stages {
            let named = Resource::builder_empty()
                .with_attributes(
                    resource
                        .iter()
                        .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
                )
                .with_service_name(format!("orderflow-{stage}"))
                .build();
            exporter.set_resource(&named);
        }
    }
}

/// Whether a span's sampling follows its parent's: true with a `parentbased_*` sampler (the
/// default), set by [`init`]. Only then may a stage skip the spans of an unsampled order.
static PARENT_DECIDES: AtomicBool = AtomicBool::new(false);

/// Whether `OTEL_TRACES_SAMPLER` (unset: `parentbased_always_on`) lets the parent decide.
fn sampler_follows_parent() -> bool {
    std::env::var("OTEL_TRACES_SAMPLER")
        .map(|sampler| sampler.trim().is_empty() || sampler.trim().starts_with("parentbased_"))
        .unwrap_or(true)
}

/// Whether `OTEL_TRACES_SAMPLER` names a sampler.
fn sampler_set() -> bool {
    std::env::var("OTEL_TRACES_SAMPLER").is_ok_and(|sampler| !sampler.trim().is_empty())
}

/// Whether this process builds no order spans at all: it exports none (no OTLP endpoint) and no
/// sampler was asked for, so a span would be built only to be dropped. Set by [`init`].
static SPANS_OFF: AtomicBool = AtomicBool::new(false);

/// Whether no child span of the trace whose context `carrier` holds would be exported: this process
/// exports no spans ([`SPANS_OFF`]), or the sampler follows the parent and the `traceparent`
/// (`00-<trace id>-<span id>-<flags>`) has the sampled flag off.
pub fn unsampled(carrier: &HashMap<String, String>) -> bool {
    SPANS_OFF.load(Ordering::Relaxed)
        || (PARENT_DECIDES.load(Ordering::Relaxed) && sampled_flag(carrier) == Some(false))
}

/// Whether an order whose context `carrier` holds may go on without it: its trace is decided
/// unsampled (the `traceparent` says so) and no span of it is built here ([`unsampled`]), so a
/// process it goes to may place it as an unsampled order of its own ([`OrderSpan::unsampled`]).
pub fn decided_unsampled(carrier: &HashMap<String, String>) -> bool {
    sampled_flag(carrier) == Some(false) && unsampled(carrier)
}

/// The sampled flag of the `traceparent` (`00-<trace id>-<span id>-<flags>`) in `carrier`.
fn sampled_flag(carrier: &HashMap<String, String>) -> Option<bool> {
    carrier
        .get("traceparent")
        .and_then(|traceparent| traceparent.rsplit_once('-'))
        .and_then(|(_, flags)| u8::from_str_radix(flags, 16).ok())
        .map(|flags| flags & 1 == 1)
}

/// A stage's span for one order, and the trace context its events carry on. For an order whose
/// trace is not sampled no span is built at all (nothing of it would be exported, and building it
/// costs more than the work it would time): the span is [`tracing::Span::none`] and the context
/// passed on is the parent's, so the later stages skip theirs too.
#[derive(Debug)]
pub struct OrderSpan {
    span: tracing::Span,
    /// The parent's context, when no span was built.
    passed_on: Option<HashMap<String, String>>,
}

impl OrderSpan {
    /// `make()`'s span as a child of the span whose context `parent` holds — or none, when no
    /// child of that trace would be exported ([`unsampled`]), and `parent` is passed on as it came.
    pub fn child_of(
        parent: &HashMap<String, String>,
        make: impl FnOnce() -> tracing::Span,
    ) -> Self {
        if unsampled(parent) {
            return OrderSpan {
                span: tracing::Span::none(),
                passed_on: Some(parent.clone()),
            };
        }
        let span = make();
        set_parent(&span, parent);
        OrderSpan {
            span,
            passed_on: None,
        }
    }

    /// The trace context for the events that follow from this span ([`inject`]), or the parent's.
    pub fn context(&self) -> HashMap<String, String> {
        match &self.passed_on {
            Some(parent) => parent.clone(),
            None => inject(&self.span),
        }
    }

    /// [`OrderSpan::context`] for the span's last use: an unsampled order's context is passed on
    /// as it came, without a copy. The span ends here.
    pub fn into_context(self) -> HashMap<String, String> {
        match self.passed_on {
            Some(parent) => parent,
            None => inject(&self.span),
        }
    }

    pub fn span(&self) -> &tracing::Span {
        &self.span
    }
}

impl OrderSpan {
    /// The root span of an order that starts in this process: decided by the configured sampler
    /// before it is built, so that an order whose trace is not sampled costs no span here either.
    /// Such an order's context is a fresh `traceparent` with the sampled flag off, which the later
    /// stages pass on untouched. A sampled order's span is built at once on the trace id the
    /// decision was made on, so the provider's sampler, deciding again, agrees.
    pub fn root(make: impl FnOnce() -> tracing::Span) -> Self {
        if SPANS_OFF.load(Ordering::Relaxed) {
            return Self::root_sampled_by(&Sampler::AlwaysOff, make);
        }
        match ROOT_SAMPLER.get() {
            Some(sampler) => Self::root_sampled_by(sampler.as_ref(), make),
            // No telemetry installed: spans as `make` builds them.
            None => OrderSpan {
                span: make(),
                passed_on: None,
            },
        }
    }

    /// An order whose trace another process decided not to sample ([`decided_unsampled`]): no
    /// span, and a fresh context that says so.
    pub fn unsampled() -> Self {
        Self::root_sampled_by(&Sampler::AlwaysOff, tracing::Span::none)
    }

    /// The server span of a call whose request carries `headers`: a child of the caller's span
    /// when they hold a `traceparent` ([`OrderSpan::child_of`]), a root otherwise
    /// ([`OrderSpan::root`]); either way decided before it is built.
    pub fn of_call(headers: &http::HeaderMap, make: impl FnOnce() -> tracing::Span) -> Self {
        match context_from_headers(headers) {
            Some(parent) => Self::child_of(&parent, make),
            None => Self::root(make),
        }
    }

    /// [`OrderSpan::root`] with `sampler` deciding.
    fn root_sampled_by(sampler: &dyn ShouldSample, make: impl FnOnce() -> tracing::Span) -> Self {
        let ids = RandomIdGenerator::default();
        let trace_id = ids.new_trace_id();
        let decision = sampler
            .should_sample(None, trace_id, "order", &SpanKind::Server, &[], &[])
            .decision;
        if decision == SamplingDecision::Drop {
            let traceparent = format!("00-{trace_id}-{}-00", ids.new_span_id());
            return OrderSpan {
                span: tracing::Span::none(),
                passed_on: Some(HashMap::from([("traceparent".to_owned(), traceparent)])),
            };
        }
        CHOSEN_TRACE_ID.with(|chosen| chosen.set(Some(trace_id)));
        let span = make();
        // Started now, on this thread, where the chosen id waits for it.
        let _ = span.context();
        CHOSEN_TRACE_ID.with(|chosen| chosen.set(None));
        OrderSpan {
            span,
            passed_on: None,
        }
    }

    /// Runs `work` as this order's: inside its span, or, when it has none, with its context as
    /// what [`current_context`] gives (the current span being some other's, a stream's say).
    pub async fn run<F: Future>(&self, work: F) -> F::Output {
        use tracing::Instrument;
        match &self.passed_on {
            None => {
                UNSPANNED_ORDER
                    .scope(None, work.instrument(self.span.clone()))
                    .await
            }
            Some(context) => UNSPANNED_ORDER.scope(Some(context.clone()), work).await,
        }
    }
}

/// The trace context that events and calls about the order at hand carry: that of the current
/// span, or of the order [`OrderSpan::run`] runs without a span of its own.
pub fn current_context() -> HashMap<String, String> {
    UNSPANNED_ORDER
        .try_with(Clone::clone)
        .ok()
        .flatten()
        .unwrap_or_else(|| inject(&tracing::Span::current()))
}

/// The span of the order at hand: the current span, or none while [`OrderSpan::run`] runs an
/// order that has no span of its own (the current span is then another's, which must not take
/// the order's fields).
pub fn current_order_span() -> tracing::Span {
    match UNSPANNED_ORDER.try_with(Option::is_some) {
        Ok(true) => tracing::Span::none(),
        _ => tracing::Span::current(),
    }
}

tokio::task_local! {
    /// The context of an unsampled order [`OrderSpan::run`] runs; `None` inside a sampled order's
    /// span, which may run within an unsampled one's work (a call's, say).
    static UNSPANNED_ORDER: Option<HashMap<String, String>>;
}

/// The sampler of the tracer provider, as [`init`] read it from the environment.
static ROOT_SAMPLER: OnceLock<Box<dyn ShouldSample>> = OnceLock::new();

thread_local! {
    /// The trace id the next root span started on this thread takes ([`OrderSpan::root`]).
    static CHOSEN_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// Ids drawn at random like the SDK's, except a root order span's trace id, drawn before it was
/// built ([`OrderSpan::root`]).
#[derive(Debug, Default)]
struct ChosenTraceIds(RandomIdGenerator);

impl IdGenerator for ChosenTraceIds {
    fn new_trace_id(&self) -> TraceId {
        CHOSEN_TRACE_ID
            .with(Cell::take)
            .unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        self.0.new_span_id()
    }
}

impl std::ops::Deref for OrderSpan {
    type Target = tracing::Span;

    fn deref(&self) -> &tracing::Span {
        &self.span
    }
}

/// The span of one stage's work on one order: named `name` in Jaeger, a child of the span whose
/// context `parent` holds (the upstream event's), and never of whatever span is current — a batch or
/// subscription must not adopt order spans. Fields to record later: `outcome`,
/// `otel.status_description` (marks the span as an error), `invoice.number`. None for an unsampled
/// order ([`OrderSpan`]).
pub fn order_span(
    stage: &'static str,
    name: &'static str,
    order_id: &str,
    customer_id: &str,
    parent: &HashMap<String, String>,
) -> OrderSpan {
    OrderSpan::child_of(parent, || {
        tracing::info_span!(
            parent: None,
            "order",
            otel.name = name,
            otel.status_description = tracing::field::Empty,
            orderflow.stage = stage,
            order.id = order_id,
            customer.id = customer_id,
            outcome = tracing::field::Empty,
            invoice.number = tracing::field::Empty,
        )
    })
}

/// The W3C trace context (`traceparent`, `tracestate`) of `span`, to carry inside an event.
pub fn inject(span: &tracing::Span) -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut MapInjector(&mut carrier));
    carrier
}

/// Makes `span` a child of the span whose context `carrier` holds (from [`inject`]). A span with no
/// usable context stays a root. Call it right after creating the span.
pub fn set_parent(span: &tracing::Span, carrier: &HashMap<String, String>) {
    if carrier.is_empty() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&MapExtractor(carrier));
    let _ = span.set_parent(parent);
}

/// The trace context a request's headers carry (`traceparent`, and `tracestate` if any); `None`
/// without a readable `traceparent`.
fn context_from_headers(headers: &http::HeaderMap) -> Option<HashMap<String, String>> {
    let value = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(|value| (name.to_owned(), value.to_owned()))
    };
    let mut context = HashMap::from([value("traceparent")?]);
    context.extend(value("tracestate"));
    Some(context)
}

/// The trace id of `span`, when it has one (for tests and messages).
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

struct MapInjector<'a>(&'a mut HashMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct MapExtractor<'a>(&'a HashMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Text log lines with `trace_id=… span_id=…` of the current span in front of the fields.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &fmt::FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use opentelemetry::trace::TraceContextExt;
        let ids = ctx.lookup_current().and_then(|span| {
            tracing::dispatcher::get_default(|dispatch| {
                let context = tracing_opentelemetry::get_otel_context(&span.id(), dispatch)?;
                let otel_span = context.span();
                let span_context = otel_span.span_context();
                span_context
                    .is_valid()
                    .then(|| (span_context.trace_id(), span_context.span_id()))
            })
        });
        if let Some((trace_id, span_id)) = ids {
            write!(writer, "trace_id={trace_id} span_id={span_id} ")?;
        }
        self.0.format_event(ctx, writer, event)
    }
}

/// Installs plain logging only (for short-lived client commands): text on stderr, `RUST_LOG` or
/// `default`. Does nothing if a subscriber is already installed.
pub fn init_logging_with_default(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt::layer().with_writer(std::io::stderr))
        .try_init();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The subscriber and the tracer provider are process-wide, and shutting one down ends its
    /// spans' contexts: the checks that need them share one installation, so that they pass
    /// under `cargo test` (one process) as under `cargo nextest` (one process per test).
    #[tokio::test]
    async fn trace_context_travels_in_events() {
        let telemetry = init(&TelemetryConfig::stage("test", LogFormat::Text));
        with_nothing_to_export_no_order_span_is_built();
        context_round_trips_through_an_event_map();
        an_unsampled_order_gets_no_span_and_passes_its_context_on();
        a_root_is_decided_before_it_is_built_and_keeps_the_trace_id_decided_on();
        an_order_run_within_another_takes_its_own_context().await;
        telemetry.shutdown().await;
    }

    /// With no OTLP endpoint and no sampler asked for, no order span is built: a root's context
    /// says unsampled, and a caller's context is passed on as it came, sampled or not, for a
    /// later stage that exports. The checks after this one build spans, as with a sampler set.
    fn with_nothing_to_export_no_order_span_is_built() {
        assert_eq!(
            SPANS_OFF.load(Ordering::Relaxed),
            otlp_endpoint().is_none() && !sampler_set()
        );
        SPANS_OFF.store(true, Ordering::Relaxed);
        let make = || tracing::info_span!(target: "orderflow_test", parent: None, "order");
        let root = OrderSpan::root(make);
        assert!(root.is_none());
        assert!(root.context()["traceparent"].ends_with("-00"));
        let sampled = HashMap::from([(
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        )]);
        let child = OrderSpan::child_of(&sampled, make);
        assert!(child.is_none());
        assert_eq!(child.context(), sampled);
        // Only a context that says unsampled goes on without itself.
        assert!(decided_unsampled(&root.context()));
        assert!(!decided_unsampled(&sampled));
        assert!(!decided_unsampled(&HashMap::new()));
        SPANS_OFF.store(false, Ordering::Relaxed);
    }

    /// A call whose trace is not sampled runs with its context passed on; a sampled order run
    /// within it (a stream's, say) has its own span and context, not the call's.
    async fn an_order_run_within_another_takes_its_own_context() {
        let carrier = |flags: &str| {
            HashMap::from([(
                "traceparent".to_owned(),
                format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}"),
            )])
        };
        let make = || tracing::info_span!(target: "orderflow_test", parent: None, "order");
        let call = OrderSpan::child_of(&carrier("00"), make);
        let order = OrderSpan::child_of(&carrier("01"), make);
        let own = order.context();
        let (in_call, in_order, order_span) = call
            .run(async {
                let in_call = (current_context(), current_order_span().is_none());
                let in_order = order
                    .run(async { (current_context(), current_order_span().is_none()) })
                    .await;
                (in_call, in_order.0, in_order.1)
            })
            .await;
        assert_eq!(in_call, (carrier("00"), true));
        assert_eq!(in_order, own);
        assert!(!order_span, "the order's own span is current");
    }

    #[test]
    fn a_requests_trace_context_is_read_from_its_headers() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(context_from_headers(&headers), None);
        headers.insert("tracestate", "k=v".parse().unwrap());
        assert_eq!(context_from_headers(&headers), None, "no traceparent");
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
                .parse()
                .unwrap(),
        );
        let context = context_from_headers(&headers).unwrap();
        assert_eq!(
            context["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        );
        assert_eq!(context["tracestate"], "k=v");
    }

    fn context_round_trips_through_an_event_map() {
        let parent = tracing::info_span!(target: "orderflow_test", "parent");
        let carrier = inject(&parent);
        assert!(carrier.contains_key("traceparent"), "{carrier:?}");
        let child = tracing::info_span!(target: "orderflow_test", parent: None, "child");
        set_parent(&child, &carrier);
        assert_eq!(trace_id(&child), trace_id(&parent));
        let other = tracing::info_span!(target: "orderflow_test", parent: None, "other");
        assert_ne!(trace_id(&other), trace_id(&parent));
    }

    fn an_unsampled_order_gets_no_span_and_passes_its_context_on() {
        let carrier = |flags: &str| {
            HashMap::from([(
                "traceparent".to_owned(),
                format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}"),
            )])
        };
        let make = || tracing::info_span!(target: "orderflow_test", parent: None, "child");
        // The default sampler follows the parent.
        assert!(unsampled(&carrier("00")));
        assert!(!unsampled(&carrier("01")));
        assert!(!unsampled(&HashMap::new()));
        assert!(decided_unsampled(&carrier("00")));
        assert!(!decided_unsampled(&carrier("01")));
        let forwarded = OrderSpan::unsampled();
        assert!(forwarded.is_none());
        assert!(decided_unsampled(&forwarded.context()));
        assert_ne!(forwarded.context(), carrier("00"), "a context of its own");
        let skipped = OrderSpan::child_of(&carrier("00"), make);
        assert!(skipped.is_none());
        assert_eq!(skipped.context(), carrier("00"));
        let sampled = OrderSpan::child_of(&carrier("01"), make);
        assert!(!sampled.is_none());
        assert_eq!(
            trace_id(&sampled).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_ne!(sampled.context(), carrier("01"), "the child's own span id");
        // A sampler that ignores the parent must build every span.
        PARENT_DECIDES.store(false, Ordering::Relaxed);
        assert!(!OrderSpan::child_of(&carrier("00"), make).is_none());
        assert!(!decided_unsampled(&carrier("00")));
        PARENT_DECIDES.store(true, Ordering::Relaxed);
    }

    fn a_root_is_decided_before_it_is_built_and_keeps_the_trace_id_decided_on() {
        use opentelemetry::trace::TraceContextExt;
        use opentelemetry_sdk::trace::Sampler;
        let make = || tracing::info_span!(target: "orderflow_test", parent: None, "root");
        // The provider's ids: a root started where a trace id was chosen takes it.
        let chosen = TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128);
        CHOSEN_TRACE_ID.with(|c| c.set(Some(chosen)));
        let span = make();
        let _ = span.context();
        assert_eq!(trace_id(&span), Some(chosen.to_string()));
        assert_eq!(
            CHOSEN_TRACE_ID.with(Cell::get),
            None,
            "the chosen id was used once"
        );
        // The default sampler (parent-based, always on) builds every root.
        assert!(!OrderSpan::root(make).is_none());
        // Dropped: no span, and a context that tells the later stages so.
        let dropped = OrderSpan::root_sampled_by(&Sampler::AlwaysOff, make);
        assert!(dropped.is_none());
        let context = dropped.context();
        assert!(unsampled(&context), "{context:?}");
        let traceparent = &context["traceparent"];
        assert_eq!(traceparent.len(), 55, "{traceparent}");
        // At a ratio, every root built is one the ratio keeps on its own trace id: the decision
        // was made on the id the span got (an id drawn anew would be dropped half the time).
        let ratio = Sampler::TraceIdRatioBased(0.5);
        let mut built = 0;
        for _ in 0..64 {
            let root = OrderSpan::root_sampled_by(&ratio, make);
            if root.is_none() {
                assert!(unsampled(&root.context()));
                continue;
            }
            built += 1;
            let id = root.span().context().span().span_context().trace_id();
            let again = ratio.should_sample(None, id, "root", &SpanKind::Server, &[], &[]);
            assert_ne!(
                again.decision,
                SamplingDecision::Drop,
                "built on another id"
            );
        }
        assert!((1..64).contains(&built), "{built} of 64 built at 50 %");
    }
}
