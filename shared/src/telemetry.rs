//! Logs and traces for both binaries: `tracing` events on stderr (human-readable or JSON lines),
//! and, when an OTLP endpoint is configured, spans exported over OTLP/HTTP so that one trace
//! follows a request from the gateway into the provider.
//!
//! The W3C trace context crosses the mesh inside the generate request
//! ([`crate::protocol::TraceContext`]): [`current_context`] captures it on the gateway and
//! [`set_parent`] attaches the provider's span to it.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::protocol::TraceContext;

/// How log lines are written on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// What [`init`] needs.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` of the exported spans, e.g. `proofmesh-gateway`.
    pub service_name: &'static str,
    /// Filter used when `RUST_LOG` is unset.
    pub default_filter: &'static str,
    /// Log line format.
    pub log_format: LogFormat,
    /// OTLP/HTTP base URL (`…/v1/traces` is appended); `None` exports nothing.
    pub otlp_endpoint: Option<String>,
    /// Extra headers for the OTLP exporter, as `name=value` (e.g. an API key).
    pub otlp_headers: Vec<String>,
}

/// Telemetry that could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The OTLP exporter rejected its configuration.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    /// An OTLP header is not `name=value`.
    #[error("OTLP header {0:?} is not name=value")]
    Header(String),
    /// A global subscriber was already installed.
    #[error("logging already initialised: {0}")]
    AlreadySet(String),
}

/// Keeps the span exporter alive; [`Telemetry::shutdown`] flushes it.
#[derive(Debug)]
#[must_use = "dropping the guard does not flush spans; call shutdown() before exiting"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces failed");
        }
    }
}

/// Installs the global subscriber: the stderr log layer and, with an endpoint, the OTLP layer.
/// Must run inside a Tokio runtime when an endpoint is set (the exporter sends from it).
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(config.default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let json = config.log_format == LogFormat::Json;
    let text_layer = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
    });
    let json_layer = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    // An empty endpoint (e.g. `PROOFMESH_OTLP_ENDPOINT=` from a compose file) means none.
    let endpoint = config
        .otlp_endpoint
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty());
    let provider = match endpoint {
        Some(endpoint) => Some(tracer_provider(config, endpoint)?),
        None => None,
    };
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(config.service_name)));
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    tracing_subscriber::registry()
        .with(filter)
        .with(text_layer)
        .with(json_layer)
        .with(otel_layer)
        .try_init()
        .map_err(|e| TelemetryError::AlreadySet(e.to_string()))?;
    if let Some(endpoint) = endpoint {
        tracing::info!(%endpoint, "exporting traces over OTLP/HTTP");
    }
    Ok(Telemetry { provider })
}

fn tracer_provider(
    config: &TelemetryConfig,
    endpoint: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let mut headers = HashMap::new();
    for header in &config.otlp_headers {
        let (name, value) = header
            .split_once('=')
            .ok_or_else(|| TelemetryError::Header(crate::config::mask_header(header)))?;
        headers.insert(name.trim().to_owned(), value.trim().to_owned());
    }
    let traces_url = if endpoint.ends_with("/v1/traces") {
        endpoint.to_owned()
    } else {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(export_client::TokioHttpClient::new()?)
        .with_endpoint(traces_url)
        .with_headers(headers)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The trace context of the current span, to send along with a mesh request; `None` when
/// traces are not exported.
pub fn current_context() -> Option<TraceContext> {
    let context = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    let traceparent = carrier.remove("traceparent")?;
    Some(TraceContext {
        traceparent,
        tracestate: carrier.remove("tracestate").filter(|s| !s.is_empty()),
    })
}

/// Makes `span` a child of the remote span `context` (from a mesh request). Malformed contexts
/// are ignored: tracing must never fail a request.
pub fn set_parent(span: &tracing::Span, context: &TraceContext) {
    let mut carrier = HashMap::new();
    carrier.insert("traceparent".to_owned(), context.traceparent.clone());
    if let Some(state) = &context.tracestate {
        carrier.insert("tracestate".to_owned(), state.clone());
    }
    let parent = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
}

/// Makes `span` a child of the W3C `traceparent`/`tracestate` headers of an HTTP request, when
/// present, so a client's trace continues through the gateway.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    let Some(traceparent) = headers.get("traceparent").and_then(|v| v.to_str().ok()) else {
        return;
    };
    let context = TraceContext {
        traceparent: traceparent.to_owned(),
        tracestate: headers
            .get("tracestate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    if context.is_valid() {
        set_parent(span, &context);
    }
}

mod export_client {
    //! The OTLP exporter's HTTP client. The SDK's batch processor exports from its own thread
    //! with a plain `block_on`, where an async client finds no Tokio reactor; this client runs
    //! each export on the Tokio runtime captured at start and awaits the result.

    use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};

    use super::TelemetryError;

    #[derive(Debug)]
    pub(super) struct TokioHttpClient {
        client: reqwest::Client,
        runtime: tokio::runtime::Handle,
    }

    impl TokioHttpClient {
        pub(super) fn new() -> Result<Self, TelemetryError> {
            let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                TelemetryError::Exporter("OTLP export needs a Tokio runtime".into())
            })?;
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            Ok(Self { client, runtime })
        }
    }

    #[async_trait::async_trait]
    impl HttpClient for TokioHttpClient {
        async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
            let client = self.client.clone();
            let (parts, body) = request.into_parts();
            let task = self.runtime.spawn(async move {
                let response = client
                    .request(parts.method, parts.uri.to_string())
                    .headers(parts.headers)
                    .body(body)
                    .send()
                    .await?;
                let status = response.status();
                let headers = response.headers().clone();
                let body = response.bytes().await?;
                Ok::<_, reqwest::Error>((status, headers, body))
            });
            let (status, headers, body) = task.await??;
            let mut response = Response::builder().status(status);
            if let Some(h) = response.headers_mut() {
                *h = headers;
            }
            Ok(response.body(body)?)
        }
    }
}
