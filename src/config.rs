//! Command line and environment configuration (`clap`, every flag with a `KEYGATE_*` twin).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::authz::{ClientIpSource, DecisionConfig};
use crate::domain::Limits;

#[derive(Debug, Parser)]
#[command(
    name = "keygate",
    version,
    about = "Consumer-key authorization and vendor-key injection for Envoy AI gateways"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "KEYGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Everything in one process: admin API, store, snapshot builder and ext_authz.
    Serve(ServeArgs),
    /// Admin API, store and snapshot distribution to `keygate authz` data planes.
    ControlPlane(ControlPlaneArgs),
    /// An ext_authz data plane that subscribes to a control plane.
    Authz(AuthzArgs),
    /// Benchmark tools: load generator, null ext_authz, bulk key seeding.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Drive Authorization/Check over gRPC and report throughput and latency percentiles.
    Load(LoadArgs),
    /// Serve an ext_authz that answers OK and does nothing (the architecture's ceiling).
    Null {
        #[arg(long, default_value = "127.0.0.1:9101")]
        addr: SocketAddr,
    },
    /// Load N consumer keys (values `kg-bench-…`, see `keygate bench load --keys`) bound to
    /// one consumer, plus a model service with one model key, in one transaction.
    Seed(SeedArgs),
    /// Build a snapshot of N synthetic keys in memory: build time and resident bytes per key.
    Snapshot {
        #[arg(long, default_value_t = 1_000_000)]
        keys: u64,
    },
    /// Admin churn (toggle keys at a fixed rate) and disable→deny propagation trials against
    /// a running `keygate serve`.
    Churn(ChurnArgs),
}

#[derive(Clone, Debug, Args)]
pub struct ChurnArgs {
    /// The admin listener.
    #[arg(long, default_value = "127.0.0.1:9002")]
    pub admin: SocketAddr,
    /// The ext_authz listener (for propagation trials).
    #[arg(long, default_value = "127.0.0.1:9001")]
    pub authz: SocketAddr,
    /// Admin token file.
    #[arg(long)]
    pub admin_token_file: PathBuf,
    /// Changes per second for `--duration` (0: none).
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: std::time::Duration,
    /// Disable→first-deny trials to run after the churn (0: none).
    #[arg(long, default_value_t = 0)]
    pub trials: u32,
    /// Consumer and model service the trial keys use (must exist, e.g. from `bench seed`).
    #[arg(long, default_value = "bench")]
    pub consumer: String,
    #[arg(long, default_value = "bench")]
    pub model_service: String,
}

#[derive(Clone, Debug, Args)]
pub struct LoadArgs {
    /// The ext_authz server to load.
    #[arg(long, default_value = "127.0.0.1:9001")]
    pub target: SocketAddr,
    /// A second server measured in alternating rounds (e.g. `keygate bench null`); the report
    /// gives target/baseline ratios.
    #[arg(long)]
    pub baseline: Option<SocketAddr>,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// Measured time per round, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: std::time::Duration,
    /// Unmeasured warm-up per round.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: std::time::Duration,
    /// Rounds (alternating with the baseline when one is given).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Present seeded keys 0..N (see `keygate bench seed`).
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Percentage of requests with an unknown key (denied).
    #[arg(long, default_value_t = 0)]
    pub unknown_percent: u8,
    /// The route's model service.
    #[arg(long, default_value = "bench")]
    pub model_service: String,
}

#[derive(Clone, Debug, Args)]
pub struct SeedArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// How many consumer keys.
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Consumer (created if missing).
    #[arg(long, default_value = "bench")]
    pub consumer: String,
    /// Model service (created with one model key if missing).
    #[arg(long, default_value = "bench")]
    pub model_service: String,
    /// Index of the first seeded key (`bench-<i>`, value `kg-bench-<i, 20 digits>-…`), so a
    /// second seeding can add keys under another consumer.
    #[arg(long, default_value_t = 0)]
    pub first: u64,
    /// Requests per minute of the consumer, when it is created (0: none).
    #[arg(long, default_value_t = 0)]
    pub requests_per_minute: u32,
    /// Tokens per minute of the consumer, when it is created (0: none).
    #[arg(long, default_value_t = 0)]
    pub tokens_per_minute: u64,
}

/// Where the store and its master key live (shared by `serve` and the tools that open a store).
#[derive(Clone, Debug, Args)]
pub struct StoreArgs {
    /// Directory for the embedded store, master key and admin token (created mode 0700).
    #[arg(long, env = "KEYGATE_DATA_DIR", default_value = "./keygate-data")]
    pub data_dir: PathBuf,

