//! A `fabricd` process forming a cluster: init, node list, pool, restart.

use anyhow::Result;
use integration::fabricd::{
    form_cluster, free_udp_port, start_cluster, start_cluster_member, ClusterMember, Fabricd,
};

#[test]
fn init_lists_the_node_and_survives_kill9() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let address = format!("127.0.0.1:{}", free_udp_port()?);
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

fn wait_for<T>(what: &str, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    for _ in 0..200 {
        if let Some(value) = check()? {
            return Ok(value);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    anyhow::bail!("timed out waiting for {what}")
}

/// Three processes: init, two joins with single-use tokens, every node sees
/// three voters that are up; bad tokens are refused; the leader is killed
/// and a new one is elected; the old leader restarts and catches up.
#[test]
fn three_node_cluster_joins_and_survives_the_leader() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ClusterMember {
        node: mut first,
        api: first_api,
        ..
    } = start_cluster_member(dir.path(), "n1", &[])?;
    let second = start_cluster_member(dir.path(), "n2", &[])?.node;
    let third = start_cluster_member(dir.path(), "n3", &[])?.node;
    first.fabctl(&["cluster", "init"])?;

    let token = first.fabctl(&["cluster", "token"])?.trim().to_owned();
    second.fabctl(&["cluster", "join", &first_api, "--token", &token])?;
    // A used token, a made-up one and garbage are refused, and nothing joins.
    for bad in [
        token.clone(),
        format!("{}0", &token[..token.len() - 1]),
        "garbage".into(),
    ] {
        let output = third.fabctl_output(&["cluster", "join", &first_api, "--token", &bad])?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains("join refused"),
            "{bad}: {stderr}"
        );
    }
    let fresh = first.fabctl(&["cluster", "token"])?.trim().to_owned();
    third.fabctl(&["cluster", "join", &first_api, "--token", &fresh])?;

    for node in [&first, &second, &third] {
        wait_for("three voters that are up", || {
            let nodes = node.fabctl_json(&["node", "list"])?;
            let rows = nodes.as_array().cloned().unwrap_or_default();
            let ready = rows.len() == 3
                && rows.iter().all(|n| {
                    n["state"].as_str() == Some("up") && n["voter"].as_bool() == Some(true)
                });
            Ok(ready.then_some(()))
        })?;
    }
    let pool = second.fabctl_json(&["pool"])?;
    assert_eq!(pool["totals"]["nodes_up"].as_u64(), Some(3), "{pool}");

    // A volume created on one node is placed on distinct nodes, recorded
    // in the cluster metadata, and its name is taken cluster-wide.
    second.fabctl(&[
        "volume",
        "create",
        "shared",
        "--size",
        "1G",
        "--replicas",
        "2",
    ])?;
    // A follower shows what it has applied, which may lag the commit.
    let placement: Vec<u64> = wait_for("the placement to show", || {
        let shown = second.fabctl_json(&["volume", "show", "shared"])?;
        Ok(shown["placement"]
            .as_array()
            .map(|ids| ids.iter().filter_map(|id| id.as_u64()).collect()))
    })?;
    assert_eq!(placement.len(), 2, "{placement:?}");
    assert_ne!(placement[0], placement[1]);
    let taken = wait_for("the name to be taken on another node", || {
        let output = third.fabctl_output(&["volume", "create", "shared", "--size", "1G"])?;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        Ok((!output.status.success()).then_some(stderr))
    })?;
    assert!(taken.contains("already exists in the cluster"), "{taken}");
    let too_many = second.fabctl_output(&[
        "volume",
        "create",
        "wide",
        "--size",
        "1G",
        "--replicas",
        "4",
    ])?;
    assert!(String::from_utf8_lossy(&too_many.stderr).contains("1 to 3 replicas"));
    second.fabctl(&["volume", "delete", "shared"])?;
    wait_for("the name to be free again", || {
        let output = third.fabctl_output(&["volume", "create", "shared", "--size", "1G"])?;
        Ok(output.status.success().then_some(()))
    })?;

    // Kill the leader: the other two elect a new one.
    first.kill9()?;
    let new_leader = wait_for("a new leader", || {
        let status = second.fabctl_json(&["cluster", "status"])?;
        Ok(status["leader"].as_u64().filter(|&leader| leader != 1))
    })?;
    assert!(new_leader == 2 || new_leader == 3);
    // The old leader restarts from disk and follows the new one.
    first.restart()?;
    wait_for("the old leader to follow", || {
        let status = first.fabctl_json(&["cluster", "status"])?;
        Ok((status["leader"].as_u64() == Some(new_leader)
            && status["role"].as_str() == Some("follower"))
        .then_some(()))
    })?;
    Ok(())
}

