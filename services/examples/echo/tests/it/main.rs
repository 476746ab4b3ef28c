//! The echo service's end-to-end tests of the platform, one test binary: real echo processes against the real
//! Consul, Kafka, StatsD and Graphite started by `scripts/infra.sh`. (Tests that stop a shared server are in
//! `tests/outage`, a binary of their own, since these need those servers up the whole time.)

#[path = "../support/mod.rs"]
mod support;

mod connections;
mod database;
mod dead_letters;
mod interop;
mod limits;
mod live;
mod operator;
mod outbox;
mod platform;
mod pool;
mod secrets;
mod service_config;
mod tls;
