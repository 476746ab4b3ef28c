//! Outages of the shared servers: these tests stop Consul or Kafka (through `scripts/infra.sh`), so they live
//! in their own test binary (cargo runs test binaries one at a time, so no other test sees the outage) and
//! take [`ONE_AT_A_TIME`] so they never overlap each other.

#[path = "../support/mod.rs"]
mod support;

mod consul;
mod kafka;

/// Held for the whole of each outage test.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
