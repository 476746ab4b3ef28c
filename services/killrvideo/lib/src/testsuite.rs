//! Test support (feature `testsuite`): the platform's, re-exported for the KillrVideo services' test suites.

pub use keel_common::testsuite::*;
