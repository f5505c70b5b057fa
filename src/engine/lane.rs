//! Lanes: the fused segments of several runs share one transaction and commit together.
//!
//! A lane passes one open transaction from executor to executor, like a baton. An executor
//! with a segment to run asks its lane for a seat; the lane opens a transaction (or goes on
//! with the open one) and hands it over. The executor runs its segment inside a savepoint of
//! its own, writes its run (fenced by its lease, as every write is) and hands the transaction
//! back; should anything of its segment fail, it rolls back to its savepoint first, so the
//! others are untouched. The batch's first member needs no savepoint: nobody wrote before it,
//! so it undoes its writes by rolling the whole transaction back and beginning it again. When
//! no other executor is waiting, or the batch is full, the lane commits and tells every member
//! whose writes it holds how the commit went; no member announces anything before that.
//!
//! Batching adapts to load: a batch is whoever is waiting when the previous member hands the
//! transaction back, so an idle system commits each segment at once, and a busy one gathers
//! the segments that queued while the batch ran.
//!
//! Two rules keep peers from deciding on each other's uncommitted writes: runs of one subject
//! (e.g. one email) go to the same lane and never share a batch (a second one waits for the
//! next batch), so a registration never sees, say, a customer its peer inserted and then
//! rolled back; and peers run one after another, so each sees only what earlier members wrote.

