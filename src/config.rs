//! `$CAIRN_HOME/config.toml`: the grid's servers and encoding parameters.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::Params;

pub const DEFAULT_SEGMENT_SIZE: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub grid: GridConfig,
    #[serde(default)]
    pub namespace: NamespaceConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(rename = "server")]
    pub servers: Vec<ServerConfig>,
}

/// Publishing the namespace to the grid (docs/ARCHITECTURE.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Seconds between publications while mounted (only if something
    /// changed); `cairn sync` publishes at once.
    #[serde(default = "default_namespace_interval")]
    pub interval_secs: u64,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        NamespaceConfig {
            interval_secs: default_namespace_interval(),
        }
    }
}

fn default_namespace_interval() -> u64 {
    300
}

/// Several machines on one drive (docs/SEVERAL_MACHINES.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Milliseconds between looks for other machines' changes (one read of
    /// the doorbell from each server) while mounted; this machine's
    /// changes are published on the same beat.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// This machine checkpoints its own log (sync::checkpoint) once its
    /// records since the last checkpoint hold this many KiB, or a tenth of
    /// that checkpoint's size if more.
    #[serde(default = "default_checkpoint_kib")]
    pub checkpoint_kib: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            poll_ms: default_poll_ms(),
            checkpoint_kib: default_checkpoint_kib(),
        }
    }
}

fn default_poll_ms() -> u64 {
    1000
}

fn default_checkpoint_kib() -> u64 {
    1024
}

/// Which committed versions `cairn gc` keeps, as backup tools thin:
/// each file's newest always and its last `keep_versions`; every version
/// younger than `keep_all_minutes`, then the newest of each hour for
/// `keep_hourly_hours`, then the newest of each day for `keep_days`
/// (deleted files' versions alike). No window reaches past `keep_days`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    #[serde(default = "default_keep_versions")]
    pub keep_versions: u32,
    #[serde(default = "default_keep_days")]
    pub keep_days: u32,
    #[serde(default = "default_keep_all_minutes")]
    pub keep_all_minutes: u32,
    #[serde(default = "default_keep_hourly_hours")]
    pub keep_hourly_hours: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep_versions: default_keep_versions(),
            keep_days: default_keep_days(),
            keep_all_minutes: default_keep_all_minutes(),
            keep_hourly_hours: default_keep_hourly_hours(),
        }
    }
}

fn default_keep_all_minutes() -> u32 {
    60
}
fn default_keep_hourly_hours() -> u32 {
    24
}

fn default_keep_versions() -> u32 {
    10
}
fn default_keep_days() -> u32 {
    30
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GridConfig {
    /// k: shares needed to rebuild a version.
    pub needed: u16,
    /// Servers that must hold a share before a version commits.
    pub happy: u16,
    /// n: shares written for each version.
    pub total: u16,
    /// Bytes of plaintext per segment.
    #[serde(default = "default_segment_size")]
    pub segment_size: u32,
    /// Seconds before a server request counts as failed.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// MiB of share blocks held in memory across all uploads at once.
    #[serde(default = "default_memory_budget_mib")]
    pub memory_budget_mib: u64,
    /// MiB of share blocks spilled to disk for servers that fall behind;
    /// unset means 10% of the free space where the spill queue lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spill_limit_mib: Option<u64>,
    /// Milliseconds a read waits for a server before asking another one
    /// for the same segment as well.
    #[serde(default = "default_hedge_after_ms")]
    pub hedge_after_ms: u64,
}

fn default_segment_size() -> u32 {
    DEFAULT_SEGMENT_SIZE
}
fn default_timeout_secs() -> u64 {
    30
}
fn default_memory_budget_mib() -> u64 {
    64
}
fn default_hedge_after_ms() -> u64 {
    300
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub name: String,
    /// Back end kind: `dir` (a local or mounted directory) or `s3` (an
    /// S3-compatible object store).
    pub backend: String,
    /// For `dir`: the directory holding this server's shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// For `s3`: the service URL, such as `http://127.0.0.1:3900`; unset
    /// means AWS itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// For `s3`: the bucket, which must exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// For `s3`: the region (default `us-east-1`; Garage uses `garage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// For `s3`: a key prefix, so several grids can share a bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// For `s3`: path-style requests (`endpoint/bucket/key`, default true)
    /// or virtual-hosted ones (`bucket.endpoint/key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    /// For `s3`: credentials. Unset means $AWS_ACCESS_KEY_ID and
    /// $AWS_SECRET_ACCESS_KEY, else `credentials_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<String>,
    /// For `s3`: an AWS-style credentials file (default
    /// `~/.aws/credentials`) and the profile to use in it (default
    /// $AWS_PROFILE, else `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// For `s3`: MiB per multipart part (default 5, the S3 minimum). A share
    /// smaller than one part is stored with a single PUT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_size_mib: Option<u64>,
    /// Testing aid: faults injected into this server's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<FaultConfig>,
}

/// Faults a server can be made to show, for tests and drills: a real local
/// directory cannot be made slow, stalled, flaky, full or lying on demand.
/// Every field defaults to "no fault".
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// Added before every request.
    #[serde(default)]
    pub delay_ms: u64,
    /// Every request hangs: the server accepts and never answers.
    #[serde(default)]
    pub stall: bool,
    /// Requests hang while this file exists (a stall that can be lifted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_flag: Option<PathBuf>,
    /// Share writes hang once this many bytes were written (a mid-upload stall).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_after_bytes: Option<u64>,
    /// Fraction (0 to 1) of requests that fail with an I/O error.
    #[serde(default)]
    pub error_rate: f64,
    /// Fraction (0 to 1) of reads that return one flipped bit.
    #[serde(default)]
    pub corrupt_read_rate: f64,
    /// The server is full after this many bytes of share writes: more fail
    /// with "no space left on device".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
    /// Seed of the error and corruption draws, for repeatable runs.
    #[serde(default)]
    pub seed: u64,
}

