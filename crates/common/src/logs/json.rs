//! The `tracing` layer that renders each event as one JSON line (see [`super`] for the shape) and hands it to
//! stdout and to the Kafka shipper; the shipper never sees rdkafka's lines or the log pipeline's own.
//!
//! A line is written once, straight into its bytes: each field as it is visited, a span's fields rendered
//! once when the span opens (the server's `grpc.request` span: once per call, not once per line), strings
//! escaped by `serde_json`. No map of values is built per line.

use std::{fmt, io::Write};

use smallvec::SmallVec;
use tracing::{Event, Subscriber, field::Field, span};
use tracing_subscriber::{Layer, layer::Context, registry::LookupSpan};

use super::{SELF_TARGET, kafka::Shipper, stdout::Stdout};

/// The `tracing` layer that renders JSON lines and hands them to stdout and the shipper.
pub(super) struct JsonLayer {
    /// `"service":"…","instance":"…"`, rendered once.
    identity: Vec<u8>,
    /// The stdout writer's queue, when `log.stdout` is on.
    stdout: Option<Stdout>,
    shipper: Option<Shipper>,
}

impl JsonLayer {
    pub(super) fn new(
        service: &str,
        instance: &str,
        stdout: Option<Stdout>,
        shipper: Option<Shipper>,
    ) -> Self {
        let mut identity = Vec::new();
        member(&mut identity, "service", |b| string(b, service));
        identity.push(b',');
        member(&mut identity, "instance", |b| string(b, instance));
        Self {
            identity,
            stdout,
            shipper,
        }
    }
}

