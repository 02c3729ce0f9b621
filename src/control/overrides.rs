//! Runtime overrides: what operators changed through the admin API on top of the config file
//! (drain, maint, removal, weights, servers added, split weights), and the state file that
//! keeps them across restarts (HAProxy's `server-state-file`).
//!
//! Pure data and rules, plus the file's atomic write (temp file, fsync, rename). The rules for
//! a reload: an override stays as long as the new file still names its server (or the server
//! was added through the API); a server added through the API stays in its pool while the pool
//! exists, unless the new file names the same address, and then the file's entry wins; a
//! split's weights stay until the file changes that split's weights.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::Config;

pub const STATE_FILE_VERSION: u32 = 1;

/// An operator's decision about a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// No new sessions; live ones finish.
    Drain,
    /// Maintenance: no new sessions.
    Maint,
    /// Deleted: no new sessions; gone once its last session ends.
    Remove,
    /// Deleted, and its last session has ended: hidden while the file still names it.
    Removed,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

impl ServerOverride {
    pub fn is_empty(&self) -> bool {
        self.admin.is_none() && self.weight.is_none()
    }
}

/// A server registered through the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedServer {
    pub addr: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub weight: u32,
    #[serde(default)]
    pub backup: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

impl AddedServer {
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.addr.to_string())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolOverrides {
    /// By server address.
    #[serde(default)]
    pub servers: BTreeMap<SocketAddr, ServerOverride>,
    #[serde(default)]
    pub added: Vec<AddedServer>,
}

impl PoolOverrides {
    fn is_empty(&self) -> bool {
        self.servers.is_empty() && self.added.is_empty()
    }
}

/// Weights an operator gave a split, and the file's weights when they did: a reload whose
/// file changes the split's weights is the newer decision and ends the override.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitOverride {
    /// By pool name; pools not named keep the file's weight.
    pub weights: BTreeMap<String, u32>,
    /// The file's weights (by pool name) when the override was made.
    pub file: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overrides {
    pub version: u32,
    /// By pool name.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolOverrides>,
    /// By split name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub splits: BTreeMap<String, SplitOverride>,
}

/// A split's weights in the file, by pool name.
pub fn file_weights(config: &Config, split: &crate::config::SplitConfig) -> BTreeMap<String, u32> {
    split
        .backends
        .iter()
        .map(|(pool, weight)| (config.pool(*pool).name.clone(), *weight))
        .collect()
}

impl Default for Overrides {
    fn default() -> Self {
        Overrides {
            version: STATE_FILE_VERSION,
            pools: BTreeMap::new(),
            splits: BTreeMap::new(),
        }
    }
}

impl Overrides {
    pub fn server(&self, pool: &str, addr: SocketAddr) -> Option<&ServerOverride> {
        self.pools.get(pool)?.servers.get(&addr)
    }

    pub fn server_mut(&mut self, pool: &str, addr: SocketAddr) -> &mut ServerOverride {
        self.pools
            .entry(pool.to_string())
            .or_default()
            .servers
            .entry(addr)
            .or_default()
    }

    pub fn added(&self, pool: &str) -> &[AddedServer] {
        self.pools
            .get(pool)
            .map_or(&[], |pool| pool.added.as_slice())
    }

    pub fn add_server(&mut self, pool: &str, server: AddedServer) {
        self.pools
            .entry(pool.to_string())
            .or_default()
            .added
            .push(server);
    }

    /// Forgets a server added through the API and its overrides (its last session ended).
    pub fn forget_added(&mut self, pool: &str, addr: SocketAddr) {
        if let Some(overrides) = self.pools.get_mut(pool) {
            overrides.added.retain(|server| server.addr != addr);
            overrides.servers.remove(&addr);
        }
        self.prune_empty();
    }

