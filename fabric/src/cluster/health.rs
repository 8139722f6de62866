//! Node health from heartbeats: up, suspect, down.
//!
//! Pure: the caller records when it last heard from each node and asks
//! with the current time; no clock is read here.

use std::collections::BTreeMap;
use std::time::Duration;

use super::metadata::{NodeId, NodeState};

/// When silence turns into suspicion, and suspicion into a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthTimings {
    /// Heartbeats are sent this often.
    pub heartbeat: Duration,
    /// A node not heard from for this long is suspect.
    pub suspect_after: Duration,
    /// A node not heard from for this long is down.
    pub down_after: Duration,
}

impl Default for HealthTimings {
    fn default() -> Self {
        HealthTimings {
            heartbeat: Duration::from_millis(500),
            suspect_after: Duration::from_secs(3),
            down_after: Duration::from_secs(15),
        }
    }
}

impl HealthTimings {
    /// Checks that the timings make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat.is_zero() {
            return Err("the heartbeat interval must be above zero".into());
        }
        if self.suspect_after < self.heartbeat * 2 {
            return Err(format!(
                "suspect_after ({:?}) must be at least two heartbeat intervals ({:?})",
                self.suspect_after, self.heartbeat
            ));
        }
        if self.down_after <= self.suspect_after {
            return Err(format!(
                "down_after ({:?}) must be longer than suspect_after ({:?})",
                self.down_after, self.suspect_after
            ));
        }
        Ok(())
    }
}

/// What one node knows of the others' liveness. Times are durations since
/// an arbitrary origin chosen by the caller (a monotonic clock's start).
#[derive(Debug, Clone, Default)]
pub struct Health {
    timings: HealthTimings,
    last_heard: BTreeMap<NodeId, Duration>,
}

impl Health {
    pub fn new(timings: HealthTimings) -> Health {
        Health {
            timings,
            last_heard: BTreeMap::new(),
        }
    }

    /// Records a heartbeat (or any message) from `node` at `now`.
    pub fn heard(&mut self, node: NodeId, now: Duration) {
        let last = self.last_heard.entry(node).or_insert(now);
        *last = (*last).max(now);
    }

    /// Forgets a node that left the cluster.
    pub fn forget(&mut self, node: NodeId) {
        self.last_heard.remove(&node);
    }

    /// The state of `node` at `now`. A node never heard from is down.
    pub fn state(&self, node: NodeId, now: Duration) -> NodeState {
        match self.last_heard.get(&node) {
            None => NodeState::Down,
            Some(&last) => {
                let silent = now.saturating_sub(last);
                if silent >= self.timings.down_after {
                    NodeState::Down
                } else if silent >= self.timings.suspect_after {
                    NodeState::Suspect
                } else {
                    NodeState::Up
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_silence() {
        let timings = HealthTimings {
            heartbeat: Duration::from_millis(100),
            suspect_after: Duration::from_millis(300),
            down_after: Duration::from_millis(1000),
        };
        let mut health = Health::new(timings);
        let ms = Duration::from_millis;
        health.heard(1, ms(1000));
        // Out-of-order reports never move the last-heard time back.
        health.heard(1, ms(900));
        let cases = [
            (1, ms(1000), NodeState::Up),
            (1, ms(1299), NodeState::Up),
            (1, ms(1300), NodeState::Suspect),
            (1, ms(1999), NodeState::Suspect),
            (1, ms(2000), NodeState::Down),
            (2, ms(0), NodeState::Down),
            // A clock earlier than the last report is not silence.
            (1, ms(500), NodeState::Up),
        ];
        for (node, now, expected) in cases {
            assert_eq!(health.state(node, now), expected, "node {node} at {now:?}");
        }
        health.heard(1, ms(2500));
        assert_eq!(
            health.state(1, ms(2600)),
            NodeState::Up,
            "a down node that speaks again is up"
        );
        health.forget(1);
        assert_eq!(health.state(1, ms(2600)), NodeState::Down);
    }

    #[test]
    fn timings_are_checked() {
        assert!(HealthTimings::default().validate().is_ok());
        let bad = HealthTimings {
            down_after: Duration::from_secs(1),
            ..HealthTimings::default()
        };
        assert!(bad.validate().unwrap_err().contains("down_after"));
        let tight = HealthTimings {
            suspect_after: Duration::from_millis(600),
            ..HealthTimings::default()
        };
        assert!(tight.validate().unwrap_err().contains("two heartbeat"));
    }
}