/// Writes `s` as a JSON string.
fn string(buf: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// Writes `"name":` then the value `value` writes.
fn member(buf: &mut Vec<u8>, name: &str, value: impl FnOnce(&mut Vec<u8>)) {
    string(buf, name);
    buf.push(b':');
    value(buf);
}

/// Fields rendered as JSON members (`"k":v`), with their names, so a name is written once per line.
#[derive(Default)]
struct Rendered {
    /// Each field's name and where its member starts and ends in `json`.
    /// Inline up to four (a span's fields, most events'): a span's are then one allocation less.
    members: SmallVec<[(&'static str, std::ops::Range<usize>); 4]>,
    json: Vec<u8>,
}

impl Rendered {
    fn push(&mut self, name: &'static str, value: impl FnOnce(&mut Vec<u8>)) {
        let start = self.json.len();
        member(&mut self.json, name, value);
        self.members.push((name, start..self.json.len()));
    }

    fn get(&self, name: &str) -> Option<&[u8]> {
        self.members
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| &self.json[r.clone()])
    }
}

/// A span's fields, rendered when it opens (kept in its extensions).
struct SpanFields(Rendered);

/// What a visit collects: the event's message and the bridged `log` record's target apart, the rest rendered.
///
/// Events reuse one per thread ([`SCRATCH`]), cleared between lines, so rendering a line allocates nothing
/// once the buffers have grown to the lines this thread logs (the queues copy the line in).
#[derive(Default)]
struct Visitor {
    /// The message as a JSON string (quoted and escaped); empty when the event has none.
    message: Vec<u8>,
    log_target: Option<String>,
    fields: Rendered,
    /// Where a `Debug` or `Display` value is formatted before it is escaped.
    text: String,
    /// The line, rendered.
    line: Vec<u8>,
}

/// Where a visited field goes.
enum Slot {
    Message,
    LogTarget,
    /// `log` crate bookkeeping: dropped.
    Skip,
    Field(&'static str),
}

fn slot(field: &Field) -> Slot {
    match field.name() {
        "message" => Slot::Message,
        "log.target" => Slot::LogTarget,
        "log.file" | "log.line" | "log.module_path" => Slot::Skip,
        name => Slot::Field(name),
    }
}

/// Buffers of the scratch visitor that grew past this are freed when the thread's next line starts, so one
/// huge line does not keep its memory for the life of the thread.
const SCRATCH_KEPT_BYTES: usize = 16 * 1024;

thread_local! {
    /// The visitor events on this thread render with (see [`Visitor`]).
    static SCRATCH: std::cell::RefCell<Visitor> = std::cell::RefCell::default();
}

impl Visitor {
    fn clear(&mut self) {
        if self.message.capacity() > SCRATCH_KEPT_BYTES
            || self.fields.json.capacity() > SCRATCH_KEPT_BYTES
            || self.text.capacity() > SCRATCH_KEPT_BYTES
            || self.line.capacity() > SCRATCH_KEPT_BYTES
        {
            *self = Self::default();
            return;
        }
        self.message.clear();
        self.log_target = None;
        self.fields.members.clear();
        self.fields.json.clear();
        self.text.clear();
        self.line.clear();
    }

    fn str(&mut self, field: &Field, value: &str) {
        match slot(field) {
            Slot::Message => string(&mut self.message, value),
            Slot::LogTarget => self.log_target = Some(value.to_owned()),
            Slot::Skip => {}
            Slot::Field(name) => self.fields.push(name, |b| string(b, value)),
        }
    }

    /// A value that is not text: a field gets `json` (a number, a bool), the message or target its text.
    fn value(&mut self, field: &Field, json: impl FnOnce(&mut Vec<u8>), text: &dyn fmt::Display) {
        match slot(field) {
            Slot::Field(name) => self.fields.push(name, json),
            Slot::Skip => {}
            Slot::Message | Slot::LogTarget => self.formatted(field, format_args!("{text}")),
        }
    }

    /// Formats `value` into the scratch text, then takes it as a string.
    fn formatted(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        let mut text = std::mem::take(&mut self.text);
        text.clear();
        let _ = fmt::Write::write_fmt(&mut text, value);
        self.str(field, &text);
        self.text = text;
    }
}

/// `value` in decimal, as serde_json writes it (itoa).
fn integer(b: &mut Vec<u8>, value: impl itoa::Integer) {
    b.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// `value` as serde_json writes it: ryu's shortest form, `null` when not finite (JSON has no NaN or infinity).
fn finite_or_null(b: &mut Vec<u8>, value: f64) {
    if value.is_finite() {
        b.extend_from_slice(ryu::Buffer::new().format_finite(value).as_bytes());
    } else {
        b.extend_from_slice(b"null");
    }
}

impl tracing::field::Visit for Visitor {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.formatted(field, format_args!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.str(field, value);
    }
    // Numbers are written by itoa and ryu, the formatters serde_json uses, without `fmt`'s machinery (a call
    // log line has four of them).
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.value(field, |b| integer(b, value), &value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.value(field, |b| integer(b, value), &value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.value(
            field,
            |b| b.extend_from_slice(if value { b"true" } else { b"false" }),
            &value,
        );
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.value(field, |b| finite_or_null(b, value), &value);
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut chain = value.to_string();
        let mut src = value.source();
        while let Some(s) = src {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            src = s.source();
        }
        self.str(field, &chain);
    }
}

impl<S> Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        // Its own buffers, sized once: they live as long as the span. 64 bytes a field: a request's span,
        // `"trace_id":"<32 hex digits>"` and `"method":"/package.Service/Method"`, fits without growing.
        let mut visit = Visitor {
            fields: Rendered {
                members: SmallVec::with_capacity(attrs.fields().len()),
                json: Vec::with_capacity(64 * attrs.fields().len()),
            },
            ..Visitor::default()
        };
        attrs.record(&mut visit);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(visit.fields));
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<SpanFields>()
        {
            let mut visit = Visitor {
                fields: std::mem::take(&mut fields.0),
                ..Visitor::default()
            };
            values.record(&mut visit);
            fields.0 = visit.fields;
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let rendered = SCRATCH.try_with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut visit) => {
                visit.clear();
                self.render(event, &ctx, &mut visit);
            }
            // Only if an event were rendered inside another on this thread (`tracing` does not dispatch
            // inside a dispatch, so a field's `Debug` that logs is dropped before it gets here).
            Err(_) => self.render(event, &ctx, &mut Visitor::default()),
        });
        if rendered.is_err() {
            // The thread is exiting and its scratch is gone.
            self.render(event, &ctx, &mut Visitor::default());
        }
    }
}

impl JsonLayer {
    /// Renders `event` as one line with `visit`'s buffers and hands it on.
    fn render<S>(&self, event: &Event<'_>, ctx: &Context<'_, S>, visit: &mut Visitor)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let meta = event.metadata();
        event.record(visit);
        // Records of the `log` crate (librdkafka's, through rdkafka) arrive with target `log` and their own
        // target in `log.target`: that one is the line's target.
        let target = match (&visit.log_target, meta.target()) {
            (Some(t), "log") => t.as_str(),
            (_, t) => t,
        };
        let foreign = target.starts_with("rdkafka") || target.starts_with("librdkafka");
        let scope: SmallVec<[_; 4]> = ctx.event_scope(event).into_iter().flatten().collect();
        let spans: SmallVec<[_; 4]> = scope.iter().map(|s| s.extensions()).collect();
        let span_fields = || spans.iter().filter_map(|e| e.get::<SpanFields>());