    /// Store URL: sqlite://PATH (default: <data-dir>/keygate.db) or postgres://…
    #[arg(long, env = "KEYGATE_STORE", hide_env_values = true)]
    pub store: Option<crate::crypto::SecretUrl>,

    /// Master key file (32 bytes raw, hex or base64). Default: <data-dir>/master.key, created on first start.
    #[arg(long, env = "KEYGATE_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
}

/// `keygate control-plane`: admin API, store and snapshot distribution.
#[derive(Clone, Debug, Args)]
pub struct ControlPlaneArgs {
    #[command(flatten)]
    pub store: StoreArgs,

    /// KeyAdmin gRPC listener (with health, reflection and, unless --distribution-addr moves
    /// it, the snapshot stream data planes subscribe to).
    #[arg(long, env = "KEYGATE_ADMIN_ADDR", default_value = "127.0.0.1:9002")]
    pub admin_addr: SocketAddr,

    /// Serve the snapshot stream on its own listener instead of the admin one.
    #[arg(long, env = "KEYGATE_DISTRIBUTION_ADDR")]
    pub distribution_addr: Option<SocketAddr>,

    /// Most concurrent snapshot subscriptions (data planes); more are refused with
    /// RESOURCE_EXHAUSTED (`distribution::DEFAULT_MAX_SUBSCRIBERS`).
    #[arg(long, env = "KEYGATE_MAX_SUBSCRIBERS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_subscribers: u32,

    /// HTTP listener for /metrics (Prometheus), /healthz and /readyz.
    #[arg(long, env = "KEYGATE_METRICS_ADDR", default_value = "127.0.0.1:9003")]
    pub metrics_addr: SocketAddr,

    /// File holding the admin token. Default: <data-dir>/admin.token, created on first start.
    /// KEYGATE_ADMIN_TOKEN supplies the token directly and takes precedence.
    #[arg(long, env = "KEYGATE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Turn the bootstrap admin token off (admin.token / KEYGATE_ADMIN_TOKEN): only named
    /// admin tokens open the admin API. Refused at start unless a named ADMIN token exists.
    #[arg(long, env = "KEYGATE_NO_BOOTSTRAP_TOKEN")]
    pub no_bootstrap_token: bool,

    /// With --tls-client-ca: a file mapping client certificates (subject CN or a SAN) to an
    /// admin name and role, one "cn:VALUE NAME ROLE" or "san:VALUE NAME ROLE" a line; such a
    /// caller needs no token.
    #[arg(long, env = "KEYGATE_ADMIN_IDENTITIES")]
    pub admin_identities: Option<PathBuf>,

    /// File holding the subscriber token data planes present (KEYGATE_SUBSCRIBER_TOKEN
    /// supplies it directly). Without one, no data plane can subscribe.
    #[arg(long, env = "KEYGATE_SUBSCRIBER_TOKEN_FILE")]
    pub subscriber_token_file: Option<PathBuf>,

    // Both limits default to `Limits::default()` (the SPEC's), written once in `domain`.
    /// Most consumer keys one consumer may hold.
    #[arg(long, env = "KEYGATE_MAX_KEYS_PER_CONSUMER", default_value_t = Limits::default().max_keys_per_consumer)]
    pub max_keys_per_consumer: usize,

    /// Most entries one IP allowlist may hold.
    #[arg(long, env = "KEYGATE_MAX_IP_ALLOWLIST", default_value_t = Limits::default().max_ip_allowlist)]
    pub max_ip_allowlist: usize,

    /// Grace period for in-flight requests at shutdown, e.g. 10s.
    #[arg(long, env = "KEYGATE_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: std::time::Duration,

    /// Root of the `file` secret provider (Kubernetes-mounted secrets or Vault Agent output:
    /// <dir>/<name>, or <dir>/<name>/<version>). Without it, only the `env` provider exists.
    #[arg(long, env = "KEYGATE_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,

    /// How long a resolved secret is used before it is read again (refreshed in the
    /// background shortly before it expires), e.g. 5m or 30s.
    #[arg(long, env = "KEYGATE_SECRET_TTL", default_value = "5m", value_parser = parse_secret_ttl)]
    pub secret_ttl: std::time::Duration,

    #[command(flatten)]
    pub tls: ServerTlsArgs,
}

fn parse_secret_ttl(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d < std::time::Duration::from_millis(100) {
        return Err(format!("{s:?}: the secret TTL must be at least 100ms"));
    }
    Ok(d)
}