    /// Applies the reload rules against the new config: overrides of servers the file no
    /// longer names go (unless added through the API), API-added servers whose address the
    /// file now names give way to the file's entry, and pools that left the file take their
    /// overrides with them. Returns whether anything changed.
    pub fn reconcile(&mut self, config: &Config) -> bool {
        let before = self.clone();
        self.pools.retain(|name, overrides| {
            let Some(pool) = config.pools.iter().find(|pool| &pool.name == name) else {
                return false;
            };
            let in_file = |addr: &SocketAddr| pool.servers.iter().any(|s| s.addr == *addr);
            overrides.added.retain(|server| !in_file(&server.addr));
            let added: Vec<SocketAddr> = overrides.added.iter().map(|s| s.addr).collect();
            overrides.servers.retain(|addr, server| {
                if server.is_empty() {
                    return false;
                }
                if added.contains(addr) {
                    return true;
                }
                if !in_file(addr) {
                    return false;
                }
                // A deleted file server whose last session ended stays hidden; one that was
                // still draining keeps draining.
                true
            });
            true
        });
        self.reconcile_splits(config);
        self.prune_empty();
        *self != before
    }

    /// Keeps an operator's split weights only while the file's weights for that split are
    /// the ones they were set over, and while they are weights the API would take (a state
    /// file edited by hand, or from another version, may hold any). Returns whether any went.
    pub fn reconcile_splits(&mut self, config: &Config) -> bool {
        let before = self.splits.len();
        self.splits.retain(|name, split| {
            let Some(file) = config
                .splits
                .iter()
                .find(|candidate| &candidate.name == name)
            else {
                return false;
            };
            let weights = file_weights(config, file);
            if weights != split.file {
                return false;
            }
            let known = split.weights.keys().all(|pool| weights.contains_key(pool));
            let in_range = split
                .weights
                .values()
                .all(|weight| *weight <= crate::config::MAX_SPLIT_WEIGHT);
            let some_traffic = weights
                .iter()
                .any(|(pool, weight)| split.weights.get(pool).copied().unwrap_or(*weight) > 0);
            known && in_range && some_traffic
        });
        self.splits.len() != before
    }

    fn prune_empty(&mut self) {
        for overrides in self.pools.values_mut() {
            overrides.servers.retain(|_, server| !server.is_empty());
        }
        self.pools.retain(|_, overrides| !overrides.is_empty());
    }

