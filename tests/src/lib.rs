//! Keel multi-host test harness.