/// `keygate serve`: the control plane and an ext_authz data plane in one process.
#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub control_plane: ControlPlaneArgs,

    #[command(flatten)]
    pub authz: AuthzListenArgs,

    #[command(flatten)]
    pub data_plane: DataPlaneArgs,
}

/// Where the ext_authz listener is, and who may reach it (SPEC §9 "Who may call Check": an
/// OK answer carries the vendor key, so only Envoy may call).
#[derive(Clone, Debug, Args)]
pub struct AuthzListenArgs {
    /// Envoy ext_authz gRPC listener: HOST:PORT (loopback unless --tls-client-ca or
    /// --allow-unauthenticated-authz) or unix:/PATH (a Unix domain socket, mode 0660).
    #[arg(long, env = "KEYGATE_AUTHZ_ADDR", default_value = "127.0.0.1:9001")]
    pub authz_addr: AuthzAddr,

    /// Serve ext_authz on a non-loopback address without client certificates: only when the
    /// network itself guarantees that nothing but Envoy can reach it.
    #[arg(long, env = "KEYGATE_ALLOW_UNAUTHENTICATED_AUTHZ")]
    pub allow_unauthenticated_authz: bool,
}

/// The ext_authz listener's address: TCP, or a Unix domain socket (Envoy's `pipe`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthzAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for AuthzAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: unix: needs an absolute path, e.g. unix:/run/keygate/authz.sock"
                ));
            }
            return Ok(AuthzAddr::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(AuthzAddr::Tcp)
            .map_err(|_| format!("{s:?}: expected HOST:PORT (e.g. 127.0.0.1:9001) or unix:/PATH"))
    }
}

impl std::fmt::Display for AuthzAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthzAddr::Tcp(a) => write!(f, "{a}"),
            AuthzAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// TLS on gRPC listeners (rustls). mTLS when a client CA is given.
#[derive(Clone, Debug, Args, Default)]
pub struct ServerTlsArgs {
    /// PEM certificate chain for this process's gRPC listeners.
    #[arg(long, env = "KEYGATE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "KEYGATE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: clients must present a certificate it signed (mTLS).
    #[arg(long, env = "KEYGATE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

/// `keygate authz`: an ext_authz data plane fed by a control plane.
#[derive(Clone, Debug, Args)]
pub struct AuthzArgs {
    /// The control plane's snapshot stream, e.g. http://10.0.0.5:9002 (https:// with TLS).
    #[arg(long, env = "KEYGATE_CONTROL_PLANE")]
    pub control_plane: String,

    #[command(flatten)]
    pub authz: AuthzListenArgs,

    /// HTTP listener for /metrics (Prometheus), /healthz and /readyz.
    #[arg(long, env = "KEYGATE_METRICS_ADDR", default_value = "127.0.0.1:9003")]
    pub metrics_addr: SocketAddr,

    /// Where the encrypted last-good snapshot is kept (created mode 0700).
    #[arg(long, env = "KEYGATE_DATA_DIR", default_value = "./keygate-authz-data")]
    pub data_dir: PathBuf,

    /// The control plane's master key (default <data-dir>/master.key; never generated here).
    #[arg(long, env = "KEYGATE_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,

    /// File holding the subscriber token (KEYGATE_SUBSCRIBER_TOKEN supplies it directly).
    #[arg(long, env = "KEYGATE_SUBSCRIBER_TOKEN_FILE")]
    pub subscriber_token_file: Option<PathBuf>,

    #[command(flatten)]
    pub data_plane: DataPlaneArgs,

    #[command(flatten)]
    pub tls: ServerTlsArgs,

    /// PEM CA bundle that signed the control plane's certificate (for https://).
    #[arg(long, env = "KEYGATE_CONTROL_PLANE_CA")]
    pub control_plane_ca: Option<PathBuf>,
    /// PEM client certificate presented to the control plane (mTLS).
    #[arg(long, env = "KEYGATE_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key for --client-cert.
    #[arg(long, env = "KEYGATE_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,

