//! `keel logs` and `keel tap`: the services' log lines, read from their Kafka log topics (`logs.<service>`).
//!
//! Lines are filtered on the message headers the platform sets ([`keel_common::logs::HEADER_LEVEL`],
//! [`keel_common::logs::HEADER_TRACE_ID`]) before their JSON is parsed, and printed in time order (the lines'
//! own microsecond timestamps): what was already in the topics, sorted across partitions and topics, then, with
//! `--follow`, each new line as it comes. The reader assigns partitions itself (no consumer group, nothing
//! committed): it never disturbs another consumer.
//!
//! `keel tap` follows the call log (target `keel::calls`): one line per call a service's instances served.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use anstyle::{AnsiColor, Style};
use anyhow::Context as _;
use keel_common::logs::{HEADER_LEVEL, HEADER_TRACE_ID};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    message::{BorrowedMessage, Headers},
};
use serde_json::Value;

/// Where Kafka is.
#[derive(clap::Args, Debug, Clone)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (`host:port,…`).
    #[arg(long, env = "KEEL_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Log topic prefix: a service's topic is `<prefix><service>` (the platform's `log.topic` default).
    #[arg(long, default_value = "logs.")]
    pub topic_prefix: String,
}

/// `keel logs` options.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  keel logs echo --since 30m --level warn\n  keel logs echo --follow --grep timeout\n  keel logs --trace-id 4bf92f3577b34da6a3ce929d0e0e4736   # one request across every service"
)]
pub struct LogsArgs {
    /// The service whose topic to read; without it, every service's (`--trace-id` required).
    pub service: Option<String>,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Keep reading new lines until interrupted.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Start this far back (`30s`, `10m`, `2h`).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub since: Duration,
    /// Only lines at this level or more severe (`trace`, `debug`, `info`, `warn`, `error`).
    #[arg(long)]
    pub level: Option<Level>,
    /// Only the lines of this request.
    #[arg(long)]
    pub trace_id: Option<String>,
    /// Only lines whose JSON contains this text.
    #[arg(long)]
    pub grep: Option<String>,
    /// Print each line's JSON as shipped instead of a readable line.
    #[arg(long)]
    pub json: bool,
}

/// `keel tap` options.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example: keel tap echo --method Echo/Echo")]
pub struct TapArgs {
    /// The service whose calls to show.
    pub service: String,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Only calls whose method path contains this (`Echo/Echo`, `GetVideo`).
    #[arg(long)]
    pub method: Option<String>,
    /// Also show the calls made in the last while before now (`1m`); default: only new calls.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    /// Stop after this many calls.
    #[arg(long)]
    pub max: Option<u64>,
    /// Print each call-log line's JSON.
    #[arg(long)]
    pub json: bool,
}

/// Log levels, least severe first (the values of the `level` header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    fn of_header(v: &[u8]) -> Option<Self> {
        Some(match v {
            b"TRACE" => Self::Trace,
            b"DEBUG" => Self::Debug,
            b"INFO" => Self::Info,
            b"WARN" => Self::Warn,
            b"ERROR" => Self::Error,
            _ => return None,
        })
    }
}

/// Which lines to keep, decided on headers first and on the raw JSON last.
#[derive(Default)]
struct Filter {
    level: Option<Level>,
    trace_id: Option<String>,
    grep: Option<String>,
}

impl Filter {
    fn keeps(&self, m: &BorrowedMessage<'_>) -> bool {
        let header = |name: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
        };
        if let Some(min) = self.level
            && header(HEADER_LEVEL)
                .and_then(Level::of_header)
                .is_none_or(|l| l < min)
        {
            return false;
        }
        if let Some(id) = &self.trace_id
            && header(HEADER_TRACE_ID) != Some(id.as_bytes())
        {
            return false;
        }
        match (&self.grep, m.payload()) {
            (Some(text), Some(p)) => String::from_utf8_lossy(p).contains(text.as_str()),
            (Some(_), None) => false,
            _ => true,
        }
    }
}

/// Prints the lines `keel logs` asks for.
///
/// # Errors
/// Kafka does not answer, or the service has no log topic.
pub fn logs(args: LogsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.service.is_some() || args.trace_id.is_some(),
        "name a service, or give --trace-id to search every service's log topic"
    );
    let reader = Reader::connect(&args.kafka)?;
    let topics = reader.topics(args.service.as_deref())?;
    let filter = Filter {
        level: args.level,
        trace_id: args.trace_id.clone(),
        grep: args.grep.clone(),
    };
    let print = |line: &Value| {
        if args.json {
            println!("{line}");
        } else {
            anstream::println!("{}", readable(line));
        }
    };
    reader.read(
        &topics,
        Some(args.since),
        args.follow,
        &filter,
        &mut |line| {
            print(&line);
            true
        },
    )
}