    /// Reads a state file; a missing file is no overrides.
    pub fn load(path: &Path) -> Result<Overrides, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Ok(Overrides::default());
            }
            Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
        };
        let overrides: Overrides =
            serde_json::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))?;
        if overrides.version != STATE_FILE_VERSION {
            return Err(format!(
                "{}: state file version {} (this ringproxy reads {STATE_FILE_VERSION})",
                path.display(),
                overrides.version
            ));
        }
        Ok(overrides)
    }

    /// Writes the state file atomically: a temporary file beside it, fsync, rename.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = std::path::PathBuf::from(temporary);
        {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(text.as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()?;
        }
        std::fs::rename(&temporary, path)?;
        if let Some(directory) = path.parent()
            && let Ok(directory) = std::fs::File::open(directory)
        {
            let _ = directory.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(servers: &str) -> Config {
        let text = format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:1\"\npool = \"web\"\n\
             [[pool]]\nname = \"web\"\nservers = [{servers}]\n"
        );
        Config::parse("t.toml", &text).expect("valid")
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("addr")
    }

    #[test]
    fn reload_rules_keep_what_the_file_still_names() {
        let mut overrides = Overrides::default();
        overrides.server_mut("web", addr("127.0.0.1:9001")).admin = Some(AdminState::Drain);
        overrides.server_mut("web", addr("127.0.0.1:9002")).weight = Some(7);
        overrides.add_server(
            "web",
            AddedServer {
                addr: addr("127.0.0.1:9100"),
                name: None,
                weight: 1,
                backup: false,
                max_connections: None,
            },
        );
        overrides.server_mut("web", addr("127.0.0.1:9100")).admin = Some(AdminState::Maint);
        overrides.server_mut("gone", addr("127.0.0.1:9001")).admin = Some(AdminState::Maint);
        let changed = overrides.reconcile(&config(
            r#"{ addr = "127.0.0.1:9001" }, { addr = "127.0.0.1:9003" }"#,
        ));
        assert!(changed);
        assert_eq!(
            overrides
                .server("web", addr("127.0.0.1:9001"))
                .and_then(|s| s.admin),
            Some(AdminState::Drain),
            "the file still names it"
        );
        assert!(
            overrides.server("web", addr("127.0.0.1:9002")).is_none(),
            "the file no longer names it"
        );
        assert_eq!(overrides.added("web").len(), 1, "API-added servers stay");
        assert!(overrides.server("web", addr("127.0.0.1:9100")).is_some());
        assert!(!overrides.pools.contains_key("gone"), "its pool left");
        // The file now names the added server's address: the file's entry wins.
        overrides.reconcile(&config(
            r#"{ addr = "127.0.0.1:9001" }, { addr = "127.0.0.1:9100" }"#,
        ));
        assert!(overrides.added("web").is_empty());
        assert_eq!(
            overrides
                .server("web", addr("127.0.0.1:9100"))
                .and_then(|s| s.admin),
            Some(AdminState::Maint),
            "its state stays while the file names it"
        );
    }

    #[test]
    fn split_overrides_end_when_the_file_changes_the_split() {
        let text = |weights: (u32, u32)| {
            format!(
                "[[listener]]\nname = \"f\"\nbind = \"127.0.0.1:0\"\nsplit = \"app\"\n\
                 [[pool]]\nname = \"blue\"\nservers = [ {{ addr = \"127.0.0.1:9001\" }} ]\n\
                 [[pool]]\nname = \"green\"\nservers = [ {{ addr = \"127.0.0.1:9002\" }} ]\n\
                 [[split]]\nname = \"app\"\nbackends = [ {{ pool = \"blue\", weight = {} }}, \
                 {{ pool = \"green\", weight = {} }} ]\n",
                weights.0, weights.1
            )
        };
        let file = Config::parse("t", &text((90, 10))).expect("valid");
        let mut overrides = Overrides::default();
        overrides.splits.insert(
            "app".into(),
            SplitOverride {
                weights: [("blue".to_string(), 0), ("green".to_string(), 100)].into(),
                file: file_weights(&file, &file.splits[0]),
            },
        );
        assert!(!overrides.reconcile(&file), "the same file keeps it");
        assert!(overrides.splits.contains_key("app"));
        let edited = Config::parse("t", &text((50, 50))).expect("valid");
        assert!(
            overrides.reconcile(&edited),
            "new weights in the file end it"
        );
        assert!(overrides.splits.is_empty());
        // What a state file may hold that the API would refuse goes too.
        for weights in [
            [("blue".to_string(), 0), ("green".to_string(), 0)],
            [("blue".to_string(), 20_000), ("green".to_string(), 1)],
            [("blue".to_string(), 1), ("red".to_string(), 1)],
        ] {
            overrides.splits.insert(
                "app".into(),
                SplitOverride {
                    weights: weights.into(),
                    file: file_weights(&file, &file.splits[0]),
                },
            );
            assert!(overrides.reconcile_splits(&file), "{:?}", overrides.splits);
            assert!(overrides.splits.is_empty());
        }
    }

    #[test]
    fn state_file_round_trips_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        assert_eq!(Overrides::load(&path), Ok(Overrides::default()));
        let mut overrides = Overrides::default();
        overrides.server_mut("web", addr("[::1]:9001")).admin = Some(AdminState::Removed);
        overrides.save(&path).expect("save");
        assert_eq!(Overrides::load(&path), Ok(overrides));
        std::fs::write(&path, "{ not json").expect("write");
        assert!(Overrides::load(&path).is_err());
    }
}
