//! `fabctl`: the command-line client of Fabric.
//!
//! It talks to `fabricd`'s HTTP/JSON API (docs/api.md) and prints tables
//! for people or JSON (`-o json`) for scripts.

mod http;
mod progress;
mod size;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use http::{request, Endpoint};
use progress::Progress;
use size::{format_size, parse_size};

/// Manage a Fabric node: volumes served to VMs over vhost-user-blk.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Args {
    /// The API: a unix socket path, or host:port for TCP.
    #[arg(
        long,
        global = true,
        env = "FABRIC_API",
        default_value = "/run/fabric/api.sock"
    )]
    api: String,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value = "table")]
    output: Output,
    /// Read the metadata as this node has applied it, possibly stale,
    /// without asking the leader (answers even without a quorum).
    #[arg(long, global = true)]
    local: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Volumes: thin, checksummed block devices.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// The cluster this node belongs to.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The cluster's nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// The software switch: segments (virtual L2 networks) and their
    /// vhost-user-net ports.
    #[command(subcommand)]
    Switch(SwitchCommand),
    /// VMs: run by `vmrun` on the node that defines them, with volumes as
    /// disks and switch ports as NICs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// The pooled resources of the cluster, with a row per node.
    Pool,
    /// Check that fabricd answers.
    Status,
}

#[derive(Debug, Subcommand)]
enum SwitchCommand {
    /// Segments: virtual L2 networks that span the nodes with a port in
    /// them.
    #[command(subcommand)]
    Segment(SegmentCommand),
    /// Ports: a guest NIC's vhost-user-net socket on a segment, served by
    /// the node fabctl talks to.
    #[command(subcommand)]
    Port(PortCommand),
    /// Tunnels: this node's links to the switches of other nodes.
    #[command(subcommand)]
    Tunnel(TunnelCommand),
}

