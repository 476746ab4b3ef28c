//! Test support (feature `testsuite`) of the KillrVideo services' test suites: the platform's
//! ([`keel_common::testsuite`]), plus what KillrVideo requests need.

pub use keel_common::testsuite::*;
use keel_protos::killrvideo::common::Uuid as PbUuid;

/// `id` as the optional `killrvideo.common.Uuid` field of a request.
pub fn pb(id: uuid::Uuid) -> Option<PbUuid> {
    Some(crate::ids::uuid(id))
}
