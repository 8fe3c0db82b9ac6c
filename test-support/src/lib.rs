//! What the workspace's tests share, so that no crate keeps a copy of its
//! own: service URLs from the environment (a test without its service is
//! skipped, saying so), unique names, bounded waits, wire-level proxies, a
//! private `redis-server`, the hookable counting store (core's `Hooked`,
//! re-exported), a transactional store written against core's public API
//! only ([`StagedStore`]), the transactional fixtures both adapters' tests
//! use ([`Fixture`], [`Probe`], [`Answer`]), and the test bodies that several stores' tests
//! run: the store [`model`], the [`restart`] of a process, requests on a
//! store ([`records`]), the [`watching`] helpers, and the metrics
//! [`recorder`].
//!
//! Not published: only the workspace's tests depend on it.
#![forbid(unsafe_code)]
#![allow(missing_docs)]

mod database;
mod env;
pub mod model;
pub mod quickstart;
pub mod recorder;
pub mod records;
mod redis_server;
pub mod restart;
mod staged;
mod transactional;
pub mod watching;
mod wire;

pub use database::PgDatabase;
pub use env::{bounded, eventually, service_url, unique, TempDb, LIMIT};
pub use idempotency_core::conformance::decide;
pub use idempotency_core::conformance::{Hook, Hooked, Op};
pub use redis_server::{wait_for_pong, RedisServer};
pub use staged::{Staged, StagedStore};
pub use transactional::{mode, run_prefix, Answer, Fixture, FixtureDb, Probe};
pub use wire::{
    closed_port, host_port, is_tls_client_hello, via, CountingProxy, Counts, LossyProxy, Proxy,
    SilentServer, SlowProxy, Slowness, Wire,
};
