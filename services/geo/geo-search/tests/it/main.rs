//! The geo-search service's tests, one test binary: every RPC in process on the real PostgreSQL + PostGIS,
//! and a Consul-registered process called with the post's own proto.

mod fuzz;
mod process;
mod storage;