        // Empty: `Visitor::clear` emptied it, or the visitor is new.
        let mut line = std::mem::take(&mut visit.line);
        line.reserve(256 + visit.message.len() + visit.fields.json.len() + target.len());
        line.push(b'{');
        // A trace id the event names itself (the call log, logged after its request's span closed) is the
        // line's; otherwise the nearest span's.
        let trace_id = visit
            .fields
            .get("trace_id")
            .or_else(|| span_fields().find_map(|f| f.0.get("trace_id")));
        if let Some(member) = trace_id {
            line.extend_from_slice(member);
            line.push(b',');
        }
        // RFC 3339 with microseconds, UTC: digits and punctuation, nothing to escape.
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        let _ = write!(line, "\"timestamp\":\"{now}\",");
        member(&mut line, "level", |b| string(b, meta.level().as_str()));
        line.push(b',');
        line.extend_from_slice(&self.identity);
        line.push(b',');
        member(&mut line, "target", |b| string(b, target));
        line.extend_from_slice(b",\"message\":");
        if visit.message.is_empty() {
            line.extend_from_slice(b"\"\"");
        } else {
            line.extend_from_slice(&visit.message);
        }
        if let Some(first) = scope.first() {
            line.push(b',');
            member(&mut line, "span", |b| string(b, first.name()));
        }
        // The event's fields, then those of its spans, innermost first, each name once; trace_id is above.
        let mut written: SmallVec<[&str; 16]> = SmallVec::new();
        written.push("trace_id");
        let mut open = false;
        let sources = std::iter::once(&visit.fields).chain(span_fields().map(|f| &f.0));
        for rendered in sources {
            for (name, range) in &rendered.members {
                if written.contains(name) {
                    continue;
                }
                written.push(name);
                line.extend_from_slice(if open { b"," } else { b",\"fields\":{" });
                open = true;
                line.extend_from_slice(&rendered.json[range.clone()]);
            }
        }
        if open {
            line.push(b'}');
        }
        line.push(b'}');
        drop(spans);

        if let Some(stdout) = &self.stdout {
            stdout.offer(&line);
        }
        if let Some(shipper) = &self.shipper
            && !foreign
            && !meta.target().starts_with(SELF_TARGET)
        {
            shipper.offer(&line, meta.level().as_str());
        }
        visit.line = line;
    }
}

