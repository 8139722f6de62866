//! `fabricd`: the Fabric node daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use fabric::config::Config;
use tracing_subscriber::EnvFilter;

/// The Fabric node daemon: serves this node's volumes to VMs over
/// vhost-user-blk and answers `fabctl` on its API socket.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML config file; every setting has a default.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Data directory (overrides the config file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// API unix socket (overrides the config file).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Also serve the API on this TCP address (overrides the config file).
    #[arg(long)]
    api_tcp: Option<std::net::SocketAddr>,
    /// Directory for vhost-user sockets (overrides the config file).
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    /// Cluster endpoint listen address (overrides `[cluster] listen`).
    #[arg(long)]
    cluster_listen: Option<std::net::SocketAddr>,
    /// Address other nodes reach this one at (overrides `[cluster] advertise`).
    #[arg(long)]
    advertise: Option<std::net::SocketAddr>,
    /// This node's name in the cluster (overrides `[cluster] node_name`).
    #[arg(long)]
    node_name: Option<String>,
    /// Log filter, e.g. "info" or "blockstore=debug" (overrides the config
    /// file and RUST_LOG).
    #[arg(long)]
    log: Option<String>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fabricd: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(socket) = args.api_socket {
        config.api_socket = socket;
    }
    if let Some(address) = args.api_tcp {
        config.api_tcp = Some(address);
    }
    if let Some(dir) = args.socket_dir {
        config.socket_dir = dir;
    }
    if let Some(address) = args.cluster_listen {
        config.cluster.listen = address;
    }
    if let Some(address) = args.advertise {
        config.cluster.advertise = Some(address);
    }
    if let Some(name) = args.node_name {
        config.cluster.node_name = Some(name);
    }
    let filter = match args.log {
        Some(log) => EnvFilter::try_new(log)?,
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&config.log))?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    config.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.async_threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(fabric::daemon::run(config))
}
