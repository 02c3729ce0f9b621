//! ringproxy: a thread-per-core io_uring L4 proxy.
//!
//! The modules follow the path of a connection: `listener` (bind) -> `admission` (limits) ->
//! `balance` (pick a server) -> `relay` (the session) -> close; `runtime` starts the shards whose
//! loop drives all of it, `uring` holds the io_uring plumbing and every `unsafe` of the data
//! plane. `config` turns a TOML file into validated settings, `snapshot` is what the shards run
//! on (stable ids, immutable), and the control thread (`control`, with `health`, `admin` and
//! `metrics`) builds snapshots, checks servers, serves the admin API and exports the counters
//! the shards publish.

pub mod admin;
pub mod admission;
pub mod balance;
pub mod config;
pub mod control;
pub mod demo;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod relay;
pub mod route;
pub mod runtime;
pub mod snapshot;
pub mod sniff;
pub mod tls;
pub mod uring;