impl Config {
    /// The embedded default: `servers` local directory servers under
    /// `home/servers/`, 3-of-5 with happiness 4.
    pub fn embedded_default(home: &Path) -> Config {
        Config {
            grid: GridConfig {
                needed: 3,
                happy: 4,
                total: 5,
                segment_size: DEFAULT_SEGMENT_SIZE,
                timeout_secs: default_timeout_secs(),
                memory_budget_mib: default_memory_budget_mib(),
                spill_limit_mib: None,
                hedge_after_ms: default_hedge_after_ms(),
            },
            namespace: NamespaceConfig::default(),
            retention: RetentionConfig::default(),
            sync: SyncConfig::default(),
            servers: (1..=5)
                .map(|i| ServerConfig {
                    name: format!("s{i}"),
                    backend: "dir".into(),
                    path: Some(home.join("servers").join(format!("s{i}"))),
                    ..Default::default()
                })
                .collect(),
        }
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let field = |field: &str, message: String| ConfigError::Field {
            path: path.to_owned(),
            field: field.to_string(),
            message,
        };
        let g = &self.grid;
        if g.needed == 0 {
            return Err(field("grid.needed", "must be at least 1".into()));
        }
        if g.total < g.needed || g.total > crate::codec::MAX_SHARES {
            return Err(field(
                "grid.total",
                format!(
                    "{} must be between needed ({}) and {}",
                    g.total,
                    g.needed,
                    crate::codec::MAX_SHARES
                ),
            ));
        }
        // needed and total are valid by now: what the codec refuses is the
        // segment size.
        if let Err(e) = Params::new(g.needed, g.total, g.segment_size) {
            return Err(field("grid.segment_size", e.to_string()));
        }
        if g.happy < g.needed || g.happy > g.total {
            return Err(field(
                "grid.happy",
                format!(
                    "{} must be between needed ({}) and total ({})",
                    g.happy, g.needed, g.total
                ),
            ));
        }
        // Upper bounds keep the byte counts derived from them far from
        // overflow, and catch a mistyped unit.
        for (name, value, max) in [
            ("grid.timeout_secs", g.timeout_secs, 86_400),
            ("grid.memory_budget_mib", g.memory_budget_mib, 1 << 20),
            ("grid.hedge_after_ms", g.hedge_after_ms.max(1), 3_600_000),
            ("grid.spill_limit_mib", g.spill_limit_mib.unwrap_or(1).max(1), 1 << 30),
            ("sync.checkpoint_kib", self.sync.checkpoint_kib, 1 << 30),
        ] {
            if !(1..=max).contains(&value) {
                return Err(field(name, format!("{value} must be between 1 and {max}")));
            }
        }
        // Days become nanoseconds in gc's plan: 100 years keeps far from i64's end.
        for (name, value, max) in [
            ("retention.keep_days", u64::from(self.retention.keep_days), 36_500),
            (
                "retention.keep_all_minutes",
                u64::from(self.retention.keep_all_minutes),
                36_500 * 1440,
            ),
            (
                "retention.keep_hourly_hours",
                u64::from(self.retention.keep_hourly_hours),
                36_500 * 24,
            ),
            ("namespace.interval_secs", self.namespace.interval_secs, 86_400 * 365),
            ("sync.poll_ms", self.sync.poll_ms, 3_600_000),
        ] {
            if value > max {
                return Err(field(name, format!("{value} must be at most {max}")));
            }
        }
        if self.servers.len() < g.total as usize {
            return Err(field(
                "server",
                format!(
                    "{} servers configured, but total = {} shares each need a distinct server",
                    self.servers.len(),
                    g.total
                ),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.servers.iter().enumerate() {
            let at = |f: &str| format!("server[{i}].{f}");
            // Names become file names (the S3 journal's directory): no
            // "..", no separators, nothing that starts with a dot.
            let mut chars = s.name.chars();
            let name_ok = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                && s.name.len() <= 64;
            if !name_ok {
                return Err(field(
                    &at("name"),
                    format!(
                        "{:?} must be 1 to 64 of A-Z a-z 0-9 _ - . and not start with a dot",
                        s.name
                    ),
                ));
            }
            if !names.insert(&s.name) {
                return Err(field(&at("name"), format!("{:?} is used twice", s.name)));
            }
            if let Some(f) = &s.faults {
                for (name, rate) in [("error_rate", f.error_rate), ("corrupt_read_rate", f.corrupt_read_rate)] {
                    if !(0.0..=1.0).contains(&rate) {
                        return Err(field(
                            &at(&format!("faults.{name}")),
                            format!("{rate} must be between 0 and 1"),
                        ));
                    }
                }
            }
            match s.backend.as_str() {
                "dir" => match &s.path {
                    Some(p) if p.is_absolute() => {}
                    Some(p) => return Err(field(&at("path"), format!("{} must be an absolute path", p.display()))),
                    None => return Err(field(&at("path"), "is required for backend \"dir\"".into())),
                },
                "s3" => {
                    if s.bucket.as_deref().is_none_or(str::is_empty) {
                        return Err(field(&at("bucket"), "is required for backend \"s3\"".into()));
                    }
                    if let Some(e) = &s.endpoint {
                        if !(e.starts_with("http://") || e.starts_with("https://")) {
                            return Err(field(
                                &at("endpoint"),
                                format!("{e:?} must start with http:// or https://"),
                            ));
                        }
                    }
                    if s.access_key_id.is_some() != s.secret_access_key.is_some() {
                        return Err(field(
                            &at("secret_access_key"),
                            "access_key_id and secret_access_key go together".into(),
                        ));
                    }
                    if s.part_size_mib == Some(0) {
                        return Err(field(&at("part_size_mib"), "must be at least 1".into()));
                    }
                }
                other => {
                    return Err(field(
                        &at("backend"),
                        format!("unknown back end {other:?} (known: \"dir\", \"s3\")"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Creates `home` with this config and the directories of its `dir`
    /// servers. Refuses to overwrite an existing config.
    pub fn write_new(&self, home: &Path) -> anyhow::Result<()> {
        self.write_config(home)?;
        for dir in self.servers.iter().filter_map(|s| s.path.as_ref()) {
            use anyhow::Context;
            std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        }
        Ok(())
    }

    /// Writes this config as `home`'s, creating no server directory: for a
    /// grid that exists already (`cairn recover`), where a missing one is a
    /// server that is not mounted, not one to make afresh on the local disk.
    pub fn write_config(&self, home: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        let path = home.join("config.toml");
        if path.exists() {
            anyhow::bail!("{} already exists; remove it to start a new grid", path.display());
        }
        crate::home::make_private_dir_all(home).with_context(|| home.display().to_string())?;
        // Owner-only: S3 entries may hold secret keys.
        use std::io::Write;
        crate::sys::create_private(&path)
            .and_then(|mut f| f.write_all(self.to_toml().as_bytes()))
            .with_context(|| path.display().to_string())?;
        Ok(())
    }

    pub fn params(&self) -> Params {
        Params::new(self.grid.needed, self.grid.total, self.grid.segment_size).expect("validated")
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.grid.timeout_secs)
    }

    pub fn hedge_after(&self) -> Duration {
        Duration::from_millis(self.grid.hedge_after_ms)
    }
}

/// `$CAIRN_HOME`, else `$XDG_DATA_HOME/cairn`, else `~/.local/share/cairn`.
pub fn home_dir() -> anyhow::Result<PathBuf> {
    if let Some(h) = std::env::var_os("CAIRN_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("cairn"));
    }
    let home = std::env::var_os("HOME").ok_or_else(|| anyhow::anyhow!("set CAIRN_HOME or HOME"))?;
    Ok(PathBuf::from(home).join(".local/share/cairn"))
}
