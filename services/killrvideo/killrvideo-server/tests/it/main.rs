//! The KillrVideo back end end to end, one test binary: the embedded server in process (every RPC the clients
//! use, grpcurl with only the protos, the real data through the loader) and every service as its own process
//! on the real Consul, Kafka and PostgreSQL (the cluster test, which also stops Kafka: nothing else here uses
//! it).

mod support;

mod cluster;
mod crash;
mod embedded;
mod fuzz;
mod grpcurl;
mod loader;
