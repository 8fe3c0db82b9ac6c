//! Says in `cargo test`'s own output which backends the workspace's tests
//! ran against. The tests of every crate read `REDIS_URL`,
//! `REDIS_CLUSTER_URL`, `DATABASE_URL`, `AMQP_URL` and `NATS_URL` at run time
//! and pass without running their backend when one is unset (the fault
//! scenarios of the crate `faults` need `FAULTS=1` and root); this crate's
//! tests are then listed as `ignored`, with the variable to set, so nobody
//! mistakes a skip for a pass.
//!
//! Twice: its integration tests (`tests/backends.rs`) give the reason on
//! each line, and the doctests below repeat them as the last lines of a
//! `cargo test --workspace` run (cargo runs the doctests last, crate by
//! crate in the order of their names, which is why this crate is named to
//! come after `test-support`), where the summary counts what was skipped:
//!
//! ```text
//!    Doc-tests tests_report
//! test tests-report/src/lib.rs - postgres_tests_ran (line 36) ... ignored
//! ...
//! test result: ok. 0 passed; 0 failed; 6 ignored; ...
//! ```
#![forbid(unsafe_code)]

/// Whether a backend's tests ran, as a doctest: `ignored` when its
/// variable was unset at build time (the build script turns each variable
/// into a `cfg`), `ok` when set.
macro_rules! ran {
    ($(#[$cfg:meta] $name:ident: $what:literal;)*) => {$(
        #[cfg_attr($cfg, doc = "```")]
        #[cfg_attr(not($cfg), doc = "```ignore")]
        #[doc = $what]
        #[doc = "```"]
        pub mod $name {}
    )*};
}

ran! {
    #[has_redis_url] redis_tests_ran: "// REDIS_URL was set: the Redis tests ran.";
    #[has_redis_cluster_url] redis_cluster_tests_ran: "// REDIS_CLUSTER_URL was set: the Redis Cluster tests ran.";
    #[has_database_url] postgres_tests_ran: "// DATABASE_URL was set: the PostgreSQL tests ran.";
    #[has_amqp_url] rabbitmq_tests_ran: "// AMQP_URL was set: the RabbitMQ tests ran.";
    #[has_nats_url] nats_tests_ran: "// NATS_URL was set: the NATS JetStream tests ran.";
    #[has_faults] fault_scenarios_ran: "// FAULTS was set: the fault-injection scenarios ran.";
}
