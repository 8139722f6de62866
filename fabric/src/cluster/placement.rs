//! Where a volume's replicas go: a pure function of the nodes' states and
//! free space, tested on its own.

use super::metadata::{NodeId, NodeState};

/// What placement needs to know about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: NodeId,
    pub state: NodeState,
    /// Free bytes in the node's data directory, less what volumes already
    /// placed there may still claim.
    pub free_bytes: u64,
}

/// Why no placement exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("a volume needs 1 to {max} replicas, not {asked}")]
    BadReplicaCount { asked: usize, max: usize },
    #[error("{replicas} replicas of {size_bytes} bytes need {replicas} nodes that are up with that much free space; only {eligible} qualify ({up} up)")]
    NotEnoughNodes {
        replicas: usize,
        size_bytes: u64,
        eligible: usize,
        up: usize,
    },
}

/// Most replicas a volume may have.
pub const REPLICAS_MAX: usize = 3;

/// Picks `replicas` distinct nodes for a volume of `size_bytes`: only nodes
/// that are up and have room, most free space first, ties broken by the
/// lower node id so that the choice is deterministic.
pub fn place(
    candidates: &[Candidate],
    replicas: usize,
    size_bytes: u64,
) -> Result<Vec<NodeId>, PlacementError> {
    if replicas == 0 || replicas > REPLICAS_MAX {
        return Err(PlacementError::BadReplicaCount {
            asked: replicas,
            max: REPLICAS_MAX,
        });
    }
    let up = candidates
        .iter()
        .filter(|c| c.state == NodeState::Up)
        .count();
    let mut eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.state == NodeState::Up && c.free_bytes >= size_bytes)
        .collect();
    eligible.sort_by(|a, b| b.free_bytes.cmp(&a.free_bytes).then(a.id.cmp(&b.id)));
    eligible.dedup_by_key(|c| c.id);
    if eligible.len() < replicas {
        return Err(PlacementError::NotEnoughNodes {
            replicas,
            size_bytes,
            eligible: eligible.len(),
            up,
        });
    }
    Ok(eligible.iter().take(replicas).map(|c| c.id).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId, state: NodeState, free_gib: u64) -> Candidate {
        Candidate {
            id,
            state,
            free_bytes: free_gib << 30,
        }
    }

    #[test]
    fn placement_table() {
        use NodeState::{Down, Suspect, Up};
        let three = [node(1, Up, 100), node(2, Up, 300), node(3, Up, 200)];
        /// (name, nodes, replicas, size, expected placement or error text)
        type Case = (
            &'static str,
            Vec<Candidate>,
            usize,
            u64,
            Result<Vec<NodeId>, &'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "most free first",
                three.to_vec(),
                2,
                1 << 30,
                Ok(vec![2, 3]),
            ),
            ("one replica", three.to_vec(), 1, 1 << 30, Ok(vec![2])),
            ("all three", three.to_vec(), 3, 1 << 30, Ok(vec![2, 3, 1])),
            (
                "too big for one node",
                three.to_vec(),
                3,
                150 << 30,
                Err("only 2 qualify"),
            ),
            (
                "down and suspect nodes are skipped",
                vec![
                    node(1, Down, 900),
                    node(2, Suspect, 800),
                    node(3, Up, 10),
                    node(4, Up, 5),
                ],
                2,
                1 << 30,
                Ok(vec![3, 4]),
            ),
            (
                "ties by id",
                vec![node(9, Up, 50), node(4, Up, 50), node(7, Up, 50)],
                2,
                0,
                Ok(vec![4, 7]),
            ),
            (
                "single node cluster",
                vec![node(1, Up, 50)],
                1,
                1 << 30,
                Ok(vec![1]),
            ),
            (
                "not enough nodes",
                vec![node(1, Up, 50)],
                2,
                1 << 30,
                Err("only 1 qualify (1 up)"),
            ),
            (
                "zero replicas",
                three.to_vec(),
                0,
                0,
                Err("1 to 3 replicas"),
            ),
            (
                "four replicas",
                three.to_vec(),
                4,
                0,
                Err("1 to 3 replicas"),
            ),
        ];
        for (name, candidates, replicas, size, expected) in cases {
            let result = place(&candidates, replicas, size);
            match expected {
                Ok(ids) => assert_eq!(result, Ok(ids), "{name}"),
                Err(text) => {
                    let message = result.expect_err(name).to_string();
                    assert!(message.contains(text), "{name}: {message}");
                }
            }
        }
    }

    #[test]
    fn replicas_are_distinct_even_with_duplicate_rows() {
        let rows = [
            node(1, NodeState::Up, 10),
            node(1, NodeState::Up, 10),
            node(2, NodeState::Up, 5),
        ];
        assert_eq!(place(&rows, 2, 0), Ok(vec![1, 2]));
        assert!(place(&rows, 3, 0).is_err());
    }
}
