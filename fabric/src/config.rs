//! `fabricd`'s configuration file.
//!
//! Every field has a working default, so an empty file (or none) runs a
//! node. Unknown keys are refused, so a typo is an error rather than a
//! silently ignored setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Longest path a unix socket can have (sun_path, without the NUL).
pub const UNIX_SOCKET_PATH_BYTES_MAX: usize = 107;

/// Errors in the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where volumes and metadata live.
    pub data_dir: PathBuf,
    /// The API's unix socket (what `fabctl` talks to).
    pub api_socket: PathBuf,
    /// Optional TCP address for the API as well, e.g. "127.0.0.1:7450".
    pub api_tcp: Option<SocketAddr>,
    /// Where vhost-user sockets of attached volumes are created.
    pub socket_dir: PathBuf,
    /// Open volume data with O_DIRECT where the filesystem allows.
    pub direct_io: bool,
    /// Most virtqueues a frontend may use per volume (one worker thread each).
    pub queues_max: u16,
    /// Commit completed writes at least this often even if the guest never
    /// flushes, in milliseconds (0 disables periodic commits).
    pub commit_interval_ms: u64,
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax.
    pub log: String,
    /// Threads of the async runtime that runs the cluster, the API and
    /// replication (virtqueues and disk I/O have threads of their own).
    /// One keeps a replicated write's hand-offs on one thread, which is
    /// the lowest latency per write; more spread many busy replicated
    /// volumes over more cores.
    pub async_threads: usize,
    /// Cluster membership settings.
    pub cluster: ClusterConfig,
    /// Replication of volumes with more than one replica.
    pub replication: ReplicationConfig,
}

/// The `[replication]` section (see `docs/replication.md`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// How long a replica may take to answer before it is marked stale.
    pub replica_timeout_ms: u64,
    /// How long a guest request may wait in all (for replicas that cannot
    /// store it, a metadata change that cannot commit) before it fails
    /// with an I/O error rather than wait on. Default: 15 s, or twice
    /// `replica_timeout_ms` if that is longer.
    pub io_timeout_ms: Option<u64>,
    /// How often an unreachable replica is tried again.
    pub retry_ms: u64,
    /// Most bytes per second resync copies to one replica (0: no limit).
    pub resync_bytes_per_second: u64,
    /// A replica stale this long is replaced by a full copy on a node
    /// placement picks (0: never automatically).
    pub replace_after_s: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            replica_timeout_ms: 3000,
            io_timeout_ms: None,
            retry_ms: 500,
            resync_bytes_per_second: 200 << 20,
            replace_after_s: 600,
        }
    }
}

impl ReplicationConfig {
    /// The I/O timeout, as set or by default.
    fn io_timeout_ms(&self) -> u64 {
        self.io_timeout_ms
            .unwrap_or_else(|| self.replica_timeout_ms.saturating_mul(2).max(15_000))
    }

    /// The settings replication drivers take.
    pub fn settings(&self) -> crate::replication::ReplicationSettings {
        use std::time::Duration;
        crate::replication::ReplicationSettings {
            replica_timeout: Duration::from_millis(self.replica_timeout_ms),
            io_timeout: Duration::from_millis(self.io_timeout_ms()),
            retry: Duration::from_millis(self.retry_ms),
            resync_bytes_per_second: self.resync_bytes_per_second,
            replace_after: (self.replace_after_s > 0)
                .then(|| Duration::from_secs(self.replace_after_s)),
        }
    }
}

/// The `[cluster]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This node's name in the cluster; the host name if unset.
    pub node_name: Option<String>,
    /// Where the cluster endpoint (QUIC, UDP) listens.
    pub listen: SocketAddr,
    /// Where other nodes reach this one; `listen` if unset.
    pub advertise: Option<SocketAddr>,
    /// Heartbeats between nodes, and when silence makes a node suspect,
    /// then down, in milliseconds.
    pub heartbeat_ms: u64,
    pub suspect_after_ms: u64,
    pub down_after_ms: u64,
    /// Raft timings, in milliseconds.
    pub raft_heartbeat_ms: u64,
    pub raft_election_min_ms: u64,
    pub raft_election_max_ms: u64,
    /// Lets the API cut links to chosen peers. For fault tests only.
    pub fault_injection: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_name: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 7450)),
            advertise: None,
            heartbeat_ms: 500,
            suspect_after_ms: 3000,
            down_after_ms: 15_000,
            raft_heartbeat_ms: 250,
            raft_election_min_ms: 1000,
            raft_election_max_ms: 2000,
            fault_injection: false,
        }
    }
}

