//! The order in which one token's jobs run: pure, no I/O.
//!
//! Each caller has a lane (first in, first out); the lanes take turns (round robin by
//! caller identity), so a caller with a hundred jobs queued does not make a caller with
//! one wait for all of them. A job sent back because the token was lost goes to the head
//! of its lane and its caller to the head of the turn order, so it runs next.
//!
//! One [`Queue`] per token; its worker takes the next job ([`Queue::take_where`]) among
//! the callers that may have another job at the agent: a caller at its limit
//! (`limits.max_jobs_per_caller` jobs at the agent) keeps its place in the turns, and
//! its jobs wait in its lane, until one of them ends. Being at the limit never refuses
//! a job; it only decides which lane's turn comes first.

use std::collections::{BTreeMap, VecDeque};

/// How many recent durations the estimate averages.
const RECENT: usize = 32;

/// The jobs waiting for one token, by caller.
#[derive(Debug, Default)]
pub struct Queue {
    lanes: BTreeMap<String, VecDeque<String>>,
    /// Callers with a non-empty lane, in the order they get their next turn.
    turns: VecDeque<String>,
    /// Durations of recent jobs, in milliseconds.
    recent: VecDeque<u64>,
}

impl Queue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a job at the tail of its caller's lane.
    pub fn push(&mut self, caller: &str, job: &str) {
        let lane = self.lanes.entry(caller.to_owned()).or_default();
        lane.push_back(job.to_owned());
        if lane.len() == 1 {
            self.turns.push_back(caller.to_owned());
        }
    }

    /// Puts a job back at the head of its caller's lane, and the caller first in turn.
    pub fn push_front(&mut self, caller: &str, job: &str) {
        self.lanes
            .entry(caller.to_owned())
            .or_default()
            .push_front(job.to_owned());
        self.turns.retain(|c| c != caller);
        self.turns.push_front(caller.to_owned());
    }

    /// Takes the next job to run: the head of the lane whose turn it is.
    pub fn take(&mut self) -> Option<(String, String)> {
        self.take_where(|_| true)
    }

    /// Takes the next job to run among the callers `may_run` lets run another: the head
    /// of the first such lane in turn order. A caller passed over keeps its place, so
    /// it is first once it may run again.
    pub fn take_where(&mut self, may_run: impl Fn(&str) -> bool) -> Option<(String, String)> {
        let at = self.turns.iter().position(|c| may_run(c))?;
        let caller = self.turns.remove(at)?;
        let lane = self.lanes.get_mut(&caller)?;
        let job = lane.pop_front()?;
        if lane.is_empty() {
            self.lanes.remove(&caller);
        } else {
            self.turns.push_back(caller.clone());
        }
        Some((caller, job))
    }

    /// Removes a waiting job; false when it is not waiting here.
    pub fn cancel(&mut self, job: &str) -> bool {
        let Some(caller) = self
            .lanes
            .iter()
            .find(|(_, lane)| lane.iter().any(|j| j == job))
            .map(|(c, _)| c.clone())
        else {
            return false;
        };
        if let Some(lane) = self.lanes.get_mut(&caller) {
            lane.retain(|j| j != job);
            if lane.is_empty() {
                self.lanes.remove(&caller);
                self.turns.retain(|c| c != &caller);
            }
        }
        true
    }

    /// How many jobs run before this one (0: it is next); `None` when it is not waiting.
    pub fn position(&self, job: &str) -> Option<usize> {
        let (turn, caller) = self.turns.iter().enumerate().find(|(_, c)| {
            self.lanes
                .get(*c)
                .is_some_and(|l| l.iter().any(|j| j == job))
        })?;
        let k = self.lanes.get(caller)?.iter().position(|j| j == job)?;
        // Callers before this one in turn order run k + 1 jobs each before it (at most
        // their lane), those after it k.
        let before: usize = self
            .turns
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != turn)
            .map(|(i, c)| {
                let len = self.lanes.get(c).map_or(0, VecDeque::len);
                len.min(if i < turn { k + 1 } else { k })
            })
            .sum();
        Some(before + k)
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.lanes.values().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Jobs waiting per caller.
    pub fn by_caller(&self) -> BTreeMap<String, usize> {
        self.lanes
            .iter()
            .map(|(c, l)| (c.clone(), l.len()))
            .collect()
    }

    /// Remembers how long a job took, for [`Queue::estimate_ms`].
    pub fn record_duration(&mut self, ms: u64) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(ms);
    }

    /// How long until a job at `position` is done, counting the job running now (if
    /// any) and itself, from recent durations; `None` before any job ran.
    pub fn estimate_ms(&self, position: usize, running: bool) -> Option<u64> {
        if self.recent.is_empty() {
            return None;
        }
        let mean = self.recent.iter().sum::<u64>() / self.recent.len() as u64;
        Some(mean * (position as u64 + 1 + u64::from(running)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut Queue) -> Vec<String> {
        std::iter::from_fn(|| q.take().map(|(_, j)| j)).collect()
    }

    #[test]
    fn one_caller_is_first_in_first_out() {
        let mut q = Queue::new();
        for j in ["a1", "a2", "a3"] {
            q.push("a", j);
        }
        assert_eq!(q.len(), 3);
        assert_eq!(drain(&mut q), ["a1", "a2", "a3"]);
        assert!(q.is_empty() && q.take().is_none());
    }

    #[test]
    fn callers_take_turns_so_none_starves() {
        let mut q = Queue::new();
        for i in 1..=4 {
            q.push("a", &format!("a{i}"));
        }
        q.push("b", "b1");
        q.push("c", "c1");
        q.push("b", "b2");
        assert_eq!(drain(&mut q), ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]);
    }

    #[test]
    fn a_caller_that_comes_back_waits_for_its_turn() {
        let mut q = Queue::new();
        q.push("a", "a1");
        q.push("a", "a2");
        q.push("b", "b1");
        assert_eq!(q.take().unwrap().1, "a1");
        assert_eq!(q.take().unwrap().1, "b1");
        q.push("b", "b2");
        q.push("c", "c1");
        assert_eq!(drain(&mut q), ["a2", "b2", "c1"]);
    }

    #[test]
    fn a_job_sent_back_runs_next_and_the_turns_go_on() {
        let mut q = Queue::new();
        q.push("a", "a1");
        q.push("a", "a2");
        q.push("b", "b1");
        let (caller, job) = q.take().unwrap();
        q.push_front(&caller, &job);
        assert_eq!(q.position("a1"), Some(0));
        assert_eq!(drain(&mut q), ["a1", "b1", "a2"]);
        // Back when its caller had nothing else waiting.
        q.push("b", "b3");
        q.push_front("c", "c1");
        assert_eq!(drain(&mut q), ["c1", "b3"]);
    }

    #[test]
    fn positions_follow_the_turns() {
        let mut q = Queue::new();
        for j in ["a1", "a2", "a3"] {
            q.push("a", j);
        }
        q.push("b", "b1");
        q.push("c", "c1");
        q.push("c", "c2");
        // a1 b1 c1 a2 c2 a3
        let expected = ["a1", "b1", "c1", "a2", "c2", "a3"];
        for (i, j) in expected.iter().enumerate() {
            assert_eq!(q.position(j), Some(i), "{j}");
        }
        assert_eq!(q.position("zz"), None);
        assert_eq!(drain(&mut q), expected);
    }

    #[test]
    fn a_caller_at_its_limit_waits_in_its_lane_and_keeps_its_turn() {
        let mut q = Queue::new();
        for j in ["a1", "a2", "a3"] {
            q.push("a", j);
        }
        q.push("b", "b1");
        q.push("b", "b2");
        // a has a job at the agent and may have no other: b runs meanwhile.
        let busy = |c: &str| c != "a";
        assert_eq!(
            q.take_where(busy).unwrap(),
            ("b".to_owned(), "b1".to_owned())
        );
        assert_eq!(q.take_where(busy).unwrap().1, "b2");
        assert_eq!(
            q.take_where(busy),
            None,
            "only a's jobs wait, and a is at its limit"
        );
        assert_eq!(q.len(), 3, "nothing was dropped");
        assert_eq!(q.position("a1"), Some(0));
        // a's job ended: a's lane runs in order.
        q.push("b", "b3");
        assert_eq!(drain(&mut q), ["a1", "b3", "a2", "a3"]);
    }

    #[test]
    fn a_caller_passed_over_is_first_when_it_may_run_again() {
        let mut q = Queue::new();
        q.push("a", "a1");
        q.push("a", "a2");
        q.push("b", "b1");
        q.push("c", "c1");
        // a is at its limit: b takes its turn, a keeps its place before c.
        assert_eq!(q.take_where(|c| c != "a").unwrap().1, "b1");
        assert_eq!(q.position("a1"), Some(0));
        assert_eq!(drain(&mut q), ["a1", "c1", "a2"]);
    }

    #[test]
    fn cancel_removes_only_that_job() {
        let mut q = Queue::new();
        q.push("a", "a1");
        q.push("b", "b1");
        q.push("a", "a2");
        assert!(q.cancel("b1"));
        assert!(!q.cancel("b1"), "already gone");
        assert_eq!(q.by_caller(), BTreeMap::from([("a".to_owned(), 2)]));
        assert_eq!(q.position("a2"), Some(1));
        assert_eq!(drain(&mut q), ["a1", "a2"]);
    }

    #[test]
    fn estimates_come_from_recent_durations() {
        let mut q = Queue::new();
        assert_eq!(q.estimate_ms(0, false), None, "nothing ran yet");
        q.record_duration(100);
        q.record_duration(300);
        assert_eq!(q.estimate_ms(0, false), Some(200));
        assert_eq!(q.estimate_ms(2, true), Some(800));
        for _ in 0..RECENT {
            q.record_duration(10);
        }
        assert_eq!(q.estimate_ms(0, false), Some(10), "old durations age out");
    }
}
