//! The storage semantics, pure: an etcd-shaped multi-version key-value map. Every write
//! gets the next revision; reads can be made at a past revision; the history of changes
//! since the last compaction can be replayed for watches. No I/O, no clock, no locks: the
//! backends wrap it (embedded: a write-ahead log; tests: nothing at all).
use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

/// A store revision: 0 before the first write, then 1, 2, …
pub type Revision = u64;

/// One version of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Arc<[u8]>,
    /// The revision that created the key (the first put since it last did not exist).
    pub create_revision: Revision,
    /// The revision of this version.
    pub mod_revision: Revision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change, as a watch sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub revision: Revision,
    /// For a put, the new version; for a delete, the version deleted (its value), with
    /// `mod_revision` the deletion's revision.
    pub kv: KeyValue,
    /// The version before this change, if the key existed.
    pub prev: Option<KeyValue>,
}

/// What a conditional write expects to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Whatever is there (or nothing).
    Any,
    /// The key must not exist (create).
    Absent,
    /// The key must exist at exactly this mod revision (optimistic concurrency).
    ModRevision(Revision),
    /// The key must exist, at any revision.
    Present,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The revision asked for has been compacted away.
    #[error("revision {requested} has been compacted (oldest available: {compacted})")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    /// The revision asked for is in the future.
    #[error("revision {requested} is newer than the current revision {current}")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    /// A conditional write found something else than it expected; carries what is there.
    #[error("the key is not as expected")]
    Conflict(Option<KeyValue>),
}

/// One write, as it is logged and replayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Put { key: String, value: Arc<[u8]> },
    Delete { key: String },
}

/// A page of a range read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub kvs: Vec<KeyValue>,
    /// Whether more keys follow the page.
    pub more: bool,
    /// The revision the read was made at.
    pub revision: Revision,
}

/// Where a range read of `prefix` resuming after `start_after` begins: the key, and
/// whether it is excluded (a continuation) or included (the prefix itself). Both backends
/// page the same way.
pub fn range_start<'a>(prefix: &'a str, start_after: Option<&'a str>) -> (&'a str, bool) {
    match start_after {
        Some(k) if k >= prefix => (k, true),
        _ => (prefix, false),
    }
}

/// The multi-version map. History is kept per key until compaction.
#[derive(Debug, Default)]
pub struct Mvcc {
    revision: Revision,
    compacted: Revision,
    /// Versions of each key, oldest first; `None` marks a deletion at that revision.
    keys: BTreeMap<String, Vec<(Revision, Option<KeyValue>)>>,
    /// Every change since `compacted`, in revision order (for watches).
    events: VecDeque<Arc<Event>>,
}

impl Mvcc {
    pub fn new() -> Self {
        Self::default()
    }

    /// The revision of the latest write.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The oldest revision still readable (reads and watches before it get `Compacted`).
    pub fn compacted(&self) -> Revision {
        self.compacted
    }

    fn check(&self, at: Revision) -> Result<(), Error> {
        if at > self.revision {
            return Err(Error::FutureRevision {
                requested: at,
                current: self.revision,
            });
        }
        if at < self.compacted {
            return Err(Error::Compacted {
                requested: at,
                compacted: self.compacted,
            });
        }
        Ok(())
    }

    fn version_at(versions: &[(Revision, Option<KeyValue>)], at: Revision) -> Option<&KeyValue> {
        let idx = versions.partition_point(|(r, _)| *r <= at);
        if idx == 0 {
            return None;
        }
        versions[idx - 1].1.as_ref()
    }

    /// The key's latest version.
    pub fn get(&self, key: &str) -> Option<&KeyValue> {
        self.keys
            .get(key)
            .and_then(|v| v.last())
            .and_then(|(_, kv)| kv.as_ref())
    }

    /// The key as it was at revision `at`.
    pub fn get_at(&self, key: &str, at: Revision) -> Result<Option<&KeyValue>, Error> {
        self.check(at)?;
        Ok(self.keys.get(key).and_then(|v| Self::version_at(v, at)))
    }

