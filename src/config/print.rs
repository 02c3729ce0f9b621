//! The printed form of a resolved config: TOML with every default spelled out, which parses
//! back to the same `Config` (what `ringproxy check` and the admin API's `/config` print).

use std::fmt::{self, Write as _};

use super::{Config, Pinning, Shards, format_duration, format_source_addresses};

impl Config {
    /// The resolved config as TOML, every default spelled out. It holds no secret: the admin
    /// token lives in its own file (only that file's path is printed) or the environment.
    pub(super) fn write_toml(&self, out: &mut String) -> fmt::Result {
        writeln!(out, "[runtime]")?;
        match self.runtime.shards {
            Shards::Auto => writeln!(out, "shards = \"auto\"")?,
            Shards::Count(count) => writeln!(out, "shards = {count}")?,
        }
        writeln!(
            out,
            "drain_timeout = \"{}\"",
            format_duration(self.runtime.drain_timeout)
        )?;
        match &self.runtime.pin {
            Pinning::Auto => writeln!(out, "pin = \"auto\"")?,
            Pinning::None => writeln!(out, "pin = \"none\"")?,
            Pinning::Cores(cores) => writeln!(out, "pin = {cores:?}")?,
        }
        if let Some(limit) = self.runtime.max_connections {
            writeln!(out, "max_connections = {limit}")?;
        }
        if let Some(admin) = &self.admin {
            writeln!(out, "\n[admin]\nbind = \"{}\"", admin.bind)?;
            if let Some(path) = &admin.token_file {
                writeln!(out, "token_file = {:?}", path.display().to_string())?;
            }
            writeln!(out, "auth_reads = {}", admin.auth_reads)?;
            if let Some(path) = &admin.state_file {
                writeln!(out, "state_file = {:?}", path.display().to_string())?;
            }
            writeln!(out, "max_connections = {}", admin.max_connections)?;
        }
        let tuning = &self.tuning;
        writeln!(out, "\n[tuning]")?;
        writeln!(out, "ring_entries = {}", tuning.ring_entries)?;
        writeln!(out, "buffer_size = {}", tuning.buffer_size)?;
        writeln!(out, "buffer_count = {}", tuning.buffer_count)?;
        writeln!(out, "queued_buffers = {}", tuning.queued_buffers)?;
        writeln!(out, "receives = {:?}", tuning.receives.name())?;
        for listener in &self.listeners {
            writeln!(out, "\n[[listener]]")?;
            writeln!(out, "name = {:?}", listener.name)?;
            writeln!(out, "bind = \"{}\"", listener.bind)?;
            writeln!(out, "{}", self.target_key(listener.target))?;
            writeln!(out, "max_connections = {}", listener.max_connections)?;
            writeln!(out, "backlog = {}", listener.backlog)?;
            writeln!(
                out,
                "idle_timeout = \"{}\"",
                format_duration(listener.idle_timeout)
            )?;
            writeln!(
                out,
                "write_timeout = \"{}\"",
                format_duration(listener.write_timeout)
            )?;
            listener.tcp.write_toml(out)?;
            writeln!(out, "log = {}", listener.log)?;
            super::admission::write_keys(&listener.admission, out)?;
            if let Some(routing) = &listener.routing {
                super::routing::write_keys(routing, |target| self.target_key(target), out)?;
            }
            if let Some(proxy) = &listener.proxy {
                super::routing::write_proxy_keys(proxy, listener.routing.is_none(), out)?;
            }
            super::admission::write_tables(&listener.admission, out)?;
            if let Some(tls) = &listener.tls {
                super::tls::write_listener_tls(tls, out)?;
            }
        }
        for pool in &self.pools {
            writeln!(out, "\n[[pool]]")?;
            writeln!(out, "name = {:?}", pool.name)?;
            writeln!(out, "balance = \"{}\"", pool.balance.name())?;
            writeln!(
                out,
                "connect_timeout = \"{}\"",
                format_duration(pool.connect_timeout)
            )?;
            writeln!(out, "retries = {}", pool.retries)?;
            writeln!(out, "max_fails = {}", pool.max_fails)?;
            writeln!(
                out,
                "fail_timeout = \"{}\"",
                format_duration(pool.fail_timeout)
            )?;
            if let Some(slow_start) = pool.slow_start {
                writeln!(out, "slow_start = \"{}\"", format_duration(slow_start))?;
            }
            pool.tcp.write_toml(out)?;
            if let Some(version) = pool.send_proxy {
                writeln!(out, "send_proxy = \"{}\"", version.name())?;
            }
            if !pool.source_addresses.is_empty() {
                writeln!(
                    out,
                    "source_addresses = {}",
                    format_source_addresses(&pool.source_addresses)
                )?;
            }
            writeln!(out, "servers = [")?;
            for server in &pool.servers {
                write!(out, "  {{ addr = \"{}\"", server.addr)?;
                if server.name != server.addr.to_string() {
                    write!(out, ", name = {:?}", server.name)?;
                }
                write!(
                    out,
                    ", weight = {}, backup = {}",
                    server.weight, server.backup
                )?;
                if let Some(limit) = server.max_connections {
                    write!(out, ", max_connections = {limit}")?;
                }
                writeln!(out, " }},")?;
            }
            writeln!(out, "]")?;
            if let Some(health) = &pool.health {
                health.write_toml(out)?;
            }
            if let Some(tls) = &pool.tls {
                super::tls::write_pool_tls(tls, out)?;
            }
        }
        super::split::write_splits(&self.splits, |pool| self.pool(pool).name.clone(), out)
    }
}