/// Five processes with fast failure detection: a stopped node turns
/// suspect, then down, on every other node; the pool stops counting it.
#[test]
fn five_nodes_see_a_stopped_node_go_down() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut nodes = start_cluster(
        dir.path(),
        5,
        "heartbeat_ms = 100\nsuspect_after_ms = 400\ndown_after_ms = 1200\n",
    )?;
    let mut stopped = nodes.pop().expect("five nodes");
    stopped.node.terminate()?;
    for ClusterMember { node, .. } in &nodes {
        wait_for("node 5 down", || {
            let rows = node
                .fabctl_json(&["node", "list"])?
                .as_array()
                .cloned()
                .unwrap_or_default();
            Ok(rows
                .iter()
                .any(|n| n["name"].as_str() == Some("n5") && n["state"].as_str() == Some("down"))
                .then_some(()))
        })?;
        let pool = node.fabctl_json(&["pool"])?;
        assert_eq!(pool["totals"]["nodes"].as_u64(), Some(5));
        assert_eq!(pool["totals"]["nodes_up"].as_u64(), Some(4), "{pool}");
    }
    Ok(())
}

/// The node that created the cluster (first leader, first CA holder) dies
/// for good: the survivors elect a leader, remove it, and admit a
/// replacement with a token the dead node issued before it died (tokens
/// are cluster metadata) through a survivor (every voter holds the CA).
#[test]
fn a_dead_first_node_is_replaced_through_the_survivors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut nodes = start_cluster(
        dir.path(),
        3,
        "raft_election_min_ms = 500\nraft_election_max_ms = 1000\nraft_heartbeat_ms = 100\nheartbeat_ms = 100\nsuspect_after_ms = 400\ndown_after_ms = 1200\n",
    )?;
    let config = dir
        .path()
        .join("fabricd.toml")
        .to_string_lossy()
        .into_owned();
    for ClusterMember { node, .. } in &nodes {
        wait_for("three voters, each holding the CA", || {
            let status = node.fabctl_json(&["cluster", "status"])?;
            Ok((status["voters"].as_array().map(Vec::len) == Some(3)
                && status["holds_ca"].as_bool() == Some(true))
            .then_some(()))
        })?;
    }
    let saved_token = nodes[0]
        .node
        .fabctl(&["cluster", "token"])?
        .trim()
        .to_owned();
    nodes[0].node.fabctl(&["node", "label", "n2", "rack=r2"])?;
    nodes[0].node.kill9()?;

    let survivor = &nodes[1].node;
    wait_for("a leader among the survivors", || {
        let status = survivor.fabctl_json(&["cluster", "status"])?;
        Ok(status["leader"]
            .as_u64()
            .filter(|&leader| leader != 1)
            .map(|_| ()))
    })?;
    wait_for("n1 to be down", || {
        let shown = survivor.fabctl_json(&["node", "show", "n1"])?;
        Ok((shown["state"].as_str() == Some("down")).then_some(()))
    })?;
    survivor.fabctl(&["node", "remove", "n1"])?;

    let replacement = start_cluster_member(dir.path(), "n4", &["--config", &config])?;
    replacement
        .node
        .fabctl(&["cluster", "join", &nodes[2].api, "--token", &saved_token])?;
    let members = [&nodes[1].node, &nodes[2].node, &replacement.node];
    for node in members {
        wait_for("n2, n3, n4 as voters that are up", || {
            let rows = node
                .fabctl_json(&["node", "list"])?
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut names: Vec<&str> = rows.iter().filter_map(|n| n["name"].as_str()).collect();
            names.sort_unstable();
            Ok((names == ["n2", "n3", "n4"]
                && rows.iter().all(|n| {
                    n["state"].as_str() == Some("up") && n["voter"].as_bool() == Some(true)
                }))
            .then_some(()))
        })?;
    }
    // History from before the loss reached the replacement, and the
    // cluster commits through it.
    let shown = replacement.node.fabctl_json(&["node", "show", "n2"])?;
    assert_eq!(shown["labels"]["rack"].as_str(), Some("r2"), "{shown}");
    replacement
        .node
        .fabctl(&["node", "label", "n4", "rack=r4"])?;
    for node in members {
        let shown = node.fabctl_json(&["node", "show", "n4"])?;
        assert_eq!(shown["labels"]["rack"].as_str(), Some("r4"), "{shown}");
    }
    // The token was used once; the dead node's removal is final.
    let reused = nodes[2].node.fabctl_output(&["cluster", "token"])?;
    assert!(reused.status.success(), "{reused:?}");
    nodes.truncate(0);
    Ok(())
}

