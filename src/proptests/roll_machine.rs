//! The roll machine against a model of the workers it drives: random sequences of requests,
//! readiness, exits, failed spawns and time, with the invariants of README's "Rolling restart".

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use crate::event::WorkerId;
use crate::roll::{Action, Input, Roll};

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
enum Op {
    /// USR2 / HUP.
    Request,
    /// The roll's new worker becomes ready.
    CandidateReady,
    /// The roll's new worker exits before it is ready (a bad release).
    CandidateExits,
    /// Time passes, then a Tick.
    Wait(u64),
    /// Readiness or exit of a worker the machine does not know (a crash respawn's).
    Stray(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Request),
        6 => Just(Op::CandidateReady),
        1 => Just(Op::CandidateExits),
        2 => (0u64..12_000).prop_map(Op::Wait),
        1 => any::<bool>().prop_map(Op::Stray),
    ]
}

#[derive(Debug)]
struct Worker {
    slot: usize,
    gen: u64,
    ready: bool,
    /// Told to stop (draining); no longer counts as alive for the slot.
    stopping: bool,
    exited: bool,
}

/// The supervisor's side, reduced to what the machine's guarantees are about.
struct Model {
    n: usize,
    roll: Roll,
    now: Instant,
    workers: BTreeMap<WorkerId, Worker>,
    next_id: WorkerId,
    spawn_fails: Vec<bool>,
    /// The roll under way as the model sees it: generation, next slot to retire.
    active: Option<(u64, usize)>,
    pending: bool,
    last_gen: u64,
    rolls_started: Vec<u64>,
    rolls_ended: Vec<u64>,
    expected_starts: usize,
}

impl Model {
    fn new(n: usize, spawn_fails: Vec<bool>) -> Model {
        let now = Instant::now();
        let workers =
            (0..n).map(|s| (s as WorkerId, Worker { slot: s, gen: 1, ready: true, stopping: false, exited: false }));
        Model {
            n,
            roll: Roll::new(n, TIMEOUT),
            now,
            workers: workers.collect(),
            next_id: n as WorkerId,
            spawn_fails,
            active: None,
            pending: false,
            last_gen: 1,
            rolls_started: vec![],
            rolls_ended: vec![],
            expected_starts: 0,
        }
    }

    fn live(&self) -> impl Iterator<Item = (&WorkerId, &Worker)> {
        self.workers.iter().filter(|(_, w)| !w.stopping && !w.exited)
    }

    /// The roll's new worker: alive, not ready, not stopping.
    fn candidate(&self) -> Option<WorkerId> {
        self.live().find(|(_, w)| !w.ready).map(|(id, _)| *id)
    }

    fn step(&mut self, input: Input) -> Result<(), TestCaseError> {
        let actions = self.roll.step(input, self.now);
        self.apply(actions)
    }

    fn apply(&mut self, actions: Vec<Action>) -> Result<(), TestCaseError> {
        for action in actions {
            match action {
                Action::Spawn { slot, gen } => {
                    prop_assert!(slot < self.n);
                    if slot == 0 {
                        prop_assert_eq!(gen, self.last_gen + 1, "each roll takes the next generation");
                        prop_assert!(self.active.is_none(), "a roll started while another ran");
                        self.last_gen = gen;
                        self.active = Some((gen, 0));
                        self.rolls_started.push(gen);
                    } else {
                        prop_assert_eq!(self.active, Some((gen, slot)), "slots in order, one at a time");
                    }
                    prop_assert!(self.candidate().is_none(), "two new workers at once");
                    let fail = if self.spawn_fails.is_empty() { false } else { self.spawn_fails.remove(0) };
                    if fail {
                        self.step(Input::SpawnFailed("no such file".into()))?;
                    } else {
                        let id = self.next_id;
                        self.next_id += 1;
                        self.workers.insert(id, Worker { slot, gen, ready: false, stopping: false, exited: false });
                        let more = self.roll.step(Input::Spawned(id), self.now);
                        prop_assert!(more.is_empty(), "Spawned led to {more:?}");
                    }
                }
                Action::Retire { slot, gen, worker, done, of } => {
                    prop_assert_eq!(self.active, Some((gen, slot)));
                    prop_assert_eq!((done, of), (slot + 1, self.n));
                    let w = &self.workers[&worker];
                    prop_assert!(w.ready && !w.stopping && !w.exited && w.slot == slot && w.gen == gen);
                    for (id, w) in self.workers.iter_mut() {
                        if w.slot == slot && *id != worker {
                            w.stopping = true;
                        }
                    }
                    self.active = Some((gen, slot + 1));
                }
                Action::Stop(id) => {
                    prop_assert_eq!(Some(id), self.candidate(), "only the roll's new worker is stopped");
                    self.workers.get_mut(&id).unwrap().stopping = true;
                }
                Action::Finished { gen } => {
                    prop_assert_eq!(self.active, Some((gen, self.n)), "finished before the last slot");
                    for slot in 0..self.n {
                        prop_assert!(
                            self.live().any(|(_, w)| w.slot == slot && w.gen == gen && w.ready),
                            "slot {} does not run gen {}",
                            slot,
                            gen
                        );
                    }
                    self.end(gen);
                }
                Action::Abandoned { gen, slot, .. } => {
                    prop_assert_eq!(self.active, Some((gen, slot)));
                    prop_assert!(self.candidate().is_none(), "the new worker was left running");
                    // The old workers keep serving: every slot has a ready worker.
                    for s in 0..self.n {
                        prop_assert!(self.live().any(|(_, w)| w.slot == s && w.ready), "slot {} lost its worker", s);
                    }
                    self.end(gen);
                }
            }
            self.counts()?;
        }
        Ok(())
    }

