//! Says in `cargo test`'s own output which backends the workspace's tests
//! ran against. The tests of every crate read `REDIS_URL`,
//! `REDIS_CLUSTER_URL`, `DATABASE_URL`, `AMQP_URL` and `NATS_URL` at run time
//! and pass without running their backend when one is unset; this crate's
//! tests are then listed as
//! `ignored`, with the variable to set, so nobody mistakes a skip for a pass.
#![forbid(unsafe_code)]
