//! Storage: an etcd-shaped interface (revisions, reads at a revision, watches from a
//! revision, conditional writes, compaction) over a pure multi-version core ([`mvcc`]).
//!
//! [`Embedded`] is the default backend: the core in memory, every write in a write-ahead
//! log ([`wal`]) made durable before it is acknowledged or seen by a reader or watcher.
pub mod etcd;
pub mod mvcc;
pub mod wal;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{broadcast, oneshot};
use tracing::{error, info, warn};

pub use mvcc::{Event, EventKind, Expect, KeyValue, Range, Revision, Write};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// What mvcc says: compacted, future revision or conflict.
    #[error(transparent)]
    Mvcc(#[from] mvcc::Error),
    /// The disk refused a write; the store takes no more writes.
    #[error("storage failed: {0}")]
    Failed(String),
}

/// Where a watch's live events come from.
enum Live {
    /// The embedded store's fan-out.
    Broadcast(broadcast::Receiver<Arc<Event>>),
    /// A backend's own stream (etcd).
    Channel(tokio::sync::mpsc::Receiver<Result<Arc<Event>, StoreError>>),
}

/// A watch: the events after the requested revision, then live ones, in order.
pub struct Watch {
    replay: std::vec::IntoIter<Arc<Event>>,
    live: Live,
    prefix: String,
    /// Live events up to this revision were in the replay.
    replayed_until: Revision,
    /// The last revision delivered.
    last: Revision,
}

impl Watch {
    /// The next event; `Err(Compacted)` when the watcher fell too far behind (the client
    /// must list again), `Ok(None)` when the store is gone.
    pub async fn next(&mut self) -> Result<Option<Arc<Event>>, StoreError> {
        if let Some(e) = self.replay.next() {
            self.last = e.revision;
            return Ok(Some(e));
        }
        loop {
            match &mut self.live {
                Live::Broadcast(rx) => match rx.recv().await {
                    Ok(e)
                        if e.revision <= self.replayed_until
                            || !e.kv.key.starts_with(&self.prefix) =>
                    {
                        continue;
                    }
                    Ok(e) => {
                        self.last = e.revision;
                        return Ok(Some(e));
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(None),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        return Err(mvcc::Error::Compacted {
                            requested: self.last,
                            compacted: self.last + 1,
                        }
                        .into());
                    }
                },
                Live::Channel(rx) => {
                    return match rx.recv().await {
                        Some(Ok(e)) => {
                            self.last = e.revision;
                            Ok(Some(e))
                        }
                        Some(Err(e)) => Err(e),
                        None => Ok(None),
                    };
                }
            }
        }
    }

    /// The revision of the last event delivered (or the one the watch started after).
    pub fn revision(&self) -> Revision {
        self.last
    }
}

struct State {
    mvcc: mvcc::Mvcc,
    /// The last durable revision: what readers and watchers see.
    committed: Revision,
    failed: Option<String>,
}

struct Request {
    write: Write,
    expect: Expect,
    done: oneshot::Sender<Result<Arc<Event>, StoreError>>,
}

/// The embedded store. Writes go through one writer thread that batches them into one
/// log append and one fsync (group commit).
pub struct Embedded {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Arc<Event>>,
    writer: std::sync::mpsc::Sender<Request>,
}