impl ClusterConfig {
    /// The settings the cluster runtime takes.
    pub fn settings(&self) -> crate::cluster::runtime::ClusterSettings {
        use std::time::Duration;
        let node_name = self.node_name.clone().unwrap_or_else(host_name);
        crate::cluster::runtime::ClusterSettings {
            node_name,
            listen: self.listen,
            advertise: self.advertise,
            timings: crate::cluster::health::HealthTimings {
                heartbeat: Duration::from_millis(self.heartbeat_ms),
                suspect_after: Duration::from_millis(self.suspect_after_ms),
                down_after: Duration::from_millis(self.down_after_ms),
            },
            raft_heartbeat_ms: self.raft_heartbeat_ms,
            raft_election_min_ms: self.raft_election_min_ms,
            raft_election_max_ms: self.raft_election_max_ms,
            fault_injection: self.fault_injection,
        }
    }
}

/// The machine's host name, or "fabric-node" if it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "fabric-node".into())
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("/var/lib/fabric"),
            api_socket: PathBuf::from("/run/fabric/api.sock"),
            api_tcp: None,
            socket_dir: PathBuf::from("/run/fabric/vhost"),
            direct_io: true,
            queues_max: 4,
            commit_interval_ms: 5000,
            log: "info".into(),
            async_threads: 1,
            cluster: ClusterConfig::default(),
            replication: ReplicationConfig::default(),
        }
    }
}