    /// Keys starting with `prefix` and not before `start_after` (exclusive), in key
    /// order, at revision `at` (the latest when `None`), at most `limit` (0: no limit).
    pub fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        at: Option<Revision>,
        limit: usize,
    ) -> Result<Range, Error> {
        let at = at.unwrap_or(self.revision);
        self.check(at)?;
        let lower = match range_start(prefix, start_after) {
            (k, true) => Bound::Excluded(k.to_string()),
            (k, false) => Bound::Included(k.to_string()),
        };
        let mut kvs = Vec::new();
        let mut more = false;
        for (key, versions) in self.keys.range((lower, Bound::Unbounded)) {
            if !key.starts_with(prefix) {
                break;
            }
            if let Some(kv) = Self::version_at(versions, at) {
                if limit > 0 && kvs.len() == limit {
                    more = true;
                    break;
                }
                kvs.push(kv.clone());
            }
        }
        Ok(Range {
            kvs,
            more,
            revision: at,
        })
    }

    /// How many keys start with `prefix` (latest revision).
    pub fn count(&self, prefix: &str) -> usize {
        self.keys
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(_, v)| v.last().is_some_and(|(_, kv)| kv.is_some()))
            .count()
    }

    /// Checks what a conditional write expects, without writing.
    pub fn check_expect(&self, key: &str, expect: Expect) -> Result<(), Error> {
        let current = self.get(key);
        let ok = match expect {
            Expect::Any => true,
            Expect::Absent => current.is_none(),
            Expect::Present => current.is_some(),
            Expect::ModRevision(r) => current.is_some_and(|kv| kv.mod_revision == r),
        };
        if ok {
            Ok(())
        } else {
            Err(Error::Conflict(current.cloned()))
        }
    }

    /// A conditional write: checks `expect`, then applies `write` at the next revision.
    /// A delete of a missing key is a conflict (there is nothing to delete).
    pub fn write(&mut self, write: Write, expect: Expect) -> Result<Arc<Event>, Error> {
        let key = match &write {
            Write::Put { key, .. } | Write::Delete { key } => key.clone(),
        };
        self.check_expect(&key, expect)?;
        if matches!(write, Write::Delete { .. }) && self.get(&key).is_none() {
            return Err(Error::Conflict(None));
        }
        Ok(self.apply(write))
    }

    /// Applies a write unconditionally at the next revision (also used to replay a log).
    pub fn apply(&mut self, write: Write) -> Arc<Event> {
        let revision = self.revision + 1;
        self.revision = revision;
        let (key, new) = match write {
            Write::Put { key, value } => (key, Some(value)),
            Write::Delete { key } => (key, None),
        };
        let versions = self.keys.entry(key.clone()).or_default();
        let prev = versions.last().and_then(|(_, kv)| kv.clone());
        let event = match new {
            Some(value) => {
                let kv = KeyValue {
                    key,
                    value,
                    create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
                    mod_revision: revision,
                };
                versions.push((revision, Some(kv.clone())));
                Event {
                    kind: EventKind::Put,
                    revision,
                    kv,
                    prev,
                }
            }
            None => {
                versions.push((revision, None));
                let mut kv = prev.clone().unwrap_or(KeyValue {
                    key,
                    value: Arc::from(&b""[..]),
                    create_revision: revision,
                    mod_revision: revision,
                });
                kv.mod_revision = revision;
                Event {
                    kind: EventKind::Delete,
                    revision,
                    kv,
                    prev,
                }
            }
        };
        let event = Arc::new(event);
        self.events.push_back(event.clone());
        event
    }

    /// Changes to keys under `prefix` with a revision greater than `after`, in order.
    /// `Compacted` when some of them are gone.
    pub fn events_after(&self, prefix: &str, after: Revision) -> Result<Vec<Arc<Event>>, Error> {
        if after < self.compacted {
            return Err(Error::Compacted {
                requested: after,
                compacted: self.compacted,
            });
        }
        let start = self.events.partition_point(|e| e.revision <= after);
        Ok(self
            .events
            .iter()
            .skip(start)
            .filter(|e| e.kv.key.starts_with(prefix))
            .cloned()
            .collect())
    }

    /// Forgets history before `revision`: older versions, deleted keys and events. Reads
    /// and watches at older revisions then fail with `Compacted`.
    pub fn compact(&mut self, revision: Revision) {
        let revision = revision.min(self.revision);
        if revision <= self.compacted {
            return;
        }
        self.compacted = revision;
        self.keys.retain(|_, versions| {
            // Keep the version visible at `revision` and everything after it.
            let idx = versions.partition_point(|(r, _)| *r <= revision);
            if idx > 1 {
                versions.drain(..idx - 1);
            }
            !(versions.len() == 1 && versions[0].1.is_none())
        });
        let keep = self.events.partition_point(|e| e.revision <= revision);
        self.events.drain(..keep);
    }

    /// Every live key's latest version (for snapshots of the log).
    pub fn live(&self) -> impl Iterator<Item = &KeyValue> {
        self.keys
            .values()
            .filter_map(|v| v.last().and_then(|(_, kv)| kv.as_ref()))
    }

    /// Restores a state from a snapshot: live keys with their revisions, at `revision`.
    pub fn restore(revision: Revision, kvs: Vec<KeyValue>) -> Self {
        let mut m = Mvcc {
            revision,
            compacted: revision,
            ..Default::default()
        };
        for kv in kvs {
            m.keys
                .insert(kv.key.clone(), vec![(kv.mod_revision, Some(kv))]);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(m: &mut Mvcc, k: &str, v: &str, expect: Expect) -> Result<Arc<Event>, Error> {
        m.write(
            Write::Put {
                key: k.into(),
                value: Arc::from(v.as_bytes()),
            },
            expect,
        )
    }

    fn val(kv: &KeyValue) -> &str {
        std::str::from_utf8(&kv.value).unwrap()
    }

    #[test]
    fn revisions_and_reads_at_a_revision() {
        let mut m = Mvcc::new();
        assert_eq!(m.revision(), 0);
        put(&mut m, "/a/1", "x", Expect::Absent).unwrap();
        put(&mut m, "/a/2", "y", Expect::Absent).unwrap();
        let e = put(&mut m, "/a/1", "x2", Expect::ModRevision(1)).unwrap();
        assert_eq!(e.kv.create_revision, 1);
        assert_eq!(e.kv.mod_revision, 3);
        assert_eq!(val(e.prev.as_ref().unwrap()), "x");
        assert_eq!(val(m.get_at("/a/1", 2).unwrap().unwrap()), "x");
        assert_eq!(val(m.get("/a/1").unwrap()), "x2");
        m.write(Write::Delete { key: "/a/2".into() }, Expect::Any)
            .unwrap();
        assert!(m.get("/a/2").is_none());
        assert_eq!(val(m.get_at("/a/2", 3).unwrap().unwrap()), "y");
        let r = m.range("/a/", None, Some(2), 0).unwrap();
        assert_eq!(r.kvs.len(), 2);
        let r = m.range("/a/", None, None, 0).unwrap();
        assert_eq!(r.kvs.len(), 1);
        assert!(matches!(
            m.get_at("/a/1", 9),
            Err(Error::FutureRevision { .. })
        ));
    }

    #[test]
    fn conditional_writes_conflict_with_what_is_there() {
        let mut m = Mvcc::new();
        put(&mut m, "k", "1", Expect::Absent).unwrap();
        match put(&mut m, "k", "2", Expect::Absent) {
            Err(Error::Conflict(Some(kv))) => assert_eq!(val(&kv), "1"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            put(&mut m, "k", "2", Expect::ModRevision(7)),
            Err(Error::Conflict(Some(_)))
        ));
        assert!(matches!(
            put(&mut m, "missing", "2", Expect::Present),
            Err(Error::Conflict(None))
        ));
        assert!(matches!(
            m.write(
                Write::Delete {
                    key: "missing".into()
                },
                Expect::Any
            ),
            Err(Error::Conflict(None))
        ));
        assert_eq!(m.revision(), 1, "failed writes take no revision");
    }

    #[test]
    fn pagination_with_limit_and_start_after() {
        let mut m = Mvcc::new();
        for i in 0..5 {
            put(&mut m, &format!("/p/{i}"), "v", Expect::Any).unwrap();
        }
        put(&mut m, "/q/0", "v", Expect::Any).unwrap();
        let p1 = m.range("/p/", None, None, 2).unwrap();
        assert_eq!(p1.kvs.len(), 2);
        assert!(p1.more);
        let last = p1.kvs.last().unwrap().key.clone();
        let p2 = m.range("/p/", Some(&last), Some(p1.revision), 2).unwrap();
        assert_eq!(p2.kvs[0].key, "/p/2");
        let p3 = m
            .range("/p/", Some(&p2.kvs[1].key), Some(p1.revision), 2)
            .unwrap();
        assert_eq!(p3.kvs.len(), 1);
        assert!(!p3.more);
        assert_eq!(m.count("/p/"), 5);
    }

    #[test]
    fn events_replay_and_compaction() {
        let mut m = Mvcc::new();
        put(&mut m, "/a/1", "x", Expect::Any).unwrap();
        put(&mut m, "/b/1", "x", Expect::Any).unwrap();
        put(&mut m, "/a/1", "y", Expect::Any).unwrap();
        m.write(Write::Delete { key: "/a/1".into() }, Expect::Any)
            .unwrap();
        let ev = m.events_after("/a/", 1).unwrap();
        assert_eq!(
            ev.iter().map(|e| (e.revision, e.kind)).collect::<Vec<_>>(),
            vec![(3, EventKind::Put), (4, EventKind::Delete)]
        );
        assert_eq!(val(&ev[1].kv), "y", "a delete carries the last value");
        m.compact(3);
        assert!(matches!(
            m.events_after("/a/", 1),
            Err(Error::Compacted { .. })
        ));
        assert_eq!(m.events_after("/a/", 3).unwrap().len(), 1);
        assert!(matches!(m.get_at("/a/1", 2), Err(Error::Compacted { .. })));
        assert_eq!(val(m.get_at("/a/1", 3).unwrap().unwrap()), "y");
        m.compact(4);
        assert!(m.get_at("/a/1", 4).unwrap().is_none());
        assert_eq!(m.live().count(), 1);
    }

    #[test]
    fn restore_from_a_snapshot() {
        let mut m = Mvcc::new();
        put(&mut m, "/a", "1", Expect::Any).unwrap();
        put(&mut m, "/b", "2", Expect::Any).unwrap();
        let r = Mvcc::restore(m.revision(), m.live().cloned().collect());
        assert_eq!(r.revision(), 2);
        assert_eq!(r.get("/b").unwrap().mod_revision, 2);
        assert!(matches!(
            r.events_after("", 1),
            Err(Error::Compacted { .. })
        ));
    }
}
