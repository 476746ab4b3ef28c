//! The `tracing` layer that renders each event as one JSON line (see [`super`] for the shape) and hands it to
//! stdout and to the Kafka shipper; the shipper never sees rdkafka's lines or the log pipeline's own.

use std::{collections::BTreeMap, fmt, io::Write};

use serde_json::{Map, Value};
use tracing::{Event, Subscriber, field::Field, span};
use tracing_subscriber::{Layer, layer::Context, registry::LookupSpan};

use super::{SELF_TARGET, kafka::Shipper};

/// The `tracing` layer that renders JSON lines and hands them to stdout and the shipper.
pub(super) struct JsonLayer {
    pub(super) service: String,
    pub(super) instance: String,
    /// The stdout writer thread's handle, when `log.stdout` is on.
    pub(super) stdout: Option<tracing_appender::non_blocking::NonBlocking>,
    pub(super) shipper: Option<Shipper>,
}

/// Fields recorded on a span, kept in its extensions.
#[derive(Default)]
struct SpanFields(Map<String, Value>);

struct Visitor<'a>(&'a mut Map<String, Value>);

impl tracing::field::Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut chain = value.to_string();
        let mut src = value.source();
        while let Some(s) = src {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            src = s.source();
        }
        self.0.insert(field.name().to_owned(), Value::String(chain));
    }
}

impl<S> Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut fields = SpanFields::default();
        attrs.record(&mut Visitor(&mut fields.0));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<SpanFields>()
        {
            values.record(&mut Visitor(&mut fields.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = Map::new();
        event.record(&mut Visitor(&mut fields));
        let message = fields
            .remove("message")
            .unwrap_or(Value::String(String::new()));
        // Records of the `log` crate (librdkafka's, through rdkafka) arrive with target `log` and their own
        // target in `log.target`: that one is the line's target, and the bridge's bookkeeping is dropped.
        let target = if meta.target() == "log" {
            for k in ["log.file", "log.line", "log.module_path"] {
                fields.remove(k);
            }
            match fields.remove("log.target") {
                Some(Value::String(t)) => t,
                _ => "log".to_owned(),
            }
        } else {
            meta.target().to_owned()
        };
        let mut line = BTreeMap::new();
        // A trace id the event names itself (the call log, logged after its request's span closed) is the
        // line's; otherwise the nearest span's, below.
        if let Some(id) = fields.remove("trace_id") {
            line.insert("trace_id", id);
        }
        line.insert(
            "timestamp",
            Value::String(
                humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            ),
        );
        line.insert("level", Value::String(meta.level().to_string()));
        line.insert("service", Value::String(self.service.clone()));
        line.insert("instance", Value::String(self.instance.clone()));
        let foreign = target.starts_with("rdkafka") || target.starts_with("librdkafka");
        line.insert("target", Value::String(target));
        line.insert("message", message);
        if let Some(scope) = ctx.event_scope(event) {
            let mut first = true;
            for span in scope {
                if first {
                    line.insert("span", Value::String(span.name().to_owned()));
                    first = false;
                }
                if let Some(f) = span.extensions().get::<SpanFields>() {
                    for (k, v) in &f.0 {
                        if k == "trace_id" {
                            line.entry("trace_id").or_insert_with(|| v.clone());
                        } else {
                            fields.entry(k.clone()).or_insert_with(|| v.clone());
                        }
                    }
                }
            }
        }
        if !fields.is_empty() {
            line.insert("fields", Value::Object(fields));
        }
        let Ok(mut bytes) = serde_json::to_vec(&line) else {
            return;
        };
        if let Some(stdout) = &self.stdout {
            // One write per line: the writer thread takes each write as one message.
            bytes.push(b'\n');
            let _ = stdout.clone().write_all(&bytes);
            bytes.pop();
        }
        if let Some(shipper) = &self.shipper
            && !foreign
            && !meta.target().starts_with(SELF_TARGET)
        {
            let trace_id = line
                .get("trace_id")
                .and_then(Value::as_str)
                .map(str::to_owned);
            shipper.offer(super::kafka::Line {
                json: bytes,
                level: meta.level().as_str(),
                trace_id,
            });
        }
    }
}
