//! `[[split]]` tables (pools sharing new connections by weight, for blue/green and canary
//! releases), what a listener or a route sends clients to (`pool` or `split`), and their
//! printed form.

use std::collections::HashSet;
use std::fmt::{self, Write as _};

use toml::Spanned;

use super::file::FileSplit;
use super::{ConfigError, PoolConfig, PoolIndex, Source};

/// Most backends in one split, and the largest weight.
const MAX_BACKENDS: usize = 64;
pub const MAX_SPLIT_WEIGHT: u32 = 10_000;

/// A split by its position in `Config::splits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SplitIndex(pub u16);

/// Where a listener's or a route's clients go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Pool(PoolIndex),
    Split(SplitIndex),
}

/// Whether a client keeps its side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sticky {
    /// Each new connection is placed by weight alone (smooth weighted round robin per shard).
    None,
    /// A client address keeps its side while the weights hold (its hash picks the side).
    Source,
}

impl Sticky {
    pub fn name(self) -> &'static str {
        match self {
            Sticky::None => "none",
            Sticky::Source => "source",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitConfig {
    pub name: String,
    pub sticky: Sticky,
    /// Pools and their weights, in the file's order (the order sticky hashing cuts along).
    pub backends: Vec<(PoolIndex, u32)>,
}

pub(super) fn resolve_splits(
    source: &Source,
    splits: &[Spanned<FileSplit>],
    pools: &[PoolConfig],
) -> Result<Vec<SplitConfig>, ConfigError> {
    let mut resolved = Vec::with_capacity(splits.len());
    let mut names = HashSet::new();
    for spanned in splits {
        let split = spanned.get_ref();
        let name = super::check_name(source, &split.name, "split")?;
        if !names.insert(name.clone()) {
            return Err(source.at(&split.name, format!("duplicate split name {name:?}")));
        }
        if pools.iter().any(|pool| pool.name == name) {
            return Err(source.at(
                &split.name,
                format!("split {name:?} has the name of a pool: give it its own"),
            ));
        }
        let sticky = match &split.sticky {
            None => Sticky::None,
            Some(text) => match text.get_ref().as_str() {
                "none" => Sticky::None,
                "source" => Sticky::Source,
                other => {
                    return Err(source.at(
                        text,
                        format!("sticky must be \"none\" or \"source\", not {other:?}"),
                    ));
                }
            },
        };
        let entries = split.backends.get_ref();
        if entries.is_empty() || entries.len() > MAX_BACKENDS {
            return Err(source.at(
                &split.backends,
                format!("split {name:?} needs 1 to {MAX_BACKENDS} backends"),
            ));
        }
        let mut backends: Vec<(PoolIndex, u32)> = Vec::with_capacity(entries.len());
        for entry in entries {
            let backend = entry.get_ref();
            let pool_name = backend.pool.get_ref();
            let pool = pools
                .iter()
                .position(|pool| &pool.name == pool_name)
                .ok_or_else(|| {
                    source.at(
                        &backend.pool,
                        format!(
                            "split {name:?} refers to pool {pool_name:?}, which is not defined"
                        ),
                    )
                })?;
            let pool = PoolIndex(pool as u16);
            if backends.iter().any(|(seen, _)| *seen == pool) {
                return Err(source.at(
                    &backend.pool,
                    format!("pool {pool_name:?} is named twice in split {name:?}"),
                ));
            }
            let weight = super::in_range(source, &backend.weight, "weight", 0..=MAX_SPLIT_WEIGHT)?;
            backends.push((pool, weight));
        }
        if backends.iter().all(|(_, weight)| *weight == 0) {
            return Err(source.at(
                &split.backends,
                format!("every weight of split {name:?} is 0: no client could go anywhere"),
            ));
        }
        resolved.push(SplitConfig {
            name,
            sticky,
            backends,
        });
    }
    if resolved.len() > usize::from(u16::MAX) {
        return Err(source.error(0..0, "too many splits (at most 65535)"));
    }
    Ok(resolved)
}

/// The `pool` or `split` a listener or route names (exactly one of them); `owner` says whose,
/// for the messages.
pub(super) fn resolve_target(
    source: &Source,
    pool: Option<&Spanned<String>>,
    split: Option<&Spanned<String>>,
    at: std::ops::Range<usize>,
    owner: &str,
    pools: &[PoolConfig],
    splits: &[SplitConfig],
) -> Result<Target, ConfigError> {
    match (pool, split) {
        (Some(pool), None) => {
            let name = pool.get_ref();
            pools
                .iter()
                .position(|candidate| &candidate.name == name)
                .map(|index| Target::Pool(PoolIndex(index as u16)))
                .ok_or_else(|| {
                    source.at(
                        pool,
                        format!("{owner} refers to pool {name:?}, which is not defined"),
                    )
                })
        }
        (None, Some(split)) => {
            let name = split.get_ref();
            splits
                .iter()
                .position(|candidate| &candidate.name == name)
                .map(|index| Target::Split(SplitIndex(index as u16)))
                .ok_or_else(|| {
                    source.at(
                        split,
                        format!("{owner} refers to split {name:?}, which is not defined"),
                    )
                })
        }
        (Some(_), Some(split)) => Err(source.at(
            split,
            format!("{owner} has both pool and split: name one of them"),
        )),
        (None, None) => Err(source.error(at, format!("{owner} needs a pool or a split"))),
    }
}

/// `[[split]]` tables as TOML.
pub fn write_splits(
    splits: &[SplitConfig],
    pool_name: impl Fn(PoolIndex) -> String,
    out: &mut String,
) -> fmt::Result {
    for split in splits {
        writeln!(out, "\n[[split]]")?;
        writeln!(out, "name = {:?}", split.name)?;
        writeln!(out, "sticky = \"{}\"", split.sticky.name())?;
        let backends: Vec<String> = split
            .backends
            .iter()
            .map(|(pool, weight)| format!("{{ pool = {:?}, weight = {weight} }}", pool_name(*pool)))
            .collect();
        writeln!(out, "backends = [ {} ]", backends.join(", "))?;
    }
    Ok(())
}