#[derive(Debug, Subcommand)]
enum TunnelCommand {
    /// List this node's tunnels, with the segments they carry and counters.
    List,
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Define a VM on the node fabctl talks to (or on --node). The other
    /// vm commands work from any node: they are passed to the VM's.
    Create {
        name: String,
        /// The node that runs it (id or name; default: the one fabctl
        /// talks to). Its volumes must be attached, and its ports served,
        /// there.
        #[arg(long)]
        node: Option<String>,
        /// The kernel (a Linux bzImage or vmlinux, or a 64-bit ELF
        /// program), as an absolute path on that node.
        #[arg(long)]
        kernel: String,
        /// A Linux kernel's initramfs, as an absolute path on that node.
        #[arg(long)]
        initramfs: Option<String>,
        /// A Linux kernel's command line (default: console on ttyS0).
        #[arg(long, default_value = "")]
        cmdline: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Guest RAM (a multiple of 2 MiB, at least 8 MiB).
        #[arg(long, default_value = "128M", value_parser = parse_size)]
        memory: u64,
        /// A volume attached on that node, as the next disk. Repeatable.
        #[arg(long = "volume")]
        volumes: Vec<String>,
        /// A switch port served by that node, as the next NIC. Repeatable.
        #[arg(long = "port")]
        ports: Vec<String>,
    },
    Start {
        name: String,
    },
    /// Stop a VM: its runner ends it at once (the guest is not asked to
    /// shut down), or is killed after 3 s.
    Stop {
        name: String,
    },
    /// Pause a running VM: its vCPUs stop; memory and devices stay.
    Pause {
        name: String,
    },
    /// Let a paused VM run again.
    Resume {
        name: String,
    },
    List,
    Show {
        name: String,
    },
    /// Print the VM's serial console (the last 64 KiB).
    Console {
        name: String,
    },
    /// Delete a stopped VM's definition.
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum SegmentCommand {
    Create {
        name: String,
    },
    List,
    /// Delete a segment that has no ports.
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum PortCommand {
    /// Add a port and print the QEMU arguments that attach a guest to it
    /// (or, with --tap, make a host interface on the segment).
    Add {
        segment: String,
        /// The guest's MAC address (or the host interface's): the only
        /// source address the switch accepts from the port.
        #[arg(long)]
        mac: String,
        /// The port's name (default: SEGMENT-xxxxxx from the MAC).
        #[arg(long)]
        name: Option<String>,
        /// An access port on this VLAN (untagged at the guest).
        #[arg(long, conflicts_with = "trunk")]
        vlan: Option<u16>,
        /// A trunk port for these VLANs (tagged at the guest), e.g. 10,20.
        #[arg(long, value_delimiter = ',')]
        trunk: Option<Vec<u16>>,
        /// Most packets per second the guest may send.
        #[arg(long)]
        rate_pps: Option<u64>,
        /// Most bytes per second the guest may send.
        #[arg(long)]
        rate_bps: Option<u64>,
        /// The node to serve the port (name or id; default: the node
        /// fabctl talks to).
        #[arg(long)]
        node: Option<String>,
        /// Accept frames from any source address and learn them (for a
        /// guest that bridges or routes for others, or a packet generator).
        #[arg(long)]
        no_port_security: bool,
        /// A host port: make TAP interface TAP on the node (up, with the
        /// MAC address) instead of a socket for a guest. Give it an
        /// address, or put it in a bridge or another namespace, as with
        /// any interface.
        #[arg(long, value_name = "TAP")]
        tap: Option<String>,
    },
    /// List ports, with counters for those served by this node.
    List,
    Show {
        name: String,
    },
    /// Set a port's link up or down. A port whose link is down sends and
    /// receives nothing (counted as link_down drops); its guest stays
    /// attached.
    Link {
        name: String,
        #[arg(value_enum)]
        state: LinkState,
    },
    Delete {
        name: String,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LinkState {
    Up,
    Down,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Create a cluster with this node as its first member.
    Init,
    /// Show leader, term and membership as this node sees them.
    Status,
    /// Make a single-use join token (valid one hour), on the node that
    /// created the cluster.
    Token,
    /// Cut this node's links to the given peers' cluster addresses (none:
    /// restore all). Only for fault tests; needs `[cluster] fault_injection`.
    Faults {
        #[arg(long = "block")]
        blocked: Vec<String>,
    },
    /// Join this node to a cluster, through the API of the node that
    /// created it (its `api_tcp` address).
    Join {
        /// host:port of the existing node's TCP API.
        address: String,
        /// A token from `fabctl cluster token` on that node.
        #[arg(long)]
        token: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// List the nodes with their state (up, suspect, down).
    List,
    /// Show one node, by id or name.
    Show { node: String },
    /// Remove a node from the cluster (by id or name). To replace a dead
    /// node, remove it and join a new one.
    Remove { node: String },
    /// Set a label on a node (`key=value`), or remove one (`key-`).
    Label { node: String, label: String },
    /// Time round trips over the cluster transport from the node fabctl
    /// talks to, to another node (the path a replicated write takes).
    Ping {
        node: String,
        /// Round trips.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Bytes sent per round trip: bytes, or a number with K or M.
        #[arg(long, default_value = "4K", value_parser = parse_size)]
        size: u64,
    },
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a thin volume.
    Create {
        name: String,
        /// Capacity: bytes, or a number with K, M, G, T (powers of 1024).
        /// Must be a multiple of 4 KiB.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Replicas on distinct nodes (in a cluster; 1 to 3).
        #[arg(long)]
        replicas: Option<usize>,
        /// In-sync replicas a write needs, at least (default: 1 of 1 or 2,
        /// 2 of 3).
        #[arg(long)]
        min_replicas: Option<u32>,
    },
    /// List volumes.
    List,
    /// Show one volume: usage, attachment, counters.
    Show { name: String },
    /// Delete a detached volume and its data.
    Delete { name: String },
    /// Serve a volume on a vhost-user-blk socket and print the QEMU
    /// arguments that attach it.
    Attach {
        name: String,
        /// Take a replicated volume over from the node serving it now,
        /// even if that node is up (its guest then sees I/O errors).
        #[arg(long)]
        force: bool,
        /// Attach on this node (id or name) instead of the one fabctl
        /// talks to; the socket is then on that node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Verify every block of every in-sync replica against its checksum
    /// and compare the replicas; damaged or differing copies are copied
    /// again from a good one. Runs on the node the volume is attached to.
    Scrub {
        name: String,
        /// Start it and return; `volume show` has its progress.
        #[arg(long)]
        no_wait: bool,
    },
    /// Wait until every replica of a volume is in sync, showing resync
    /// progress (on the node the volume is attached to).
    Wait {
        name: String,
        /// Give up after this many seconds (default: no limit).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// A volume's replicas.
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Stop serving a volume.
    Detach {
        name: String,
        /// Detach even if a VM is connected (its I/O then fails).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ReplicaCommand {
    /// Replace the replica on NODE (id or name) by a full copy on another
    /// node: `--to`, or one placement picks. Run it on the node the volume
    /// is attached to (or anywhere when it is not attached).
    Replace {
        name: String,
        node: String,
        #[arg(long)]
        to: Option<String>,
        /// Return once the replacement is asked for, without following
        /// the copy.
        #[arg(long)]
        no_wait: bool,
    },
}

/// What went wrong, for the exit message.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error("{message}")]
    Api { message: String },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fabctl: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Percent-encodes a path segment (volume names are plain, but the CLI must
/// not build a wrong URL from whatever it is given).
fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `path` of a metadata read, asking for a local read with `--local`.
fn read_path(args: &Args, path: &str) -> String {
    if args.local {
        format!("{path}?consistency=local")
    } else {
        path.to_owned()
    }
}

fn call(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, CliError> {
    let response = request(endpoint, method, path, body.as_ref())?;
    let value: Value = if response.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&response.body)
            .map_err(|e| http::HttpError::Malformed(format!("response is not JSON: {e}")))?
    };
    if response.status >= 400 {
        let message = value["error"]["message"].as_str().map_or_else(
            || format!("fabricd answered HTTP {}", response.status),
            str::to_owned,
        );
        return Err(CliError::Api { message });
    }
    Ok(value)
}

fn run(args: &Args) -> Result<(), CliError> {
    let endpoint = Endpoint::parse(&args.api);
    let json = args.output == Output::Json;
    match &args.command {
        Command::Status => {
            let value = call(&endpoint, "GET", "/v1/health", None)?;
            if json {
                print_json(&value);
            } else {
                println!(
                    "fabricd {} at {endpoint}: {}",
                    value["version"].as_str().unwrap_or("?"),
                    value["status"].as_str().unwrap_or("?")
                );
            }
        }
        Command::Cluster(ClusterCommand::Init) => {
            let value = call(&endpoint, "POST", "/v1/cluster/init", None)?;
            if json {
                print_json(&value);
            } else {
                println!(
                    "created a cluster; this node is node {} ({})",
                    value["node_id"],
                    value["node_name"].as_str().unwrap_or("?")
                );
            }
        }
        Command::Cluster(ClusterCommand::Status) => {
            let value = call(&endpoint, "GET", "/v1/cluster", None)?;
            if json {
                print_json(&value);
            } else {
                println!(
                    "node:     {} ({})",
                    value["node_id"],
                    value["node_name"].as_str().unwrap_or("?")
                );
                println!("role:     {}", value["role"].as_str().unwrap_or("?"));
                println!("leader:   {}", value["leader"]);
                println!("term:     {}", value["term"]);
                println!("applied:  {}", value["last_applied"]);
                println!("voters:   {}", value["voters"]);
                println!("learners: {}", value["learners"]);
                let admits = if value["holds_ca"].as_bool() == Some(true) {
                    "yes (holds the cluster CA)"
                } else {
                    "no (join through a voter)"
                };
                println!("admits:   {admits}");
            }
        }
        Command::Cluster(ClusterCommand::Token) => {
            let value = call(&endpoint, "POST", "/v1/cluster/tokens", None)?;
            if json {
                print_json(&value);
            } else {
                println!("{}", value["token"].as_str().unwrap_or("?"));
            }
        }
        Command::Cluster(ClusterCommand::Join { address, token }) => {
            // This node makes a key and a signing request; the existing
            // node checks the token and signs; this node checks that the
            // answer comes from the cluster the token names, and starts.
            let mut request = call(&endpoint, "POST", "/v1/cluster/join-prepare", None)?;
            request["token"] = Value::String(token.clone());
            let seed = Endpoint::parse(address);
            if !matches!(seed, Endpoint::Tcp(_)) {
                return Err(CliError::Api {
                    message: format!(
                        "{address:?} is not host:port; give the TCP API address of a cluster node"
                    ),
                });
            }
            let grant = call(&seed, "POST", "/v1/cluster/join-request", Some(request))?;
            let body = json!({ "token": token, "grant": grant });
            let value = call(&endpoint, "POST", "/v1/cluster/join-complete", Some(body))?;
            if json {
                print_json(&value);
            } else {
                println!(
                    "joined the cluster as node {}; it becomes a voter once it has caught up",
                    value["node_id"]
                );
            }
        }
        Command::Node(NodeCommand::List) => {
            let value = call(&endpoint, "GET", &read_path(args, "/v1/nodes"), None)?;
            if json {
                print_json(&value);
            } else {
                print_node_table(&value);
            }
        }
        Command::Node(NodeCommand::Show { node }) => {
            let value = call(
                &endpoint,
                "GET",
                &read_path(args, &format!("/v1/nodes/{}", segment(node))),
                None,
            )?;
            print_json(&value);
        }
        Command::Node(NodeCommand::Label { node, label }) => {
            let path_of =
                |key: &str| format!("/v1/nodes/{}/labels/{}", segment(node), segment(key));
            let value = if let Some(key) = label.strip_suffix('-') {
                call(&endpoint, "DELETE", &path_of(key), None)?
            } else if let Some((key, value)) = label.split_once('=') {
                call(
                    &endpoint,
                    "PUT",
                    &path_of(key),
                    Some(json!({ "value": value })),
                )?
            } else {
                return Err(CliError::Api {
                    message: format!(
                        "label {label:?} is neither key=value (set) nor key- (remove)"
                    ),
                });
            };
            if json {
                print_json(&value);
            } else {
                println!(
                    "node {} labels: {}",
                    value["name"].as_str().unwrap_or("?"),
                    value["labels"]
                );
            }
        }
        Command::Cluster(ClusterCommand::Faults { blocked }) => {
            let value = call(
                &endpoint,
                "PUT",
                "/v1/cluster/faults",
                Some(json!({ "blocked": blocked })),
            )?;
            print_json(&value);
        }
        Command::Node(NodeCommand::Ping { node, count, size }) => {
            let value = call(
                &endpoint,
                "POST",
                &format!("/v1/nodes/{}/ping", segment(node)),
                Some(json!({ "count": count, "bytes": size })),
            )?;
            if json {
                print_json(&value);
            } else {
                let us = |key: &str| value[key].as_f64().unwrap_or(f64::NAN);
                println!(
                    "{} round trips of {} bytes to node {} ({}): min {:.0} µs, median {:.0} µs, p99 {:.0} µs, max {:.0} µs",
                    value["count"],
                    value["bytes"],
                    value["name"].as_str().unwrap_or("?"),
                    value["node"],
                    us("min_us"),
                    us("p50_us"),
                    us("p99_us"),
                    us("max_us"),
                );
            }
        }
        Command::Node(NodeCommand::Remove { node }) => {
            let value = call(
                &endpoint,
                "DELETE",
                &format!("/v1/nodes/{}", segment(node)),
                None,
            )?;
            if json {
                print_json(&value);
            } else {
                println!("removed node {} from the cluster", value["removed"]);
            }
        }
        Command::Pool => {
            let value = call(&endpoint, "GET", &read_path(args, "/v1/pool"), None)?;
            if json {
                print_json(&value);
            } else {
                let t = &value["totals"];
                println!(
                    "pool: {} of {} nodes up, {} CPU cores, {} memory, {} disk ({} free)",
                    t["nodes_up"],
                    t["nodes"],
                    t["cpu_cores"],
                    bytes(&t["memory_bytes"]),
                    bytes(&t["disk_bytes"]),
                    bytes(&t["disk_free_bytes"])
                );
                println!();
                print_node_table(&value["nodes"]);
            }
        }
        Command::Switch(command) => switch(&endpoint, command, json)?,
        Command::Vm(command) => vm(&endpoint, command, json)?,
        Command::Volume(command) => match command {
            VolumeCommand::Create {
                name,
                size,
                replicas,
                min_replicas,
            } => {
                let mut body = json!({ "name": name, "size_bytes": size });
                if let Some(replicas) = replicas {
                    body["replicas"] = json!(replicas);
                }
                if let Some(min_replicas) = min_replicas {
                    body["min_replicas"] = json!(min_replicas);
                }
                let value = call(&endpoint, "POST", "/v1/volumes", Some(body))?;
                if json {
                    print_json(&value);
                } else {
                    println!(
                        "created volume {name} ({}, id {})",
                        format_size(*size),
                        value["id"].as_str().unwrap_or("?")
                    );
                }
            }
            VolumeCommand::List => {
                let value = call(&endpoint, "GET", "/v1/volumes", None)?;
                if json {
                    print_json(&value);
                } else {
                    print_volume_table(&value);
                }
            }
            VolumeCommand::Show { name } => {
                let value = call(
                    &endpoint,
                    "GET",
                    &read_path(args, &format!("/v1/volumes/{}", segment(name))),
                    None,
                )?;
                if json {
                    print_json(&value);
                } else {
                    print_volume(&value);
                }
            }
            VolumeCommand::Delete { name } => {
                call(
                    &endpoint,
                    "DELETE",
                    &format!("/v1/volumes/{}", segment(name)),
                    None,
                )?;
                if json {
                    print_json(&json!({ "deleted": name }));
                } else {
                    println!("deleted volume {name}");
                }
            }
            VolumeCommand::Attach { name, force, node } => {
                let value = call(
                    &endpoint,
                    "POST",
                    &format!("/v1/volumes/{}/attach", segment(name)),
                    Some(json!({ "force": force, "node": node })),
                )?;
                if json {
                    print_json(&json!({
                        "name": value["name"],
                        "socket": value["attachment"]["socket"],
                        "qemu_args": value["attachment"]["qemu_args"],
                        "qemu_memory_args": value["attachment"]["qemu_memory_args"],
                    }));
                } else {
                    print_attachment(&value, node.as_deref());
                }
            }
            VolumeCommand::Scrub { name, no_wait } => scrub(&endpoint, name, *no_wait, json)?,
            VolumeCommand::Replica(ReplicaCommand::Replace {
                name,
                node,
                to,
                no_wait,
            }) => {
                let value = call(
                    &endpoint,
                    "POST",
                    &format!(
                        "/v1/volumes/{}/replicas/{}/replace",
                        segment(name),
                        segment(node)
                    ),
                    to.as_ref().map(|to| json!({ "to": to })),
                )?;
                let attached = value["attached"].as_bool() == Some(true);
                if attached && !no_wait {
                    // The new node shows up in the placement once the
                    // replacement commits; then its copy is followed.
                    let path = format!("/v1/volumes/{}", segment(name));
                    let old = &value["old"];
                    let mut moved = false;
                    for _ in 0..240 {
                        let shown = call(&endpoint, "GET", &path, None)?;
                        moved = shown["placement"]
                            .as_array()
                            .is_some_and(|nodes| !nodes.contains(old));
                        if moved {
                            break;
                        }
                        std::thread::sleep(POLL);
                    }
                    if !moved {
                        return Err(CliError::Api {
                            message: format!(
                                "the replica of {name} on node {old} was not replaced within 60 s (no node to put it on, or the cluster refused it; the attached node's log says why)"
                            ),
                        });
                    }
                    wait_in_sync(&endpoint, name, None)?;
                }
                let shown = call(
                    &endpoint,
                    "GET",
                    &format!("/v1/volumes/{}", segment(name)),
                    None,
                )?;
                if json {
                    print_json(&json!({
                        "volume": name,
                        "old": value["old"],
                        "placement": shown["placement"],
                        "replication": shown["replication"],
                    }));
                } else if attached && !no_wait {
                    println!(
                        "replica of {name} on node {} replaced; placement now nodes {}, all in sync",
                        value["old"], shown["placement"]
                    );
                } else if attached {
                    println!(
                        "replacement of the replica of {name} on node {} asked for; `fabctl volume wait {name}` follows the copy",
                        value["old"]
                    );
                } else {
                    println!(
                        "replica of {name} on node {} replaced by node {}; the next attach copies the volume to it",
                        value["old"], value["to"]
                    );
                }
            }
            VolumeCommand::Wait { name, timeout } => {
                let deadline = timeout.map(|seconds| {
                    std::time::Instant::now() + std::time::Duration::from_secs(seconds)
                });
                let value = wait_in_sync(&endpoint, name, deadline)?;
                if json {
                    print_json(&value["replication"]);
                } else {
                    println!("volume {name}: every replica in sync");
                }
            }
            VolumeCommand::Detach { name, force } => {
                let body = json!({ "force": force });
                call(
                    &endpoint,
                    "POST",
                    &format!("/v1/volumes/{}/detach", segment(name)),
                    Some(body),
                )?;
                if json {
                    print_json(&json!({ "detached": name }));
                } else {
                    println!("detached volume {name}");
                }
            }
        },
    }
    Ok(())
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    )
}

/// How often progress is polled.
const POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Starts a scrub and, unless `no_wait`, follows it to the end and then
/// follows the repairs it handed to resync.
fn scrub(endpoint: &Endpoint, name: &str, no_wait: bool, json: bool) -> Result<(), CliError> {
    let path = format!("/v1/volumes/{}", segment(name));
    let started = call(endpoint, "POST", &format!("{path}/scrub"), None)?;
    if started["started"].as_bool() == Some(false) && !json {
        eprintln!("a scrub of {name} is already running; following it");
    }
    if no_wait {
        if json {
            print_json(&started);
        } else {
            println!(
                "scrub of volume {name} started; `fabctl volume show {name}` has its progress"
            );
        }
        return Ok(());
    }
    let mut progress = Progress::new("scrub");
    let mut polls = 0u32;
    let report = loop {
        let value = call(endpoint, "GET", &path, None)?;
        let report = value["replication"]["scrub"].clone();
        polls += 1;
        if report.is_null() && polls < 8 {
            std::thread::sleep(POLL);
            continue;
        }
        if report.is_null() {
            progress.finish();
            return Err(CliError::Api {
                message: format!(
                    "volume {name} is no longer served by this node; the scrub stopped"
                ),
            });
        }
        let count = |key: &str| report[key].as_u64().unwrap_or(0);
        if !json {
            progress.show(
                count("checked") + count("skipped"),
                count("regions"),
                &format!(
                    "regions, {} damaged blocks, {} differing",
                    count("damaged_blocks"),
                    count("differing")
                ),
            );
        }
        if report["aborted"].as_bool() == Some(true) {
            progress.finish();
            return Err(CliError::Api {
                message: format!(
                    "the scrub of {name} stopped: this attachment was fenced by a newer one"
                ),
            });
        }
        if report["finished"].as_bool() == Some(true) {
            progress.finish();
            break report;
        }
        std::thread::sleep(POLL);
    };
    let count = |key: &str| report[key].as_u64().unwrap_or(0);
    if count("repairing") > 0 {
        wait_in_sync(endpoint, name, None)?;
    }
    if json {
        print_json(&report);
    } else {
        println!(
            "scrub of volume {name}: {} of {} regions compared on every in-sync replica",
            count("checked"),
            count("regions")
        );
        println!(
            "found: {} damaged blocks, {} differing replica regions",
            count("damaged_blocks"),
            count("differing")
        );
        println!(
            "repaired: {} replica regions copied again from a good replica",
            count("repairing")
        );
        if count("skipped") > 0 {
            println!(
                "skipped: {} regions busy with writes on every try; run the scrub again",
                count("skipped")
            );
        }
    }
    if count("unrepairable") > 0 {
        return Err(CliError::Api {
            message: format!(
                "{} regions of volume {name} have no copy that verifies; reads of their damaged blocks fail",
                count("unrepairable")
            ),
        });
    }
    Ok(())
}

/// Follows resync until every replica is in sync; returns the last
/// `volume show`.
fn wait_in_sync(
    endpoint: &Endpoint,
    name: &str,
    deadline: Option<std::time::Instant>,
) -> Result<Value, CliError> {
    let path = format!("/v1/volumes/{}", segment(name));
    let mut progress = Progress::new("resync");
    let mut most = 0;
    loop {
        let value = call(endpoint, "GET", &path, None)?;
        let r = &value["replication"];
        if r["states"].is_null() {
            progress.finish();
            return Err(CliError::Api {
                message: format!(
                    "volume {name} is not replicated, or not served by this node (ask the node it is attached to)"
                ),
            });
        }
        if r["phase"].as_str() == Some("fenced") {
            progress.finish();
            return Err(CliError::Api {
                message: format!(
                    "volume {name} is fenced here: a newer attachment serves it elsewhere"
                ),
            });
        }
        let in_sync = r["states"]
            .as_array()
            .is_some_and(|states| states.iter().all(|s| s.as_str() == Some("insync")));
        let left: u64 = r["dirty_regions"]
            .as_array()
            .map_or(0, |dirty| dirty.iter().filter_map(Value::as_u64).sum());
        most = most.max(left);
        let region_bytes = r["region_bytes"].as_u64().unwrap_or(1 << 20);
        progress.show(
            most - left,
            most,
            &format!("regions copied, {} left", format_size(left * region_bytes)),
        );
        if in_sync && left == 0 {
            progress.finish();
            return Ok(value);
        }
        if deadline.is_some_and(|deadline| std::time::Instant::now() >= deadline) {
            progress.finish();
            return Err(CliError::Api {
                message: format!(
                    "volume {name} is not in sync yet: {} left to copy",
                    format_size(left * region_bytes)
                ),
            });
        }
        std::thread::sleep(POLL);
    }
}

fn bytes(value: &Value) -> String {
    value.as_u64().map_or_else(|| "-".into(), format_size)
}

fn switch(endpoint: &Endpoint, command: &SwitchCommand, json: bool) -> Result<(), CliError> {
    match command {
        SwitchCommand::Segment(SegmentCommand::Create { name }) => {
            let value = call(
                endpoint,
                "POST",
                "/v1/segments",
                Some(json!({ "name": name })),
            )?;
            if json {
                print_json(&value);
            } else {
                println!("created segment {name} (VNI {})", value["vni"]);
            }
        }
        SwitchCommand::Segment(SegmentCommand::List) => {
            let value = call(endpoint, "GET", "/v1/segments", None)?;
            if json {
                print_json(&value);
            } else {
                let rows = table_rows(&value, |s| {
                    vec![
                        s["name"].as_str().unwrap_or("?").to_owned(),
                        s["vni"].to_string(),
                        s["ports"].to_string(),
                    ]
                });
                print_table(&["NAME", "VNI", "PORTS"], &rows);
            }
        }
        SwitchCommand::Segment(SegmentCommand::Delete { name }) => {
            call(
                endpoint,
                "DELETE",
                &format!("/v1/segments/{}", segment(name)),
                None,
            )?;
            if !json {
                println!("deleted segment {name}");
            }
        }
        SwitchCommand::Port(PortCommand::Add {
            segment: on,
            mac,
            name,
            vlan,
            trunk,
            rate_pps,
            rate_bps,
            node,
            no_port_security,
            tap,
        }) => {
            let name = name.clone().unwrap_or_else(|| {
                let tail: String = mac.split(':').skip(3).collect();
                format!("{on}-{tail}")
            });
            let value = call(
                endpoint,
                "POST",
                "/v1/ports",
                Some(json!({
                    "name": name,
                    "segment": on,
                    "mac": mac,
                    "vlan": vlan,
                    "trunk": trunk,
                    "packets_per_second": rate_pps,
                    "bytes_per_second": rate_bps,
                    "node": node,
                    "port_security": !no_port_security,
                    "tap": tap,
                })),
            )?;
            if json {
                print_json(&value);
            } else if let Some(tap) = tap {
                println!(
                    "port {name} on segment {on} is host interface {tap} of node {}, up with address {mac}",
                    value["node"]
                );
            } else {
                println!(
                    "port {name} on segment {on} is served on {}",
                    value["socket"].as_str().unwrap_or("?")
                );
                println!();
                println!("QEMU arguments for the NIC:");
                println!("  {}", args_line(&value["qemu_args"]));
                println!(
                    "vhost-user needs the guest's memory shared with fabricd (size must equal -m):"
                );
                println!("  -object memory-backend-memfd,id=mem,size=SIZE,share=on -numa node,memdev=mem");
            }
        }
        SwitchCommand::Port(PortCommand::List) => {
            let value = call(endpoint, "GET", "/v1/ports", None)?;
            if json {
                print_json(&value);
            } else {
                let rows = table_rows(&value, |p| {
                    let c = &p["counters"];
                    let counter =
                        |key: &str| c[key].as_u64().map_or("-".to_owned(), |v| v.to_string());
                    vec![
                        p["name"].as_str().unwrap_or("?").to_owned(),
                        p["segment"].as_str().unwrap_or("?").to_owned(),
                        p["node"].to_string(),
                        p["mac"].as_str().unwrap_or("?").to_owned(),
                        p["tap"]
                            .as_str()
                            .map_or("vhost-user".to_owned(), |tap| format!("tap {tap}")),
                        vlan_text(&p["vlan"]),
                        p["link"].as_str().unwrap_or("up").to_owned(),
                        counter("rx_packets"),
                        counter("tx_packets"),
                        drops_total(c).map_or("-".into(), |n| n.to_string()),
                    ]
                });
                print_table(
                    &[
                        "NAME", "SEGMENT", "NODE", "MAC", "DEVICE", "VLAN", "LINK", "RX", "TX",
                        "DROPS",
                    ],
                    &rows,
                );
            }
        }
        SwitchCommand::Tunnel(TunnelCommand::List) => {
            let value = call(endpoint, "GET", "/v1/tunnels", None)?;
            if json {
                print_json(&value);
            } else {
                let rows = table_rows(&value["tunnels"], |t| {
                    let c = &t["counters"];
                    let segments = t["segments"]
                        .as_array()
                        .map(|v| v.iter().map(Value::to_string).collect::<Vec<_>>().join(","))
                        .unwrap_or_default();
                    vec![
                        t["node"].to_string(),
                        if t["connected"].as_bool() == Some(true) {
                            "yes".into()
                        } else {
                            "no".into()
                        },
                        if segments.is_empty() {
                            "-".into()
                        } else {
                            segments
                        },
                        c["rx_packets"].to_string(),
                        c["tx_packets"].to_string(),
                        drops_total(c).unwrap_or(0).to_string(),
                    ]
                });
                print_table(&["NODE", "CONNECTED", "VNIS", "RX", "TX", "DROPS"], &rows);
                println!(
                    "datagrams refused: {}",
                    value["refused_datagrams"].as_u64().unwrap_or(0)
                );
            }
        }
        SwitchCommand::Port(PortCommand::Show { name }) => {
            let value = call(
                endpoint,
                "GET",
                &format!("/v1/ports/{}", segment(name)),
                None,
            )?;
            print_json(&value);
        }
        SwitchCommand::Port(PortCommand::Link { name, state }) => {
            let link = match state {
                LinkState::Up => "up",
                LinkState::Down => "down",
            };
            let value = call(
                endpoint,
                "PUT",
                &format!("/v1/ports/{}/link", segment(name)),
                Some(json!({ "link": link })),
            )?;
            if json {
                print_json(&value);
            } else {
                println!("port {name}: link {link}");
            }
        }
        SwitchCommand::Port(PortCommand::Delete { name }) => {
            call(
                endpoint,
                "DELETE",
                &format!("/v1/ports/{}", segment(name)),
                None,
            )?;
            if !json {
                println!("deleted port {name}");
            }
        }
    }
    Ok(())
}

fn vm(endpoint: &Endpoint, command: &VmCommand, json: bool) -> Result<(), CliError> {
    let done = |value: Value, text: String| {
        if json {
            print_json(&value);
        } else {
            println!("{text}");
        }
    };
    match command {
        VmCommand::Create {
            name,
            node,
            kernel,
            initramfs,
            cmdline,
            vcpus,
            memory,
            volumes,
            ports,
        } => {
            let mut body = json!({
                "name": name,
                "kernel": kernel,
                "cmdline": cmdline,
                "vcpus": vcpus,
                "memory_bytes": memory,
                "volumes": volumes,
                "ports": ports,
            });
            if let Some(node) = node {
                body["node"] = json!(node);
            }
            if let Some(initramfs) = initramfs {
                body["initramfs"] = json!(initramfs);
            }
            let value = call(endpoint, "POST", "/v1/vms", Some(body))?;
            done(
                value,
                format!("defined VM {name}; `fabctl vm start {name}` runs it"),
            );
        }
        VmCommand::Start { name }
        | VmCommand::Stop { name }
        | VmCommand::Pause { name }
        | VmCommand::Resume { name }
        | VmCommand::Delete { name } => {
            let (method, action, done_text) = match command {
                VmCommand::Start { .. } => ("POST", "/start", "started"),
                VmCommand::Stop { .. } => ("POST", "/stop", "stopped"),
                VmCommand::Pause { .. } => ("POST", "/pause", "paused"),
                VmCommand::Resume { .. } => ("POST", "/resume", "resumed"),
                _ => ("DELETE", "", "deleted"),
            };
            let path = format!("/v1/vms/{}{action}", segment(name));
            let value = call(endpoint, method, &path, None)?;
            done(value, format!("{done_text} VM {name}"));
        }
        VmCommand::Show { name } => {
            let value = call(endpoint, "GET", &format!("/v1/vms/{}", segment(name)), None)?;
            print_json(&value);
        }
        VmCommand::List => {
            let value = call(endpoint, "GET", "/v1/vms", None)?;
            if json {
                print_json(&value);
            } else {
                let rows = table_rows(&value, |v| {
                    let runner = &v["runner"];
                    vec![
                        v["name"].as_str().unwrap_or("?").to_owned(),
                        v["node"].to_string(),
                        v["vcpus"].to_string(),
                        bytes(&v["memory_bytes"]),
                        runner["state"].as_str().unwrap_or("defined").to_owned(),
                        runner["restarts"]
                            .as_u64()
                            .map_or("-".into(), |n| n.to_string()),
                        runner["last_error"].as_str().unwrap_or("").to_owned(),
                    ]
                });
                print_table(
                    &[
                        "NAME",
                        "NODE",
                        "VCPUS",
                        "MEMORY",
                        "STATE",
                        "RESTARTS",
                        "LAST ERROR",
                    ],
                    &rows,
                );
            }
        }
        VmCommand::Console { name } => {
            let path = format!("/v1/vms/{}/console", segment(name));
            let response = request(endpoint, "GET", &path, None)?;
            if response.status >= 400 {
                let value: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                let message = value["error"]["message"].as_str().map_or_else(
                    || format!("fabricd answered HTTP {}", response.status),
                    str::to_owned,
                );
                return Err(CliError::Api { message });
            }
            let text = String::from_utf8_lossy(&response.body);
            if json {
                print_json(&json!({ "console": text }));
            } else {
                print!("{text}");
            }
        }
    }
    Ok(())
}

/// One table row per item of a JSON list.
fn table_rows(list: &Value, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    list.as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(row)
        .collect()
}

/// Drops of every reason in a port's or tunnel's counters (`None` where
/// the node shows no counters).
fn drops_total(counters: &Value) -> Option<u64> {
    counters["drops"]
        .as_object()
        .map(|drops| drops.values().filter_map(Value::as_u64).sum())
}

fn vlan_text(vlan: &Value) -> String {
    match vlan["mode"].as_str() {
        Some("access") => format!("access {}", vlan["vlan"]),
        Some("trunk") => format!(
            "trunk {}",
            vlan["vlans"]
                .as_array()
                .map(|v| v.iter().map(Value::to_string).collect::<Vec<_>>().join(","))
                .unwrap_or_default()
        ),
        _ => "native".into(),
    }
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn print_volume_table(value: &Value) {
    let empty = Vec::new();
    let rows: Vec<Vec<String>> = value
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|v| {
            let state = match (&v["attachment"], v["attachment"]["connected"].as_bool()) {
                (Value::Null, _) => "detached",
                (_, Some(true)) => "in use",
                _ => "attached",
            };
            vec![
                v["name"].as_str().unwrap_or("?").to_owned(),
                v["id"].as_str().unwrap_or("?").to_owned(),
                bytes(&v["size_bytes"]),
                bytes(&v["usage"]["allocated_bytes"]),
                state.to_owned(),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("no volumes; create one with `fabctl volume create NAME --size 10G`");
        return;
    }
    print_table(&["NAME", "ID", "SIZE", "ALLOCATED", "STATE"], &rows);
}

fn print_node_table(value: &Value) {
    let empty = Vec::new();
    let rows: Vec<Vec<String>> = value
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|n| {
            let role = match (n["leader"].as_bool(), n["voter"].as_bool()) {
                (Some(true), _) => "leader",
                (_, Some(true)) => "voter",
                _ => "learner",
            };
            let r = &n["resources"];
            vec![
                n["id"].to_string(),
                n["name"].as_str().unwrap_or("?").to_owned(),
                n["cluster_address"].as_str().unwrap_or("?").to_owned(),
                n["state"].as_str().unwrap_or("?").to_owned(),
                role.to_owned(),
                r["cpu_cores"].to_string(),
                bytes(&r["memory_bytes"]),
                format!(
                    "{} / {}",
                    bytes(&r["disk_free_bytes"]),
                    bytes(&r["disk_bytes"])
                ),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "NAME",
            "ADDRESS",
            "STATE",
            "ROLE",
            "CPUS",
            "MEMORY",
            "DISK FREE / SIZE",
        ],
        &rows,
    );
}

fn print_volume(v: &Value) {
    println!("name:        {}", v["name"].as_str().unwrap_or("?"));
    println!(
        "id:          {} (the guest's disk serial)",
        v["id"].as_str().unwrap_or("?")
    );
    println!("size:        {}", bytes(&v["size_bytes"]));
    println!("block size:  {}", bytes(&v["block_size"]));
    println!("allocated:   {}", bytes(&v["usage"]["allocated_bytes"]));
    println!("unflushed:   {}", bytes(&v["usage"]["unflushed_bytes"]));
    if !v["placement"].is_null() {
        println!("placement:   nodes {}", v["placement"]);
    }
    let r = &v["replication"];
    if !r.is_null() {
        let frontend = match r["frontend"].as_u64() {
            Some(node) => format!("node {node}"),
            None => "none".into(),
        };
        println!(
            "replication: generation {}, frontend {frontend}, at least {} in sync",
            r["generation"], r["min_replicas"]
        );
        let stale = r["stale"].as_array().map_or(0, Vec::len);
        println!(
            "replicas:    {}",
            if stale == 0 {
                "all in sync".to_owned()
            } else {
                format!("stale on nodes {}", r["stale"])
            }
        );
        if let (Some(states), Some(dirty)) = (r["states"].as_array(), r["dirty_regions"].as_array())
        {
            let rows: Vec<String> = v["placement"]
                .as_array()
                .into_iter()
                .flatten()
                .zip(states.iter().zip(dirty))
                .map(|(node, (state, dirty))| {
                    let left = match dirty.as_u64() {
                        Some(0) | None => String::new(),
                        Some(regions) => format!(", {regions} MiB to resync"),
                    };
                    format!("node {node}: {}{left}", state.as_str().unwrap_or("?"))
                })
                .collect();
            println!(
                "states:      {} ({})",
                rows.join("; "),
                r["phase"].as_str().unwrap_or("?")
            );
        }
        let scrub = &r["scrub"];
        if !scrub.is_null() {
            let count = |key: &str| scrub[key].as_u64().unwrap_or(0);
            println!(
                "scrub:       {} {}/{} regions; {} damaged blocks, {} differing, {} repaired, {} unrepairable",
                if scrub["finished"].as_bool() == Some(true) { "done," } else { "running," },
                count("checked") + count("skipped"),
                count("regions"),
                count("damaged_blocks"),
                count("differing"),
                count("repairing"),
                count("unrepairable")
            );
        }
    }
    let a = &v["attachment"];
    if a.is_null() {
        println!(
            "attachment:  none (`fabctl volume attach {}` serves it)",
            v["name"].as_str().unwrap_or("NAME")
        );
        return;
    }
    println!("socket:      {}", a["socket"].as_str().unwrap_or("?"));
    println!(
        "frontend:    {}",
        if a["connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "not connected"
        }
    );
    println!("queues:      {}", a["queues"]);
    let c = &a["counters"];
    println!(
        "requests:    {} reads ({}), {} writes ({}), {} flushes, {} discards",
        c["reads"],
        bytes(&c["bytes_read"]),
        c["writes"],
        bytes(&c["bytes_written"]),
        c["flushes"],
        c["discards"]
    );
    println!(
        "errors:      {} invalid requests, {} I/O errors",
        c["invalid_requests"], c["io_errors"]
    );
}

fn args_line(value: &Value) -> String {
    value
        .as_array()
        .map(|args| {
            args.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn print_attachment(v: &Value, node: Option<&str>) {
    let a = &v["attachment"];
    println!(
        "volume {} is served on {}{}",
        v["name"].as_str().unwrap_or("?"),
        a["socket"].as_str().unwrap_or("?"),
        node.map(|node| format!(" on node {node}"))
            .unwrap_or_default()
    );
    println!();
    println!("QEMU arguments for the disk:");
    println!("  {}", args_line(&a["qemu_args"]));
    println!("vhost-user needs the guest's memory shared with fabricd (size must equal -m):");
    println!("  {}", args_line(&a["qemu_memory_args"]));
}