/// Watch channel depth: a watcher further behind than this must list again.
const WATCH_BUFFER: usize = 65536;
/// The log is folded into a snapshot when it grows past this.
const SNAPSHOT_AFTER_BYTES: u64 = 64 << 20;
/// At most this many writes share one fsync.
const MAX_BATCH: usize = 1024;

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Embedded {
    /// Opens the data directory, replays it, and starts the writer.
    pub fn open(dir: &Path) -> std::io::Result<Embedded> {
        let (mut wal, rec) = wal::Wal::open(dir)?;
        if rec.dropped > 0 {
            warn!(
                bytes = rec.dropped,
                "dropped a torn write at the end of the log (never acknowledged)"
            );
        }
        let mut m = match rec.snapshot {
            Some((rev, kvs)) => mvcc::Mvcc::restore(rev, kvs),
            None => mvcc::Mvcc::new(),
        };
        let mut replayed = 0;
        for r in rec.records {
            if r.revision <= m.revision() {
                continue;
            }
            if r.revision != m.revision() + 1 {
                return Err(std::io::Error::other(format!(
                    "log jumps from revision {} to {}",
                    m.revision(),
                    r.revision
                )));
            }
            m.apply(r.write);
            replayed += 1;
        }
        // History before a restart is not kept (etcd keeps it; kube-apiserver clients
        // relist on 410): watches resume from any revision since the start.
        let rev = m.revision();
        m.compact(rev);
        if wal.len > SNAPSHOT_AFTER_BYTES {
            wal.snapshot(rev, m.live())?;
        }
        info!(
            dir = %dir.display(),
            revision = rev,
            keys = m.live().count(),
            replayed,
            "embedded store open"
        );
        let state = Arc::new(Mutex::new(State {
            mvcc: m,
            committed: rev,
            failed: None,
        }));
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let (st, ev) = (state.clone(), events.clone());
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(rx, wal, st, ev))?;
        Ok(Embedded {
            state,
            events,
            writer: tx,
        })
    }

    /// The last durable revision.
    pub fn revision(&self) -> Revision {
        lock(&self.state).committed
    }

    pub fn compacted(&self) -> Revision {
        lock(&self.state).mvcc.compacted()
    }

    /// The key's latest durable version.
    pub fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let s = lock(&self.state);
        Ok(s.mvcc.get_at(key, s.committed)?.cloned())
    }

    /// A range read at `at` (the latest durable revision when `None`).
    pub fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        at: Option<Revision>,
        limit: usize,
    ) -> Result<Range, StoreError> {
        let s = lock(&self.state);
        let at = match at {
            Some(r) if r > s.committed => {
                return Err(mvcc::Error::FutureRevision {
                    requested: r,
                    current: s.committed,
                }
                .into());
            }
            Some(r) => r,
            None => s.committed,
        };
        Ok(s.mvcc.range(prefix, start_after, Some(at), limit)?)
    }

    pub fn count(&self, prefix: &str) -> usize {
        lock(&self.state).mvcc.count(prefix)
    }

    /// A conditional write, returned once durable.
    pub async fn write(&self, write: Write, expect: Expect) -> Result<Arc<Event>, StoreError> {
        let (done, rx) = oneshot::channel();
        self.writer
            .send(Request {
                write,
                expect,
                done,
            })
            .map_err(|_| StoreError::Failed("the store writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Failed("the store writer stopped".into()))?
    }

    /// Watches keys under `prefix` for changes after revision `after`.
    pub fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        let s = lock(&self.state);
        if after > s.committed {
            return Err(mvcc::Error::FutureRevision {
                requested: after,
                current: s.committed,
            }
            .into());
        }
        let replay: Vec<Arc<Event>> = s
            .mvcc
            .events_after(prefix, after)?
            .into_iter()
            .filter(|e| e.revision <= s.committed)
            .collect();
        // Subscribed under the lock: the writer publishes under it too, so nothing falls
        // between the replay (up to `committed`) and the live events (after it).
        let live = self.events.subscribe();
        Ok(Watch {
            replay: replay.into_iter(),
            live: Live::Broadcast(live),
            prefix: prefix.to_string(),
            replayed_until: s.committed,
            last: after,
        })
    }

    /// Forgets history before `revision`.
    pub fn compact(&self, revision: Revision) {
        let mut s = lock(&self.state);
        let upto = revision.min(s.committed);
        s.mvcc.compact(upto);
    }
}

fn writer(
    rx: std::sync::mpsc::Receiver<Request>,
    mut wal: wal::Wal,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Arc<Event>>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        // Apply in order (conflicts are decided here), log what succeeded.
        let mut bytes = Vec::new();
        let mut results: Vec<(oneshot::Sender<_>, Result<Arc<Event>, StoreError>)> =
            Vec::with_capacity(batch.len());
        {
            let mut s = lock(&state);
            for req in batch {
                if let Some(f) = &s.failed {
                    let _ = req.done.send(Err(StoreError::Failed(f.clone())));
                    continue;
                }
                match s.mvcc.write(req.write.clone(), req.expect) {
                    Ok(ev) => {
                        wal::encode(
                            &wal::Record {
                                revision: ev.revision,
                                write: req.write,
                            },
                            &mut bytes,
                        );
                        results.push((req.done, Ok(ev)));
                    }
                    Err(e) => results.push((req.done, Err(e.into()))),
                }
            }
        }
        if !bytes.is_empty()
            && let Err(e) = wal.append(&bytes)
        {
            // Memory is now ahead of the disk: refuse everything from here on.
            error!(error = %e, "cannot write the store's log; no more writes are accepted");
            let mut s = lock(&state);
            s.failed = Some(e.to_string());
            for (done, r) in results {
                let _ = done.send(r.and(Err(StoreError::Failed(e.to_string()))));
            }
            continue;
        }
        // Durable: visible to readers and watchers, then acknowledged.
        {
            let mut s = lock(&state);
            for (_, r) in &results {
                if let Ok(ev) = r {
                    s.committed = s.committed.max(ev.revision);
                    let _ = events.send(ev.clone());
                }
            }
            if wal.len > SNAPSHOT_AFTER_BYTES {
                let rev = s.mvcc.revision();
                if let Err(e) = wal.snapshot(rev, s.mvcc.live()) {
                    warn!(error = %e, "cannot snapshot the store's log; it keeps growing");
                }
            }
        }
        for (done, r) in results {
            let _ = done.send(r);
        }
    }
}

/// The store capstan-server runs on: the embedded one, or an etcd cluster.
pub enum Store {
    Embedded(Embedded),
    Etcd(Box<etcd::Etcd>),
}