/// Prints the calls `keel tap` asks for.
///
/// # Errors
/// Kafka does not answer, or the service has no log topic.
pub fn tap(args: TapArgs) -> anyhow::Result<()> {
    let reader = Reader::connect(&args.kafka)?;
    let topics = reader.topics(Some(&args.service))?;
    let filter = Filter {
        grep: Some("\"target\":\"keel::calls\"".into()),
        ..Filter::default()
    };
    let mut shown = 0u64;
    if !args.json {
        anstream::println!("{}", tap_header());
    }
    reader.read(&topics, args.since, true, &filter, &mut |line| {
        let f = &line["fields"];
        if f["side"] != "server" {
            return true;
        }
        if let Some(m) = &args.method
            && !f["method"]
                .as_str()
                .unwrap_or_default()
                .contains(m.as_str())
        {
            return true;
        }
        if args.json {
            println!("{line}");
        } else {
            anstream::println!("{}", tap_line(&line));
        }
        shown += 1;
        args.max.is_none_or(|max| shown < max)
    })
}

/// Reads log topics without a consumer group.
struct Reader {
    consumer: BaseConsumer,
    brokers: String,
    prefix: String,
}

/// How long Kafka may take to answer a metadata or offsets request.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(5);

impl Reader {
    fn connect(args: &KafkaArgs) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &args.brokers)
            .set("group.id", format!("keel-cli-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("socket.connection.setup.timeout.ms", "5000")
            .set("log_level", "3")
            .create()
            .with_context(|| format!("Kafka client for {}", args.brokers))?;
        Ok(Self {
            consumer,
            brokers: args.brokers.clone(),
            prefix: args.topic_prefix.clone(),
        })
    }

    fn unreachable(&self) -> String {
        format!(
            "Kafka at {} (--brokers / KEEL_KAFKA_BROKERS) does not answer",
            self.brokers
        )
    }

    /// `<prefix><service>`, checked to exist, or every topic starting with the prefix; each with its
    /// partitions (one metadata request).
    fn topics(&self, service: Option<&str>) -> anyhow::Result<Vec<(String, Vec<i32>)>> {
        let meta = self
            .consumer
            .fetch_metadata(None, KAFKA_TIMEOUT)
            .with_context(|| self.unreachable())?;
        let wanted = |name: &str| match service {
            Some(s) => name == format!("{}{s}", self.prefix),
            None => name.starts_with(&self.prefix),
        };
        let topics: Vec<(String, Vec<i32>)> = meta
            .topics()
            .iter()
            .filter(|t| wanted(t.name()))
            .map(|t| {
                (
                    t.name().to_owned(),
                    t.partitions().iter().map(|p| p.id()).collect(),
                )
            })
            .collect();
        match service {
            Some(s) => anyhow::ensure!(
                !topics.is_empty(),
                "Kafka at {} has no topic {}{s}: is {s} running with kafka.brokers set (its log.topic)?",
                self.brokers,
                self.prefix
            ),
            None => anyhow::ensure!(
                !topics.is_empty(),
                "Kafka at {} has no {}* topic",
                self.brokers,
                self.prefix
            ),
        }
        Ok(topics)
    }

    /// Reads `topics` from `since` ago (or from their ends), handing each kept line to `each` in time order
    /// until `each` returns false; without `follow`, stops at the ends the topics had when reading began.
    fn read(
        &self,
        topics: &[(String, Vec<i32>)],
        since: Option<Duration>,
        follow: bool,
        filter: &Filter,
        each: &mut dyn FnMut(Value) -> bool,
    ) -> anyhow::Result<()> {
        let mut start = TopicPartitionList::new();
        // Per (topic, partition): the offset the catch-up read stops at (the end when reading began).
        let mut ends: HashMap<(String, i32), i64> = HashMap::new();
        let from_ms = since.map(|s| {
            let t = SystemTime::now()
                .checked_sub(s)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as i64
        });
        for (topic, partitions) in topics {
            for &p in partitions {
                let (_low, high) = self
                    .consumer
                    .fetch_watermarks(topic, p, KAFKA_TIMEOUT)
                    .with_context(|| self.unreachable())?;
                let offset = from_ms.map_or(Offset::End, Offset::Offset);
                start.add_partition_offset(topic, p, offset)?;
                ends.insert((topic.clone(), p), high);
            }
        }
        // Timestamps become the offsets of the first message at or after them (End where there is none).
        let start = if from_ms.is_some() {
            self.consumer
                .offsets_for_times(start, KAFKA_TIMEOUT)
                .with_context(|| self.unreachable())?
        } else {
            start
        };
        for e in start.elements() {
            let key = (e.topic().to_owned(), e.partition());
            match e.offset() {
                Offset::Offset(o) if o < ends[&key] => {}
                _ => {
                    ends.remove(&key);
                }
            }
        }
        self.consumer
            .assign(&start)
            .context("assigning the log partitions")?;

        // Catch-up: everything up to the ends, sorted by the lines' own timestamps.
        let mut backlog: Vec<Value> = Vec::new();
        while !ends.is_empty() {
            let Some(m) = self.consumer.poll(KAFKA_TIMEOUT) else {
                anyhow::bail!(
                    "{} (no message within {KAFKA_TIMEOUT:?})",
                    self.unreachable()
                );
            };
            let m = m.with_context(|| self.unreachable())?;
            let key = (m.topic().to_owned(), m.partition());
            if ends.get(&key).is_some_and(|end| m.offset() + 1 >= *end) {
                ends.remove(&key);
            }
            if let Some(line) = kept(&m, filter) {
                backlog.push(line);
            }
        }
        backlog.sort_by(|a, b| a["timestamp"].as_str().cmp(&b["timestamp"].as_str()));
        for line in backlog {
            if !each(line) {
                return Ok(());
            }
        }
        // Live: each kept line as it comes.
        if !follow {
            return Ok(());
        }
        loop {
            match self.consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    if let Some(line) = kept(&m, filter)
                        && !each(line)
                    {
                        return Ok(());
                    }
                }
                Some(Err(e)) => eprintln!("warning: {}: {e}", self.unreachable()),
                None => {}
            }
        }
    }
}