use std::collections::{HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::metrics_names as m;

/// The most runs one batch commits. Each member holds a savepoint that writes, and beyond
/// 64 subtransactions PostgreSQL's per-backend cache overflows (every backend then reads
/// `pg_subtrans`); 16 keeps well below that, matches the concurrency the bench runs at, and
/// bounds what one member waits for the others (each takes about a millisecond).
pub const MAX_BATCH_RUNS: usize = 16;

/// The most executors that queue for one lane. A lane serves one member at a time, so a
/// member that would wait behind this many commits on its own instead: under load the
/// queue stays about as long as a batch, and the segments beyond it run in parallel instead
/// of waiting turns.
pub const MAX_QUEUED: usize = 6;

/// How many lanes a worker starts unless told otherwise. Each lane serves one member at a
/// time, so lanes trade commits saved for members waiting their turn: in five interleaved
/// pairs of `sagaflow bench` at C = 16 (README, Performance, phase 11), eight lanes gave a
/// ratio of 0.43 (0.41–0.44) against two lanes' 0.37 (0.37–0.38), with 2.1 runs per commit
/// instead of 7.1; none at all gave 0.40, and twelve and sixteen no more than eight.
pub const DEFAULT_LANES: usize = 8;

/// The lanes of a worker.
pub(crate) struct Lanes {
    lanes: Vec<Lane>,
}

/// One lane: where its requests go, and how many wait.
struct Lane {
    requests: mpsc::UnboundedSender<Request>,
    queue: Queue,
}

/// How many executors wait for a lane (or are being served), at most [`MAX_QUEUED`].
#[derive(Default)]
struct Queue(Arc<AtomicUsize>);

impl Queue {
    /// A place in the queue, or `None` when it is full.
    fn enter(&self) -> Option<Queued> {
        if self.0.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED {
            self.0.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Queued(Arc::clone(&self.0)))
    }
}

/// An executor waiting for a seat.
struct Request {
    subject: Option<String>,
    seat: oneshot::Sender<Seat>,
    /// Counts the request as queued until the lane takes it (or drops it).
    _queued: Queued,
}

/// A place in a lane's queue, given back when dropped.
struct Queued(Arc<AtomicUsize>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A place in a batch: the batch's open transaction, to be handed back.
pub(crate) struct Seat {
    tx: Option<Transaction<'static, Postgres>>,
    /// The member is the first to write in the transaction: it takes no savepoint, and undoes
    /// its writes by beginning the transaction again.
    first: bool,
    back: Option<oneshot::Sender<Returned>>,
    committed: Option<oneshot::Receiver<Result<(), String>>>,
}

/// The batch's transaction as a member hands it back.
struct Returned {
    tx: Transaction<'static, Postgres>,
    /// The member's writes are in it, to be committed with the batch (not undone).
    kept: bool,
}

/// The name of each member's savepoint: members take turns, so the latest one is always the
/// current member's, and none is released (they end with the commit).
const SAVEPOINT: &str = "SAVEPOINT segment";
const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT segment";
/// How the first member undoes its writes: one round trip, and the connection stays in a
/// transaction, as the lane's `Transaction` expects.
const BEGIN_AGAIN: &str = "ROLLBACK; BEGIN";

impl Lanes {
    /// Starts `count` lanes committing batches of at most `max_runs` on `pool`, but no more
    /// lanes than half the pool's connections: each open batch holds one, and the runs that
    /// commit on their own, the claims and the heartbeats need the rest.
    pub(crate) fn start(pool: &PgPool, count: usize, max_runs: usize) -> Self {
        let count = lanes_for(count, pool.options().get_max_connections());
        let lanes = (0..count)
            .map(|_| {
                let (sender, requests) = mpsc::unbounded_channel();
                tokio::spawn(run_lane(pool.clone(), requests, max_runs.clamp(1, MAX_BATCH_RUNS)));
                Lane {
                    requests: sender,
                    queue: Queue::default(),
                }
            })
            .collect();
        Self { lanes }
    }

    /// A seat in a batch of the lane of `route` (the run's subject, or else its id), with
    /// the batch's savepoint for this member taken (unless it is the batch's first). `None` when the lane's queue is full
    /// ([`MAX_QUEUED`]) or no batch could be opened: the caller then commits on its own.
    pub(crate) async fn seat(&self, subject: Option<&str>, route: impl Hash) -> Option<Seat> {
        let mut hasher = DefaultHasher::new();
        match subject {
            Some(subject) => subject.hash(&mut hasher),
            None => route.hash(&mut hasher),
        }
        let lane = &self.lanes[(hasher.finish() % self.lanes.len() as u64) as usize];
        let queued = lane.queue.enter()?;
        let (seat, given) = oneshot::channel();
        lane.requests
            .send(Request {
                subject: subject.map(str::to_string),
                seat,
                _queued: queued,
            })
            .ok()?;
        let mut seat = given.await.ok()?;
        let taken = match seat.tx.as_mut() {
            Some(_) if seat.first => return Some(seat),
            Some(tx) => sqlx::raw_sql(SAVEPOINT).execute(&mut **tx).await,
            None => return None,
        };
        if let Err(e) = taken {
            // The batch's connection failed: the lane learns it at commit; this member
            // commits on its own.
            warn!(error = %e, "taking a savepoint in a batch failed");
            seat.leave(false);
            return None;
        }
        Some(seat)
    }
}

impl Seat {
    /// The batch's transaction, for the member's segment (given back with [`Seat::leave`] or
    /// [`Seat::commit`]).
    pub(crate) fn take(&mut self) -> Option<Transaction<'static, Postgres>> {
        self.tx.take()
    }

    /// Undoes everything this member wrote (its savepoint, or the whole transaction for the
    /// first) and leaves the batch; the other members are untouched.
    pub(crate) async fn rewind(mut self, mut tx: Transaction<'static, Postgres>) {
        let undo = if self.first { BEGIN_AGAIN } else { ROLLBACK_TO_SAVEPOINT };
        if let Err(e) = sqlx::raw_sql(undo).execute(&mut *tx).await {
            // The lane learns it at commit, which then fails for the whole batch.
            warn!(error = %e, first = self.first, "undoing a member's writes failed");
        }
        self.tx = Some(tx);
        self.leave(false);
    }

    /// Hands the transaction back with this member's writes in it and waits for the batch's
    /// commit: `Ok` once it committed, the error otherwise (nothing of the batch is durable,
    /// or, if the connection failed during the commit, its outcome is unknown).
    pub(crate) async fn commit(mut self, tx: Transaction<'static, Postgres>) -> Result<(), String> {
        self.tx = Some(tx);
        let committed = self.committed.take();
        self.leave(true);
        match committed {
            Some(committed) => committed
                .await
                .unwrap_or_else(|_| Err("the batch's lane stopped before committing".into())),
            None => Err("no batch to commit".into()),
        }
    }

    /// Hands the transaction back. A member that no longer has it (its task ended with the
    /// transaction in it, which rolls it back) drops the channel instead, and the lane fails
    /// the batch: it cannot know what of the others was lost.
    fn leave(&mut self, kept: bool) {
        if let (Some(tx), Some(back)) = (self.tx.take(), self.back.take()) {
            let _ = back.send(Returned { tx, kept });
        }
    }
}

/// How many lanes to start when `asked` for, on a pool of `connections`: at least one, at
/// most half the connections.
fn lanes_for(asked: usize, connections: u32) -> usize {
    let half = usize::try_from(connections / 2).unwrap_or(usize::MAX);
    asked.min(half).max(1)
}

/// A lane: batches its waiting executors' segments, one transaction and one commit each.
async fn run_lane(pool: PgPool, mut requests: mpsc::UnboundedReceiver<Request>, max_runs: usize) {
    let mut deferred: VecDeque<Request> = VecDeque::new();
    loop {
        let first = match deferred.pop_front() {
            Some(request) => request,
            None => match requests.recv().await {
                Some(request) => request,
                None => return,
            },
        };
        let mut tx = match pool.begin().await {
            Ok(tx) => Some(tx),
            Err(e) => {
                // Dropping the request tells the executor: it commits on its own.
                warn!(error = %e, "opening a batch failed");
                continue;
            }
        };
        let mut members: Vec<oneshot::Sender<Result<(), String>>> = Vec::new();
        let mut subjects: HashSet<String> = HashSet::new();
        let mut next = Some(first);
        let mut lost = false;
        // Every member seated counts against the bound, also one that undid its writes: its
        // savepoint stays a subtransaction of the batch.
        let mut seated = 0;
        while let Some(request) = next.take() {
            let Some(open) = tx.take() else { break };
            let (back, returned) = oneshot::channel();
            let (done, committed) = oneshot::channel();
            let subject = request.subject.clone();
            let seat = Seat {
                tx: Some(open),
                // Nobody wrote yet (a member that was rewound as first began it again).
                first: members.is_empty(),
                back: Some(back),
                committed: Some(committed),
            };
            match request.seat.send(seat) {
                Ok(()) => match returned.await {
                    // A member that undid its writes waits for no commit (and, as the first,
                    // began the transaction again: the next is first in turn).
                    Ok(Returned { tx: open, kept }) => {
                        tx = Some(open);
                        seated += 1;
                        if kept {
                            members.push(done);
                        }
                        if let Some(subject) = subject {
                            subjects.insert(subject);
                        }
                    }
                    Err(_) => {
                        lost = true;
                        break;
                    }
                },
                // The executor stopped waiting: take the transaction back.
                Err(mut seat) => tx = seat.tx.take(),
            }
            if seated >= max_runs {
                break;
            }
            next = next_request(&mut deferred, &mut requests, &subjects);
        }
        let outcome = match tx {
            Some(open) if !lost => open.commit().await.map_err(|e| e.to_string()),
            _ => Err("a member of the batch stopped before handing its transaction back".into()),
        };
        if let Err(e) = &outcome {
            warn!(error = %e, members = members.len(), "a batch did not commit");
        }
        metrics::histogram!(m::BATCH_RUNS).record(members.len() as f64);
        for member in members {
            let _ = member.send(outcome.clone());
        }
    }
}

/// The next request that may join the batch: deferred ones first, then any that is waiting;
/// one whose subject is already in the batch waits for the next.
fn next_request(
    deferred: &mut VecDeque<Request>,
    requests: &mut mpsc::UnboundedReceiver<Request>,
    subjects: &HashSet<String>,
) -> Option<Request> {
    let joins = |r: &Request| r.subject.as_ref().is_none_or(|s| !subjects.contains(s));
    if let Some(i) = deferred.iter().position(joins) {
        return deferred.remove(i);
    }
    while let Ok(request) = requests.try_recv() {
        if joins(&request) {
            return Some(request);
        }
        deferred.push_back(request);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;

    #[test]
    fn lanes_take_at_most_half_the_pool_and_at_least_one() {
        assert_eq!(lanes_for(DEFAULT_LANES, 24), DEFAULT_LANES);
        assert_eq!(lanes_for(8, 10), 5);
        assert_eq!(lanes_for(8, 3), 1);
        assert_eq!(lanes_for(2, 1), 1);
        assert_eq!(lanes_for(0, 24), 1, "the caller starts none for 0; asked, one at least");
    }

    use crate::pg::embedded::EmbeddedPostgres;

    /// What a member of the test's batch does with its seat.
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Member {
        /// Writes its row, then a statement fails (the transaction is aborted) and it undoes
        /// its writes.
        Fails,
        /// Writes its row and commits with the batch.
        Keeps,
    }

    /// Seats `member` in the only lane and does what it says; records in `served` the order
    /// it was served in and whether it was the batch's first. `Some(commit outcome)` for a
    /// member that keeps its writes.
    async fn serve(
        lanes: Arc<Lanes>,
        id: i32,
        member: Member,
        served: Arc<Mutex<Vec<(i32, bool)>>>,
    ) -> Option<Result<(), String>> {
        let mut seat = lanes.seat(None, id).await.expect("a seat");
        served.lock().expect("not poisoned").push((id, seat.first));
        let mut tx = seat.take().expect("the batch's transaction");
        sqlx::query("INSERT INTO member_rows (id, top_xid) VALUES ($1, pg_current_xact_id()::text)")
            .bind(id)
            .execute(&mut *tx)
            .await
            .expect("the member's write");
        match member {
            Member::Fails => {
                let failed = sqlx::raw_sql("SELECT 1 / 0").execute(&mut *tx).await;
                assert!(failed.is_err(), "the statement fails and aborts the transaction");
                seat.rewind(tx).await;
                None
            }
            Member::Keeps => Some(seat.commit(tx).await),
        }
    }

    /// A batch whose first member fails (its transaction aborted) begins again for the next,
    /// which is then first itself; a later member's failure rolls back to its savepoint; the
    /// members that keep their writes commit them together, and nothing of the failed ones.
    #[tokio::test]
    async fn members_that_fail_first_or_later_take_nothing_of_their_peers_with_them() {
        let cluster = tokio::task::spawn_blocking(EmbeddedPostgres::start_ephemeral)
            .await
            .expect("the start does not panic")
            .expect("a cluster for the test");
        let pool = PgPool::connect(&cluster.url("postgres")).await.expect("connect");
        sqlx::raw_sql("CREATE TABLE member_rows (id int PRIMARY KEY, top_xid text NOT NULL)")
            .execute(&pool)
            .await
            .expect("the test's table");
        let lanes = Arc::new(Lanes::start(&pool, 1, MAX_BATCH_RUNS));
        let served = Arc::new(Mutex::new(Vec::new()));
        // The first is seated before the others ask, so they all queue for its batch.
        let mut first = lanes.seat(None, 1).await.expect("a seat");
        assert!(first.first, "the batch's first member takes no savepoint");
        let plan = [
            (2, Member::Fails),
            (3, Member::Keeps),
            (4, Member::Fails),
            (5, Member::Keeps),
        ];
        let members: Vec<_> = plan
            .iter()
            .map(|&(id, member)| tokio::spawn(serve(Arc::clone(&lanes), id, member, Arc::clone(&served))))
            .collect();
        // The queue counts the member being served too.
        while lanes.lanes[0].queue.0.load(Ordering::Relaxed) < plan.len() + 1 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let mut tx = first.take().expect("the batch's transaction");
        sqlx::query("INSERT INTO member_rows (id, top_xid) VALUES (1, pg_current_xact_id()::text)")
            .execute(&mut *tx)
            .await
            .expect("the first member's write");
        assert!(sqlx::raw_sql("SELECT 1 / 0").execute(&mut *tx).await.is_err());
        first.rewind(tx).await;
        let mut outcomes = Vec::new();
        for member in members {
            outcomes.push(member.await.expect("the member does not panic"));
        }

        // Served in turn, in one batch; a member is first exactly when all before it failed.
        let served = served.lock().expect("not poisoned").clone();
        assert_eq!(served.len(), plan.len());
        let fails = |id: i32| plan.iter().any(|&(i, m)| i == id && m == Member::Fails);
        for (turn, &(id, was_first)) in served.iter().enumerate() {
            let all_before_failed = served[..turn].iter().all(|&(before, _)| fails(before));
            assert_eq!(was_first, all_before_failed, "member {id}, served {turn}: {served:?}");
        }
        for (&(id, member), outcome) in plan.iter().zip(&outcomes) {
            match member {
                Member::Keeps => assert_eq!(outcome, &Some(Ok(())), "member {id} commits"),
                Member::Fails => assert_eq!(outcome, &None),
            }
        }
        let rows: Vec<(i32, String)> = sqlx::query_as("SELECT id, top_xid FROM member_rows ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("read the rows");
        let ids: Vec<i32> = rows.iter().map(|r| r.0).collect();
        assert_eq!(ids, [3, 5], "only the writes of the members that kept them");
        assert_eq!(rows[0].1, rows[1].1, "committed by one transaction");
        pool.close().await;
    }

    fn request(subject: Option<&str>) -> Request {
        Request {
            subject: subject.map(str::to_string),
            seat: oneshot::channel().0,
            _queued: Queue::default().enter().expect("an empty queue has room"),
        }
    }

    #[test]
    fn a_full_queue_refuses_until_a_place_is_given_back() {
        let queue = Queue::default();
        let mut places: Vec<Queued> = (0..MAX_QUEUED).map(|_| queue.enter().expect("room")).collect();
        assert!(queue.enter().is_none(), "a member beyond the bound commits on its own");
        places.pop();
        let again = queue.enter();
        assert!(again.is_some(), "a place given back is taken again");
        assert!(queue.enter().is_none());
        drop(places);
        assert!(queue.enter().is_some());
    }

    #[test]
    fn a_subject_already_in_the_batch_waits_for_the_next_and_keeps_its_place() {
        let (sender, mut requests) = mpsc::unbounded_channel();
        for subject in [Some("a@x.io"), Some("b@x.io"), None, Some("a@x.io")] {
            sender.send(request(subject)).ok();
        }
        let mut deferred = VecDeque::new();
        let batch: HashSet<String> = ["a@x.io".to_string()].into();
        // a@x.io is deferred; b@x.io joins.
        let joined = next_request(&mut deferred, &mut requests, &batch).expect("one joins");
        assert_eq!(joined.subject.as_deref(), Some("b@x.io"));
        assert_eq!(deferred.len(), 1);
        // A run without a subject joins any batch; the second a@x.io is deferred too.
        let joined = next_request(&mut deferred, &mut requests, &batch).expect("one joins");
        assert_eq!(joined.subject, None);
        assert!(next_request(&mut deferred, &mut requests, &batch).is_none());
        assert_eq!(deferred.len(), 2);
        // In the next batch the deferred ones come first, still one per subject.
        let next_batch = HashSet::new();
        let first = next_request(&mut deferred, &mut requests, &next_batch).expect("deferred first");
        assert_eq!(first.subject.as_deref(), Some("a@x.io"));
        let with_first: HashSet<String> = ["a@x.io".to_string()].into();
        assert!(next_request(&mut deferred, &mut requests, &with_first).is_none());
        assert_eq!(deferred.len(), 1);
    }
}