impl Store {
    /// The latest revision readers see.
    pub async fn revision(&self) -> Result<Revision, StoreError> {
        match self {
            Store::Embedded(e) => Ok(e.revision()),
            Store::Etcd(e) => e.revision().await,
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        match self {
            Store::Embedded(e) => e.get(key),
            Store::Etcd(e) => e.get(key).await,
        }
    }

    pub async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        at: Option<Revision>,
        limit: usize,
    ) -> Result<Range, StoreError> {
        match self {
            Store::Embedded(e) => e.range(prefix, start_after, at, limit),
            Store::Etcd(e) => e.range(prefix, start_after, at, limit).await,
        }
    }

    pub async fn count(&self, prefix: &str) -> Result<usize, StoreError> {
        match self {
            Store::Embedded(e) => Ok(e.count(prefix)),
            Store::Etcd(e) => e.count(prefix).await,
        }
    }

    /// A conditional write, returned once durable.
    pub async fn write(&self, write: Write, expect: Expect) -> Result<Arc<Event>, StoreError> {
        match self {
            Store::Embedded(e) => e.write(write, expect).await,
            Store::Etcd(e) => e.write(write, expect).await,
        }
    }

    /// Watches keys under `prefix` for changes after revision `after`.
    pub async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        match self {
            Store::Embedded(e) => e.watch(prefix, after),
            Store::Etcd(e) => Ok(Watch {
                replay: Vec::new().into_iter(),
                live: Live::Channel(e.watch(prefix, after).await?),
                prefix: prefix.to_string(),
                replayed_until: after,
                last: after,
            }),
        }
    }

    /// Forgets history before `revision`.
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        match self {
            Store::Embedded(e) => {
                e.compact(revision);
                Ok(())
            }
            Store::Etcd(e) => e.compact(revision).await,
        }
    }
}

/// Compacts history older than the previous interval every `every`, as kube-apiserver
/// asks etcd to.
pub async fn compact_periodically(store: Arc<Store>, every: Duration) {
    let mut previous = store.revision().await.unwrap_or(0);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        if previous > 0
            && let Err(e) = store.compact(previous).await
        {
            warn!(error = %e, revision = previous, "compaction failed");
        }
        previous = store.revision().await.unwrap_or(previous);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, v: &str) -> Write {
        Write::Put {
            key: key.into(),
            value: Arc::from(v.as_bytes()),
        }
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("capstan-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test]
    async fn writes_survive_a_restart_and_watches_resume() {
        let dir = tmp("restart");
        {
            let s = Embedded::open(&dir).unwrap();
            s.write(put("/r/a", "1"), Expect::Absent).await.unwrap();
            s.write(put("/r/b", "2"), Expect::Absent).await.unwrap();
            let e = s
                .write(put("/r/a", "3"), Expect::ModRevision(1))
                .await
                .unwrap();
            assert_eq!(e.revision, 3);
            assert!(matches!(
                s.write(put("/r/a", "4"), Expect::ModRevision(1)).await,
                Err(StoreError::Mvcc(mvcc::Error::Conflict(Some(_))))
            ));
        }
        let s = Embedded::open(&dir).unwrap();
        assert_eq!(s.revision(), 3);
        assert_eq!(&*s.get("/r/a").unwrap().unwrap().value, b"3");
        assert_eq!(s.range("/r/", None, None, 0).unwrap().kvs.len(), 2);
        // A watch from the current revision sees the next writes, in order.
        let mut w = s.watch("/r/", 3).unwrap();
        s.write(put("/r/c", "5"), Expect::Any).await.unwrap();
        s.write(put("/x/c", "5"), Expect::Any).await.unwrap();
        s.write(Write::Delete { key: "/r/a".into() }, Expect::Any)
            .await
            .unwrap();
        let e1 = w.next().await.unwrap().unwrap();
        let e2 = w.next().await.unwrap().unwrap();
        assert_eq!((e1.revision, e1.kind), (4, EventKind::Put));
        assert_eq!((e2.revision, e2.kind), (6, EventKind::Delete));
        // From before the restart: compacted (the client relists).
        assert!(matches!(
            s.watch("/r/", 1),
            Err(StoreError::Mvcc(mvcc::Error::Compacted { .. }))
        ));
        // From a revision since the restart: the replay, then live.
        let mut w = s.watch("/r/", 4).unwrap();
        assert_eq!(w.next().await.unwrap().unwrap().revision, 6);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn concurrent_writers_share_fsyncs_and_lose_nothing() {
        let dir = tmp("concurrent");
        let s = Arc::new(Embedded::open(&dir).unwrap());
        let mut tasks = Vec::new();
        for t in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    s.write(put(&format!("/c/{t}/{i}"), "v"), Expect::Absent)
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(s.revision(), 400);
        drop(s);
        let s = Embedded::open(&dir).unwrap();
        assert_eq!(s.count("/c/"), 400);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