/// The line's JSON when the filter keeps it and it parses.
fn kept(m: &BorrowedMessage<'_>, filter: &Filter) -> Option<Value> {
    if !filter.keeps(m) {
        return None;
    }
    serde_json::from_slice(m.payload()?).ok()
}

fn level_style(level: &str) -> Style {
    match level {
        "ERROR" => AnsiColor::Red.on_default().bold(),
        "WARN" => AnsiColor::Yellow.on_default(),
        "INFO" => AnsiColor::Green.on_default(),
        _ => AnsiColor::BrightBlack.on_default(),
    }
}

/// `2026-11-29T20:41:02.123456Z  INFO echo-host-5000-ab12 echo: message key=value … trace=…`
fn readable(line: &Value) -> String {
    let s = |k: &str| line[k].as_str().unwrap_or_default();
    let level = s("level");
    let style = level_style(level);
    let mut out = format!(
        "{} {style}{level:>5}{style:#} {} {}: {}",
        s("timestamp"),
        s("instance"),
        s("target"),
        s("message")
    );
    if let Some(fields) = line["fields"].as_object() {
        for (k, v) in fields {
            match v {
                Value::String(text) => out.push_str(&format!(" {k}={text}")),
                other => out.push_str(&format!(" {k}={other}")),
            }
        }
    }
    if let Some(id) = line["trace_id"].as_str() {
        out.push_str(&format!(" trace={id}"));
    }
    out
}

fn tap_header() -> String {
    let bold = Style::new().bold();
    format!(
        "{bold}{:<27} {:<24} {:<40} {:<21} {:<18} {:>10}{bold:#}",
        "TIME", "INSTANCE", "METHOD", "PEER", "STATUS", "MS"
    )
}

/// One served call: time, instance, method, peer, status (red when it is an error), duration.
fn tap_line(line: &Value) -> String {
    let f = &line["fields"];
    let status = f["status"].as_str().unwrap_or_default();
    let style = if status == "OK" {
        Style::new()
    } else {
        AnsiColor::Red.on_default()
    };
    format!(
        "{:<27} {:<24} {:<40} {:<21} {style}{:<18}{style:#} {:>10.3}",
        line["timestamp"].as_str().unwrap_or_default(),
        line["instance"].as_str().unwrap_or_default(),
        f["method"].as_str().unwrap_or_default(),
        f["peer"].as_str().unwrap_or_default(),
        status,
        f["duration_ms"].as_f64().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_readable_line_has_time_level_instance_target_message_fields_and_trace() {
        let line = serde_json::json!({
            "timestamp": "2026-11-29T20:41:02.123456Z", "level": "WARN", "service": "echo",
            "instance": "echo-a", "target": "keel::calls", "message": "grpc call",
            "trace_id": "t1", "fields": {"method": "/keel.example.v1.Echo/Echo", "duration_ms": 1.5}
        });
        let text = anstream::adapter::strip_str(&readable(&line)).to_string();
        assert_eq!(
            text,
            "2026-11-29T20:41:02.123456Z  WARN echo-a keel::calls: grpc call duration_ms=1.5 \
             method=/keel.example.v1.Echo/Echo trace=t1"
        );
    }

    #[test]
    fn levels_order_from_trace_to_error() {
        assert!(Level::of_header(b"WARN") > Some(Level::Info));
        assert!(Level::of_header(b"ERROR") > Some(Level::Warn));
        assert_eq!(Level::of_header(b"LOUD"), None);
    }
}