    fn end(&mut self, gen: u64) {
        self.active = None;
        self.rolls_ended.push(gen);
        if std::mem::take(&mut self.pending) {
            self.expected_starts += 1;
        }
    }

    /// After every action: never more than N+1 workers alive, never fewer than N-1 ready.
    fn counts(&self) -> Result<(), TestCaseError> {
        let alive = self.live().count();
        prop_assert!(alive <= self.n + 1, "{alive} workers alive with N = {}", self.n);
        let ready = self.live().filter(|(_, w)| w.ready).count();
        prop_assert!(ready + 1 >= self.n, "{ready} ready with N = {}", self.n);
        Ok(())
    }

    /// After every input (its actions all carried out): the machine and the model agree.
    fn invariants(&self) -> Result<(), TestCaseError> {
        self.counts()?;
        prop_assert_eq!(self.roll.rolling_gen(), self.active.map(|(g, _)| g));
        prop_assert_eq!(self.roll.pending(), self.pending);
        Ok(())
    }

    fn run(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Request => {
                if self.active.is_some() {
                    self.pending = true;
                } else {
                    self.expected_starts += 1;
                }
                self.step(Input::Request)?;
            }
            Op::CandidateReady => {
                if let Some(id) = self.candidate() {
                    self.workers.get_mut(&id).unwrap().ready = true;
                    self.step(Input::Ready(id))?;
                }
            }
            Op::CandidateExits => {
                if let Some(id) = self.candidate() {
                    self.workers.get_mut(&id).unwrap().exited = true;
                    self.step(Input::Exited { worker: id, how: "exited with status 1".into() })?;
                }
            }
            Op::Wait(ms) => {
                self.now += Duration::from_millis(ms);
                self.step(Input::Tick)?;
            }
            Op::Stray(ready) => {
                let id = 1_000_000 + self.next_id;
                let input = if ready { Input::Ready(id) } else { Input::Exited { worker: id, how: "x".into() } };
                let out = self.roll.step(input, self.now);
                prop_assert!(out.is_empty(), "a stranger's event led to {out:?}");
            }
        }
        self.invariants()?;
        // Stopped workers finish draining and exit in the model's next turn.
        for w in self.workers.values_mut() {
            if w.stopping {
                w.exited = true;
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn roll_machine_keeps_its_guarantees(
        n in 1usize..6,
        ops in proptest::collection::vec(op(), 0..80),
        spawn_fails in proptest::collection::vec(proptest::bool::weighted(0.1), 0..40),
    ) {
        let mut m = Model::new(n, spawn_fails);
        for op in ops {
            m.run(op)?;
        }
        // Let every roll under way (and the one a request left pending) run to its end.
        let mut turns = 0;
        while m.active.is_some() {
            turns += 1;
            prop_assert!(turns < 100, "a roll that never ends");
            m.run(Op::CandidateReady)?;
        }
        prop_assert!(!m.roll.pending() && !m.pending);
        // Each roll ended exactly once (finished or abandoned), and requests coalesced: one
        // roll for each request while idle, plus one for any number during a roll.
        prop_assert_eq!(&m.rolls_started, &m.rolls_ended);
        prop_assert_eq!(m.rolls_started.len(), m.expected_starts);
    }

    #[test]
    fn cancel_ends_everything(n in 1usize..5, ops in proptest::collection::vec(op(), 0..40)) {
        let mut m = Model::new(n, vec![]);
        for op in ops {
            m.run(op)?;
        }
        let out = m.roll.step(Input::Cancel, m.now);
        prop_assert!(out.is_empty());
        prop_assert_eq!(m.roll.rolling_gen(), None);
        prop_assert!(!m.roll.pending());
        prop_assert!(m.roll.step(Input::Tick, m.now + TIMEOUT * 2).is_empty());
    }
}
