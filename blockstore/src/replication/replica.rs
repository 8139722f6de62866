//! What a replica checks before it applies a request.

use std::collections::BTreeSet;

use super::{Generation, Header, OpId, Session};

/// A replica's rules for one volume: the highest generation it has seen
/// (kept durably by the caller), its current session, and the mutating
/// ops of that session it has already applied.
#[derive(Debug)]
pub struct ReplicaGate {
    incarnation: u32,
    opens: u32,
    session: Option<Session>,
    highest: Generation,
    applied: BTreeSet<OpId>,
    done_below: OpId,
    /// Writes and copy-ins applied in this session.
    mutations: u64,
}

/// The outcome of an `Open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// A new session. If `persist` is set, the caller must store it as
    /// the highest generation, durably, before it answers.
    Session {
        session: Session,
        persist: Option<Generation>,
    },
    Fenced {
        highest: Generation,
    },
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Apply,
    /// Already applied in this session: answer `Done`, apply nothing.
    Duplicate,
    Fenced {
        highest: Generation,
    },
    NotOpen,
}

impl ReplicaGate {
    /// The gate of a replica process; `incarnation` differs at every start
    /// and `highest` is the generation stored durably.
    pub fn new(incarnation: u32, highest: Generation) -> ReplicaGate {
        ReplicaGate {
            incarnation,
            opens: 0,
            session: None,
            highest,
            applied: BTreeSet::new(),
            done_below: 0,
            mutations: 0,
        }
    }

    /// Whether a flush that must follow the first `after` writes and
    /// copy-ins of the session can run now; if not, the caller holds it
    /// until enough have been applied.
    pub fn flush_ready(&self, after: u64) -> bool {
        self.mutations >= after
    }

    /// The highest generation seen.
    pub fn highest(&self) -> Generation {
        self.highest
    }

    /// Starts a session for `generation`, ending any other.
    pub fn open(&mut self, generation: Generation) -> Opened {
        if generation < self.highest {
            return Opened::Fenced {
                highest: self.highest,
            };
        }
        let persist = (generation > self.highest).then_some(generation);
        self.highest = generation;
        self.opens += 1;
        let session = (u64::from(self.incarnation) << 32) | u64::from(self.opens);
        self.session = Some(session);
        self.applied.clear();
        self.done_below = 0;
        self.mutations = 0;
        Opened::Session { session, persist }
    }

    /// Ends the session: a request it admitted could not be applied (and
    /// may be partly), so neither it nor anything after it may be taken
    /// as done. The frontend, told `NotOpen`, opens a new one.
    pub fn end_session(&mut self) {
        self.session = None;
        self.applied.clear();
        self.done_below = 0;
        self.mutations = 0;
    }

    /// Checks a request's header; for a mutating request that is to be
    /// applied, records it as applied.
    pub fn admit(&mut self, head: &Header, mutates: bool) -> Admit {
        if head.generation < self.highest {
            return Admit::Fenced {
                highest: self.highest,
            };
        }
        if self.session != Some(head.session) || head.generation != self.highest {
            return Admit::NotOpen;
        }
        if head.done_below > self.done_below {
            self.done_below = head.done_below;
            self.applied = self.applied.split_off(&head.done_below);
        }
        if !mutates {
            return Admit::Apply;
        }
        if head.op < self.done_below || !self.applied.insert(head.op) {
            return Admit::Duplicate;
        }
        self.mutations += 1;
        Admit::Apply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(generation: Generation, session: Session, op: OpId) -> Header {
        Header {
            generation,
            session,
            op,
            done_below: 0,
        }
    }

    #[test]
    fn lower_generations_are_fenced_and_new_ones_persisted_first() {
        let mut gate = ReplicaGate::new(1, 5);
        assert_eq!(gate.open(4), Opened::Fenced { highest: 5 });
        let Opened::Session { session, persist } = gate.open(5) else {
            panic!("generation 5 opens");
        };
        assert_eq!(persist, None, "5 is already stored");
        assert_eq!(gate.admit(&head(5, session, 1), true), Admit::Apply);
        let Opened::Session {
            session: newer,
            persist,
        } = gate.open(6)
        else {
            panic!("generation 6 opens");
        };
        assert_eq!(persist, Some(6));
        assert_eq!(
            gate.admit(&head(5, session, 2), true),
            Admit::Fenced { highest: 6 }
        );
        assert_eq!(gate.admit(&head(6, newer, 2), true), Admit::Apply);
    }

    #[test]
    fn old_sessions_and_duplicates_apply_nothing() {
        let mut gate = ReplicaGate::new(1, 0);
        let Opened::Session { session: first, .. } = gate.open(1) else {
            panic!("opens");
        };
        let Opened::Session {
            session: second, ..
        } = gate.open(1)
        else {
            panic!("opens again");
        };
        assert_ne!(first, second);
        assert_eq!(gate.admit(&head(1, first, 1), true), Admit::NotOpen);
        assert_eq!(gate.admit(&head(1, second, 1), true), Admit::Apply);
        assert_eq!(gate.admit(&head(1, second, 1), true), Admit::Duplicate);
        assert_eq!(
            gate.admit(&head(1, second, 1), false),
            Admit::Apply,
            "reads repeat"
        );
        let pruned = Header {
            done_below: 5,
            ..head(1, second, 6)
        };
        assert_eq!(gate.admit(&pruned, true), Admit::Apply);
        assert_eq!(gate.admit(&head(1, second, 3), true), Admit::Duplicate);
        // A restarted replica knows no session.
        let mut restarted = ReplicaGate::new(2, gate.highest());
        assert_eq!(restarted.admit(&head(1, second, 7), true), Admit::NotOpen);
    }
}
