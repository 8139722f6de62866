//! A `fabricd` process forming a cluster: init, node list, pool, restart.

use anyhow::Result;
use integration::fabricd::Fabricd;

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
    socket.local_addr().expect("local address").port()
}

#[test]
fn init_lists_the_node_and_survives_kill9() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let address = format!("127.0.0.1:{}", free_udp_port());
    let mut node = Fabricd::start_with(
        dir.path(),
        &["--cluster-listen", &address, "--node-name", "alpha"],
    )?;

    let before = node.fabctl_output(&["cluster", "status"])?;
    assert!(!before.status.success());
    assert!(String::from_utf8_lossy(&before.stderr).contains("not in a cluster"));

    let created = node.fabctl_json(&["cluster", "init"])?;
    assert_eq!(created["node_id"].as_u64(), Some(1));
    let again = node.fabctl_output(&["cluster", "init"])?;
    assert!(String::from_utf8_lossy(&again.stderr).contains("already belongs to a cluster"));

    let nodes = node.fabctl_json(&["node", "list"])?;
    assert_eq!(nodes.as_array().map(Vec::len), Some(1), "{nodes}");
    assert_eq!(nodes[0]["name"].as_str(), Some("alpha"));
    assert_eq!(nodes[0]["state"].as_str(), Some("up"));
    assert_eq!(nodes[0]["cluster_address"].as_str(), Some(address.as_str()));
    assert!(nodes[0]["resources"]["cpu_cores"].as_u64() >= Some(1));

    let pool = node.fabctl_json(&["pool"])?;
    assert_eq!(pool["totals"]["nodes_up"].as_u64(), Some(1));
    assert_eq!(
        pool["totals"]["memory_bytes"],
        nodes[0]["resources"]["memory_bytes"]
    );
    let table = node.fabctl(&["pool"])?;
    assert!(
        table.contains("1 of 1 nodes up") && table.contains("alpha"),
        "{table}"
    );

    // kill -9, restart: the membership comes back from disk and leads again.
    node.kill9()?;
    node.restart()?;
    let mut status = serde_json::Value::Null;
    for _ in 0..100 {
        status = node.fabctl_json(&["cluster", "status"])?;
        if status["leader"].as_u64() == Some(1) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(status["leader"].as_u64(), Some(1), "{status}");
    assert_eq!(
        node.fabctl_json(&["node", "list"])?
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let missing = node.fabctl_output(&["node", "show", "nope"])?;
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no node with id or name"));
    node.terminate()?;
    Ok(())
}