    /// Grace period for in-flight requests at shutdown.
    #[arg(long, env = "KEYGATE_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: std::time::Duration,
}

/// How the data plane reads requests.
#[derive(Clone, Debug, Args)]
pub struct DataPlaneArgs {
    /// Headers that carry the consumer key, in order of preference.
    #[arg(
        long,
        env = "KEYGATE_CREDENTIAL_HEADERS",
        value_delimiter = ',',
        default_value = "authorization,x-api-key,api-key"
    )]
    pub credential_headers: Vec<String>,

    /// Query parameter that carries the consumer key (off unless set, e.g. "key").
    #[arg(long, env = "KEYGATE_CREDENTIAL_QUERY_PARAM")]
    pub credential_query_param: Option<String>,

    /// Client address for IP allowlists: "peer" (Envoy's downstream peer) or "xff:N"
    /// (N-th address from the right of x-forwarded-for).
    #[arg(long, env = "KEYGATE_CLIENT_IP_FROM", default_value = "peer")]
    pub client_ip_from: ClientIpSource,

    /// How often metered usage (tokens per key, service and model) is reported: to the
    /// control plane (`keygate authz`) or to the store (`keygate serve`). Also at shutdown.
    #[arg(long, env = "KEYGATE_USAGE_REPORT_INTERVAL", default_value = "1s", value_parser = parse_report_interval)]
    pub usage_report_interval: std::time::Duration,

    /// Share rate-limit counts with the other data planes through this Redis
    /// (redis://HOST:PORT[/DB] or redis+unix:///PATH). Without it each data plane counts
    /// its own requests and tokens. No request waits on Redis: counts are synchronised in
    /// batches, and while Redis cannot be reached each data plane enforces its own counts.
    #[arg(long, env = "KEYGATE_RATE_LIMIT_REDIS", hide_env_values = true)]
    pub rate_limit_redis: Option<crate::crypto::SecretUrl>,

    /// How often rate-limit counts are synchronised through --rate-limit-redis: the
    /// overshoot sharing allows is about one interval's traffic across the data planes.
    #[arg(long, env = "KEYGATE_RATE_LIMIT_SYNC_INTERVAL", default_value = "200ms", value_parser = parse_sync_interval)]
    pub rate_limit_sync_interval: std::time::Duration,
}

fn parse_sync_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d < std::time::Duration::from_millis(10) || d > std::time::Duration::from_secs(60) {
        return Err(format!("{s:?} must be between 10ms and 60s"));
    }
    Ok(d)
}

fn parse_report_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d < std::time::Duration::from_millis(100) || d > std::time::Duration::from_secs(3600) {
        return Err(format!("{s:?} must be between 100ms and 1h"));
    }
    Ok(d)
}

pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(secs));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?}: {e} (expected e.g. 500ms, 10s, 5m, 1h)"))
}

impl DataPlaneArgs {
    /// Validates and lower-cases the credential settings.
    pub fn decision_config(&self) -> Result<DecisionConfig, String> {
        DecisionConfig::new(
            &self.credential_headers,
            self.credential_query_param.clone(),
            self.client_ip_from,
        )
        .map_err(|(field, why)| format!("--{}: {why}", field.replace('_', "-")))
    }
}

impl ControlPlaneArgs {
    pub fn limits(&self) -> Result<Limits, String> {
        if self.max_keys_per_consumer == 0 {
            return Err("--max-keys-per-consumer must be at least 1".into());
        }
        Ok(Limits {
            max_keys_per_consumer: self.max_keys_per_consumer,
            max_ip_allowlist: self.max_ip_allowlist,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Store and Redis URLs may carry passwords: the parsed configuration keeps them for
    /// connecting and never shows them in `Debug` (what a log of the configuration prints).
    #[test]
    fn passwords_in_urls_never_show_in_debug() {
        let cli = Cli::try_parse_from([
            "keygate",
            "serve",
            "--store",
            "postgres://keygate:pg-s3cr3t@db.internal:5432/keygate",
            "--rate-limit-redis",
            "redis://:redis-s3cr3t@10.0.0.7:6379/1",
        ])
        .unwrap();
        let Command::Serve(args) = &cli.command else {
            panic!("serve parsed as {:?}", cli.command)
        };
        assert_eq!(
            args.control_plane.store.store.as_ref().map(|u| u.expose()),
            Some("postgres://keygate:pg-s3cr3t@db.internal:5432/keygate")
        );
        assert_eq!(
            args.data_plane
                .rate_limit_redis
                .as_ref()
                .map(|u| u.expose()),
            Some("redis://:redis-s3cr3t@10.0.0.7:6379/1")
        );
        let shown = format!("{cli:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("db.internal:5432/keygate"), "{shown}");
        // `--help` names the environment variables without their values (found in review:
        // it printed `[env: KEYGATE_STORE=<the URL>]` when the variable was set).
        use clap::CommandFactory;
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").unwrap();
        for id in ["store", "rate_limit_redis"] {
            let arg = serve.get_arguments().find(|a| a.get_id() == id).unwrap();
            assert!(arg.is_hide_env_values_set(), "{id}");
        }
    }
}
