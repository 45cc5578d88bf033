//! The one integration-test binary of keel-tests: every multi-host test is a module under
//! `it/` (one binary keeps link times down). These tests need root; without it each one
//! prints `SKIPPED: <reason>` and passes.

mod it;