/// Three processes, links cut by the transport's fault injection: the
/// isolated leader cannot commit, the majority elects a leader and can;
/// after healing every node holds the majority's change and not the
/// minority's.
#[test]
fn minority_cannot_commit_majority_can_and_all_agree_after_healing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("fabricd.toml");
    std::fs::write(&config, "[cluster]\nfault_injection = true\nraft_election_min_ms = 500\nraft_election_max_ms = 1000\nraft_heartbeat_ms = 100\n")?;
    let config = config.to_string_lossy().into_owned();
    let nodes = (1..=3)
        .map(|i| start_cluster_member(dir.path(), &format!("n{i}"), &["--config", &config]))
        .collect::<Result<Vec<_>>>()?;
    form_cluster(&nodes)?;
    for ClusterMember { node, .. } in &nodes {
        wait_for("three voters", || {
            let status = node.fabctl_json(&["cluster", "status"])?;
            Ok((status["voters"].as_array().map(Vec::len) == Some(3)).then_some(()))
        })?;
    }
    // Cut node 1 (the leader) off from the other two, both ways.
    let addresses: Vec<String> = nodes.iter().map(|member| member.cluster.clone()).collect();
    nodes[0].node.fabctl(&[
        "cluster",
        "faults",
        "--block",
        &addresses[1],
        "--block",
        &addresses[2],
    ])?;
    nodes[1]
        .node
        .fabctl(&["cluster", "faults", "--block", &addresses[0]])?;
    nodes[2]
        .node
        .fabctl(&["cluster", "faults", "--block", &addresses[0]])?;

    let minority = nodes[0]
        .node
        .fabctl_output(&["node", "label", "n1", "side=minority"])?;
    assert!(
        !minority.status.success(),
        "an isolated leader must not commit"
    );
    assert!(
        String::from_utf8_lossy(&minority.stderr).contains("not committed"),
        "{minority:?}"
    );

    let majority_leader = wait_for("a leader among n2 and n3", || {
        let status = nodes[1].node.fabctl_json(&["cluster", "status"])?;
        Ok(status["leader"]
            .as_u64()
            .filter(|&leader| leader == 2 || leader == 3))
    })?;
    wait_for("the majority to commit", || {
        let output = nodes[1]
            .node
            .fabctl_output(&["node", "label", "n1", "side=majority"])?;
        Ok(output.status.success().then_some(()))
    })?;

    // A current read anywhere in the majority sees the change at once
    // (read index through the leader); the isolated node cannot serve a
    // current read, only an explicitly local, stale one.
    for member in &nodes[1..] {
        let shown = member.node.fabctl_json(&["node", "show", "n1"])?;
        assert_eq!(
            shown["labels"]["side"].as_str(),
            Some("majority"),
            "{shown}"
        );
    }
    let current = nodes[0].node.fabctl_output(&["node", "show", "n1"])?;
    assert!(!current.status.success(), "{current:?}");
    assert!(
        String::from_utf8_lossy(&current.stderr).contains("could not be read current"),
        "{current:?}"
    );
    let stale = nodes[0]
        .node
        .fabctl_json(&["node", "show", "n1", "--local"])?;
    assert_ne!(
        stale["labels"]["side"].as_str(),
        Some("majority"),
        "{stale}"
    );

    // Heal: everyone converges on the majority's history.
    for ClusterMember { node, .. } in &nodes {
        node.fabctl(&["cluster", "faults"])?;
    }
    for ClusterMember { node, .. } in &nodes {
        wait_for("agreement after healing", || {
            let shown = node.fabctl_json(&["node", "show", "n1"])?;
            Ok((shown["labels"]["side"].as_str() == Some("majority")).then_some(()))
        })?;
        let status = node.fabctl_json(&["cluster", "status"])?;
        assert!(status["leader"].as_u64().is_some(), "{status}");
    }
    let _ = majority_leader;
    Ok(())
}
