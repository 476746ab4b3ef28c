//! graphite-web's render API (`GET /render?target=…&from=-60s&format=json`), for the verbs that show rates,
//! error ratios and latencies: the same whisper files the dashboards draw.
//!
//! Metric paths are the platform's ([`keel_common::metrics`]): counters
//! `stats_counts.<prefix>.<process>.grpc.server.<Service>.<Method>.{requests,status.<CODE>}` per 1 s StatsD
//! flush, timers `stats.timers.<prefix>.<process>.grpc.server.<Service>.<Method>.latency.{count,upper_<pct>}`.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

/// One series as the render API returns it: its target (the metric path, or the alias a function gave it) and
/// its values, one per step (`None` where nothing was recorded).
#[derive(Clone, Debug)]
pub struct Series {
    pub target: String,
    pub values: Vec<Option<f64>>,
}

impl Series {
    /// The sum of the recorded values.
    pub fn sum(&self) -> f64 {
        self.values.iter().flatten().sum()
    }

    /// The `n`th dot-separated node of the target (0-based), or "" past its end.
    pub fn node(&self, n: usize) -> &str {
        self.target.split('.').nth(n).unwrap_or("")
    }
}

/// A graphite-web client; every error names its address and the setting to change.
#[derive(Clone, Debug)]
pub struct Graphite {
    url: String,
    http: reqwest::Client,
}

impl Graphite {
    /// graphite-web at `url` (e.g. `http://127.0.0.1:18080`).
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub fn new(url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        })
    }

    /// The series of `targets` over the last `window` (whole seconds, at least one).
    ///
    /// # Errors
    /// graphite-web does not answer, refuses the query, or answers something other than the render JSON.
    pub async fn render(
        &self,
        targets: &[String],
        window: Duration,
    ) -> anyhow::Result<Vec<Series>> {
        let mut query: Vec<(&str, String)> =
            targets.iter().map(|t| ("target", t.clone())).collect();
        query.push(("from", format!("-{}s", window.as_secs().max(1))));
        query.push(("format", "json".into()));
        let answer: Value = self
            .http
            .get(format!("{}/render", self.url))
            .query(&query)
            .send()
            .await
            .map_err(reqwest::Error::without_url)
            .with_context(|| {
                format!(
                    "graphite-web at {} (--graphite / KEEL_GRAPHITE_URL) does not answer",
                    self.url
                )
            })?
            .error_for_status()
            .map_err(reqwest::Error::without_url)
            .with_context(|| format!("graphite-web at {} refused the query", self.url))?
            .json()
            .await
            .with_context(|| {
                format!(
                    "graphite-web at {} answered something other than JSON",
                    self.url
                )
            })?;
        Ok(parse(&answer))
    }
}

/// The render API's JSON: `[{"target": "…", "datapoints": [[value|null, timestamp], …]}, …]`.
fn parse(answer: &Value) -> Vec<Series> {
    answer
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| Series {
            target: s["target"].as_str().unwrap_or_default().to_owned(),
            values: s["datapoints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| p[0].as_f64())
                .collect(),
        })
        .collect()
}

/// A Graphite path segment for a service name, as the platform writes it ([`keel_common::metrics::sanitize`]).
pub fn segment(name: &str) -> String {
    keel_common::metrics::sanitize(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_answers_become_series_with_gaps_kept() {
        let answer = serde_json::json!([
            {"target": "stats_counts.keel.echo.grpc.server.Echo.Echo.requests",
             "datapoints": [[1.0, 100], [null, 101], [2.5, 102]]}
        ]);
        let s = &parse(&answer)[0];
        assert_eq!(s.values, vec![Some(1.0), None, Some(2.5)]);
        assert_eq!(s.sum(), 3.5);
        assert_eq!(s.node(2), "echo");
        assert_eq!(s.node(5), "Echo");
        assert_eq!(s.node(9), "");
    }
}