/// The line's `trace_id` (its first member when it has one), for the Kafka record's header: the line's own
/// bytes when the id needed no escaping in JSON (every id the platform makes, and every header a client sends
/// without `"` or `\\`), decoded otherwise.
pub(super) fn trace_id_value(line: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    let member = line.strip_prefix(b"{\"trace_id\":")?;
    let text = member.strip_prefix(b"\"")?;
    let end = text.iter().position(|&b| b == b'"' || b == b'\\')?;
    if text[end] == b'"' {
        return std::str::from_utf8(&text[..end])
            .ok()
            .map(std::borrow::Cow::Borrowed);
    }
    let mut de = serde_json::Deserializer::from_slice(member).into_iter::<String>();
    de.next()?.ok().map(std::borrow::Cow::Owned)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tracing_subscriber::prelude::*;

    use super::*;

    /// The lines `emit` logs through a [`JsonLayer`] writing to stdout, parsed.
    fn lines(emit: impl FnOnce()) -> Vec<serde_json::Value> {
        let buffer = crate::logs::stdout::tests::Buffer::default();
        let stats = Arc::new(crate::logs::ShipperStats::default());
        let (stdout, worker) = Stdout::start(buffer.clone(), 100, stats).unwrap();
        let layer = JsonLayer::new("svc", "svc-host-1", Some(stdout), None);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), emit);
        worker.stop();
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[test]
    fn a_line_carries_its_fields_its_spans_fields_and_the_nearest_trace_id() {
        let got = lines(|| {
            let outer =
                tracing::info_span!("outer", trace_id = "t-outer", tenant = "acme", method = "x");
            let _o = outer.enter();
            let inner =
                tracing::info_span!("grpc.request", trace_id = "t-inner", method = "/a.B/C");
            let _i = inner.enter();
            tracing::info!(
                count = 3,
                ok = true,
                ratio = 0.5,
                quote = "say \"hi\"\n",
                "served {}",
                "it"
            );
            tracing::warn!(trace_id = "t-event", "own trace id");
        });
        let first = &got[0];
        assert_eq!(first["trace_id"], "t-inner", "the nearest span's");
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["service"], "svc");
        assert_eq!(first["instance"], "svc-host-1");
        assert_eq!(first["message"], "served it");
        assert_eq!(first["span"], "grpc.request");
        assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
        let fields = &first["fields"];
        assert_eq!(fields["count"], 3);
        assert_eq!(fields["ok"], true);
        assert_eq!(fields["ratio"], 0.5);
        assert_eq!(fields["quote"], "say \"hi\"\n", "escaped");
        assert_eq!(fields["method"], "/a.B/C", "the inner span's value wins");
        assert_eq!(fields["tenant"], "acme", "the outer span's fields too");
        assert!(fields.get("trace_id").is_none());
        assert_eq!(
            got[1]["trace_id"], "t-event",
            "an event's own trace id wins"
        );
        assert_eq!(got[1]["level"], "WARN");
    }

    #[test]
    fn lines_rendered_one_after_another_on_a_thread_share_nothing() {
        /// A value whose `Debug` logs a line of its own while the line that holds it is being rendered
        /// (`tracing` drops that one: a thread does not dispatch inside a dispatch).
        struct Chatty;
        impl fmt::Debug for Chatty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                tracing::info!(inner = 1, "from inside Debug");
                f.write_str("chatty")
            }
        }
        let big = "x".repeat(SCRATCH_KEPT_BYTES * 2);
        let got = lines(|| {
            tracing::info!(a = 1, b = "two", "first");
            tracing::info!(c = 3.5, "second");
            tracing::info!(big = big.as_str(), "big");
            tracing::info!(value = ?Chatty, "outer");
            tracing::info!("last");
        });
        let messages: Vec<_> = got.iter().map(|l| l["message"].as_str().unwrap()).collect();
        assert_eq!(messages, ["first", "second", "big", "outer", "last"]);
        assert_eq!(got[0]["fields"], serde_json::json!({"a": 1, "b": "two"}));
        assert_eq!(
            got[1]["fields"],
            serde_json::json!({"c": 3.5}),
            "nothing of the line before"
        );
        assert_eq!(
            got[2]["fields"]["big"].as_str().map(str::len),
            Some(big.len())
        );
        assert_eq!(got[3]["fields"], serde_json::json!({"value": "chatty"}));
        assert!(got[4].get("fields").is_none(), "{}", got[4]);
    }

    #[test]
    fn numbers_and_bools_are_written_as_serde_json_writes_them() {
        let got = lines(|| {
            tracing::info!(
                zero = 0u64,
                max = u64::MAX,
                min = i64::MIN,
                negative = -42i64,
                half = 1.5f64,
                tenth = 0.1f64,
                tiny = 1e-7f64,
                huge = 1e300f64,
                whole = 3.0f64,
                nan = f64::NAN,
                infinite = f64::INFINITY,
                yes = true,
                no = false,
                "numbers"
            )
        });
        let fields = &got[0]["fields"];
        let expected = serde_json::json!({
            "zero": 0u64, "max": u64::MAX, "min": i64::MIN, "negative": -42,
            "half": 1.5, "tenth": 0.1, "tiny": 1e-7, "huge": 1e300, "whole": 3.0,
            "nan": null, "infinite": null, "yes": true, "no": false,
        });
        assert_eq!(fields, &expected);
        assert!(
            fields["whole"].is_f64(),
            "3.0 stays a float: {}",
            fields["whole"]
        );
    }

    #[test]
    fn a_line_outside_any_span_has_neither_span_nor_fields() {
        let got = lines(|| tracing::info!("plain"));
        let line = got[0].as_object().unwrap();
        assert_eq!(line["message"], "plain");
        assert!(
            !line.contains_key("span")
                && !line.contains_key("fields")
                && !line.contains_key("trace_id")
        );
        assert_eq!(line["target"], "keel_common::logs::json::tests");
    }

    #[test]
    fn the_trace_id_for_the_kafka_header_is_read_back_from_the_line() {
        let plain = trace_id_value(br#"{"trace_id":"4bf92f35","timestamp":"t"}"#);
        assert!(
            matches!(plain, Some(std::borrow::Cow::Borrowed("4bf92f35"))),
            "read in place: {plain:?}"
        );
        assert_eq!(
            trace_id_value(br#"{"trace_id":"ab\"c","timestamp":"t"}"#).as_deref(),
            Some("ab\"c")
        );
        assert_eq!(
            trace_id_value(br#"{"trace_id":"\u00e9t\u00e9","timestamp":"t"}"#).as_deref(),
            Some("été")
        );
        assert_eq!(trace_id_value(br#"{"timestamp":"t"}"#), None);
    }
}
