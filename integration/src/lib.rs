//! Harness for Fabric's multi-process tests.