impl Config {
    /// Reads a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses config text.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=256).contains(&self.async_threads) {
            return Err(ConfigError::Invalid {
                key: "async_threads",
                reason: format!("{} is outside 1..=256", self.async_threads),
            });
        }
        if !(1..=64).contains(&self.queues_max) {
            return Err(ConfigError::Invalid {
                key: "queues_max",
                reason: format!("{} is outside 1..=64", self.queues_max),
            });
        }
        if self.api_socket.as_os_str().len() > UNIX_SOCKET_PATH_BYTES_MAX {
            return Err(ConfigError::Invalid {
                key: "api_socket",
                reason: format!(
                    "{} is longer than the {UNIX_SOCKET_PATH_BYTES_MAX} bytes a unix socket path may have",
                    self.api_socket.display()
                ),
            });
        }
        self.cluster
            .settings()
            .timings
            .validate()
            .map_err(|reason| ConfigError::Invalid {
                key: "cluster",
                reason,
            })?;
        if self.cluster.raft_election_min_ms >= self.cluster.raft_election_max_ms
            || self.cluster.raft_heartbeat_ms >= self.cluster.raft_election_min_ms
        {
            return Err(ConfigError::Invalid {
                key: "cluster",
                reason: "need raft_heartbeat_ms < raft_election_min_ms < raft_election_max_ms"
                    .into(),
            });
        }
        let replication = &self.replication;
        const HOUR_MS: u64 = 3_600_000;
        if !(10..=HOUR_MS).contains(&replication.replica_timeout_ms)
            || !(10..=HOUR_MS).contains(&replication.retry_ms)
        {
            return Err(ConfigError::Invalid {
                key: "replication",
                reason: "replica_timeout_ms and retry_ms must be 10 to 3600000".into(),
            });
        }
        if replication.io_timeout_ms() <= replication.replica_timeout_ms
            || replication.io_timeout_ms() > 2 * HOUR_MS
        {
            return Err(ConfigError::Invalid {
                key: "replication.io_timeout_ms",
                reason: "must be longer than replica_timeout_ms, and at most 7200000".into(),
            });
        }
        if replication.replace_after_s > 30 * 24 * 3600 {
            return Err(ConfigError::Invalid {
                key: "replication.replace_after_s",
                reason: "at most 30 days (2592000); 0 for never".into(),
            });
        }
        if replication.resync_bytes_per_second != 0
            && replication.resync_bytes_per_second < crate::replication::REGION_BYTES
        {
            return Err(ConfigError::Invalid {
                key: "replication.resync_bytes_per_second",
                reason: format!(
                    "{} is below one region ({} bytes) per second; use 0 for no limit",
                    replication.resync_bytes_per_second,
                    crate::replication::REGION_BYTES
                ),
            });
        }
        if replication.replace_after_s != 0
            && replication.replace_after_s * 1000 <= replication.replica_timeout_ms
        {
            return Err(ConfigError::Invalid {
                key: "replication.replace_after_s",
                reason: "must be longer than replica_timeout_ms (or 0: never)".into(),
            });
        }
        // A volume socket is socket_dir/<name>.sock with names up to 63 bytes.
        let longest = self.socket_dir.as_os_str().len() + 1 + 63 + 5;
        if longest > UNIX_SOCKET_PATH_BYTES_MAX {
            return Err(ConfigError::Invalid {
                key: "socket_dir",
                reason: format!(
                    "{} is too long: volume sockets in it could exceed the {UNIX_SOCKET_PATH_BYTES_MAX}-byte limit of unix socket paths; use a directory of at most 38 bytes",
                    self.socket_dir.display()
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn settings_and_errors() {
        let config =
            Config::parse("data_dir = \"/srv/f\"\napi_tcp = \"127.0.0.1:7450\"\nqueues_max = 2\n")
                .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/srv/f"));
        assert_eq!(config.queues_max, 2);
        let typo = Config::parse("data_dri = \"/x\"").unwrap_err();
        assert!(typo.contains("unknown field"), "{typo}");
        let wrong_type = Config::parse("queues_max = \"many\"").unwrap_err();
        assert!(wrong_type.contains("queues_max"), "{wrong_type}");
        let zero = Config {
            queues_max: 0,
            ..Config::default()
        };
        assert!(zero.validate().is_err());
        let no_threads = Config {
            async_threads: 0,
            ..Config::default()
        };
        assert!(no_threads
            .validate()
            .unwrap_err()
            .to_string()
            .contains("async_threads"));
        let long = Config {
            socket_dir: PathBuf::from("/".repeat(60)),
            ..Config::default()
        };
        assert!(long
            .validate()
            .unwrap_err()
            .to_string()
            .contains("socket_dir"));
        let replication = Config::parse(
            "[replication]\nreplica_timeout_ms = 1000\nresync_bytes_per_second = 0\nreplace_after_s = 0\n",
        )
        .unwrap();
        assert!(replication.validate().is_ok());
        let settings = replication.replication.settings();
        assert_eq!(settings.replica_timeout, std::time::Duration::from_secs(1));
        assert_eq!(settings.replace_after, None);
        assert_eq!(settings.io_timeout, std::time::Duration::from_secs(15));
        // The I/O timeout follows a long replica timeout unless set; set,
        // it must be the longer.
        let patient = Config::parse("[replication]\nreplica_timeout_ms = 20000\n").unwrap();
        assert!(patient.validate().is_ok());
        assert_eq!(
            patient.replication.settings().io_timeout,
            std::time::Duration::from_secs(40)
        );
        let short =
            Config::parse("[replication]\nreplica_timeout_ms = 3000\nio_timeout_ms = 2000\n")
                .unwrap();
        let error = short.validate().unwrap_err().to_string();
        assert!(error.contains("io_timeout_ms"), "{error}");
        let slow = Config::parse("[replication]\nresync_bytes_per_second = 4096\n").unwrap();
        let error = slow.validate().unwrap_err().to_string();
        assert!(error.contains("resync_bytes_per_second"), "{error}");
        let typo = Config::parse("[replication]\nreplica_timeout = 5\n").unwrap_err();
        assert!(typo.contains("unknown field"), "{typo}");
    }
}
