//! The cache service's tests, one test binary: the handler in process against a real accounts server on
//! PostgreSQL, and cache processes registered in the real Consul (sharding, quota across instances, deadline
//! propagation, configuration errors, a 100,000-key Dump with bounded memory).

mod support;

mod cache;
mod cluster;
mod dump;
mod fuzz;
