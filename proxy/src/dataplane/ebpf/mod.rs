//! The eBPF data plane: loads capstan's socket programs, pins their maps and links under
//! bpffs, and reconciles the maps with the desired state ([`plan`] decides, this module
//! writes).
//!
//! Programs stay attached across agent restarts: their links are pinned, and a new agent
//! swaps its freshly loaded programs into the existing links (`BPF_LINK_UPDATE`) instead of
//! detaching anything, so no connection is made without a program in between.
pub mod plan;
mod sockterm;
mod sys;

use std::collections::BTreeSet;
use std::fs;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink};
use aya::{Ebpf, EbpfLoader, sys::SyscallError};
use capstan_proxy_common::*;
use foldhash::{HashSet, HashSetExt};
use tracing::{debug, error, info, warn};

use self::plan::{Changes, Ids, MapState, Op};
use super::{Dataplane, SyncReport};
use crate::model::DesiredState;

pub use sys::{ensure_bpffs, netns_cookie};

/// The compiled eBPF object, committed to the repository (`cargo xtask build-ebpf`
/// rebuilds it; CI checks that it matches the source).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!("../../../bpf/capstan-proxy.bpf.o");

/// Failures that stop the eBPF data plane from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// bpffs could not be found or mounted, or the pin directory not created.
    #[error("bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The cgroup to attach to could not be opened.
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The kernel refused the object (verifier, map creation).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("program {name}: {message}")]
    Program { name: &'static str, message: String },
    /// A map is missing from the object or could not be read.
    #[error("map {name}: {message}")]
    Map { name: &'static str, message: String },
}

/// Map sizes (flags).
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub reverse: u32,
    pub affinity: u32,
    pub maglev: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            services: DEFAULT_SERVICES_MAX,
            backends: DEFAULT_BACKENDS_MAX,
            reverse: DEFAULT_REVERSE_MAX,
            affinity: DEFAULT_AFFINITY_MAX,
            maglev: DEFAULT_MAGLEV_MAX,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Where maps and links are pinned (`/sys/fs/bpf/capstan`).
    pub pin_dir: PathBuf,
    /// The cgroup v2 directory whose sockets are balanced (the root for a whole node).
    pub cgroup: PathBuf,
    pub sizes: MapSizes,
    /// Maglev table size (prime, at most MAGLEV_MAX_TABLE).
    pub maglev_m: u32,
    /// Service CIDRs: addresses in them that are no frontend are refused at once.
    pub service_cidrs: Vec<ipnet::IpNet>,
}

pub struct EbpfDataplane {
    /// Keeps the programs loaded.
    _ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    /// Second descriptors on the same two maps, for batch writes (aya 0.14 has none).
    services_fd: MapData,
    backends_fd: MapData,
    maglev: HashMap<MapData, u32, MaglevTable>,
    node_addrs: HashMap<MapData, NodeAddrKey, u32>,
    reverse_entries: HashMap<MapData, ReverseKey, ReverseValue>,
    counters: PerCpuArray<MapData, u64>,
    mirror: MapState,
    ids: Ids,
    /// The balanced cgroup (its processes' namespaces are where client sockets live).
    cgroup: PathBuf,
    /// The desired state and node addresses of the last complete sync.
    applied: Option<(DesiredState, BTreeSet<IpAddr>)>,
    maglev_m: u32,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::Map {
        name,
        message: "not in the object".into(),
    })?;
    T::try_from(map).map_err(|e| Error::Map {
        name,
        message: e.to_string(),
    })
}

/// Entries of pinned maps being resized, on their way to the new maps.
struct Carried {
    services: Option<Vec<(ServiceKey, ServiceValue)>>,
    backends: Option<Vec<(u32, Backend)>>,
    reverse: Option<Vec<(ReverseKey, ReverseValue)>>,
    affinity: Option<Vec<(AffinityKey, AffinityValue)>>,
    maglev: Option<Vec<(u32, MaglevTable)>>,
}

/// If the map pinned as `name` holds another number of entries than `want`, reads its
/// entries and unpins it (the loader then creates one of the right size).
fn resize_pinned<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &'static str,
    want: u32,
) -> Result<Option<Vec<(K, V)>>, Error> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let err = |e: MapError| Error::Map {
        name,
        message: e.to_string(),
    };
    let data = MapData::from_pin(&path).map_err(err)?;
    let have = data.info().map_err(err)?.max_entries();
    if have == want {
        return Ok(None);
    }
    let map = aya::maps::Map::from_map_data(data).map_err(err)?;
    let map: HashMap<MapData, K, V> = HashMap::try_from(map).map_err(err)?;
    let entries: Vec<(K, V)> = map.iter().filter_map(|kv| kv.ok()).collect();
    fs::remove_file(&path).map_err(|e| Error::Map {
        name,
        message: format!("unpinning {} to resize it: {e}", path.display()),
    })?;
    warn!(
        map = name,
        from = have,
        to = want,
        entries = entries.len(),
        "resizing a pinned map; its entries are carried over"
    );
    Ok(Some(entries))
}

fn refill<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: Option<Vec<(K, V)>>,
) -> Result<(), Error> {
    let Some(entries) = entries else {
        return Ok(());
    };
    let map = ebpf.map_mut(name).ok_or(Error::Map {
        name,
        message: "not in the object".into(),
    })?;
    let mut map: HashMap<&mut MapData, K, V> = HashMap::try_from(map).map_err(|e| Error::Map {
        name,
        message: e.to_string(),
    })?;
    let mut dropped = 0;
    for (k, v) in entries {
        if map.insert(k, v, 0).is_err() {
            dropped += 1;
        }
    }
    if dropped > 0 {
        error!(
            map = name,
            dropped, "the resized map is too small for what the old one held"
        );
    }
    Ok(())
}

impl Carried {
    fn restore(self, ebpf: &mut Ebpf) -> Result<(), Error> {
        refill(ebpf, SERVICES_MAP, self.services)?;
        refill(ebpf, BACKENDS_MAP, self.backends)?;
        refill(ebpf, REVERSE_MAP, self.reverse)?;
        refill(ebpf, AFFINITY_MAP, self.affinity)?;
        refill(ebpf, MAGLEV_MAP, self.maglev)
    }
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

impl EbpfDataplane {
    /// Loads the programs and maps (reusing pinned maps), attaches or re-links the
    /// programs, and reads what the maps hold.
    pub fn start(opts: &Options) -> Result<Self, Error> {
        ensure_bpffs(&opts.pin_dir).map_err(|source| Error::Bpffs {
            path: opts.pin_dir.clone(),
            source,
        })?;
        sys::create_private_dir(&opts.pin_dir)
            .and_then(|_| sys::create_private_dir(&links_dir(&opts.pin_dir)))
            .map_err(|source| Error::Bpffs {
                path: opts.pin_dir.clone(),
                source,
            })?;
        let cgroup = fs::File::open(&opts.cgroup).map_err(|source| Error::Cgroup {
            path: opts.cgroup.clone(),
            source,
        })?;

        // Pinned maps of another size than the flags ask for: their entries are kept
        // aside, the old map unpinned, and the entries copied into the new map before the
        // new programs take over, so resizing is a restart like any other.
        let carried = Carried {
            services: resize_pinned(&opts.pin_dir, SERVICES_MAP, opts.sizes.services)?,
            backends: resize_pinned(&opts.pin_dir, BACKENDS_MAP, opts.sizes.backends)?,
            reverse: resize_pinned(&opts.pin_dir, REVERSE_MAP, opts.sizes.reverse)?,
            affinity: resize_pinned(&opts.pin_dir, AFFINITY_MAP, opts.sizes.affinity)?,
            maglev: resize_pinned(&opts.pin_dir, MAGLEV_MAP, opts.sizes.maglev)?,
        };

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&opts.pin_dir)
            .map_max_entries(SERVICES_MAP, opts.sizes.services)
            .map_max_entries(BACKENDS_MAP, opts.sizes.backends)
            .map_max_entries(REVERSE_MAP, opts.sizes.reverse)
            .map_max_entries(AFFINITY_MAP, opts.sizes.affinity)
            .map_max_entries(MAGLEV_MAP, opts.sizes.maglev)
            .load(OBJECT)?;
        carried.restore(&mut ebpf)?;

        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(Error::Program {
                    name,
                    message: "not in the object".into(),
                })?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| Error::Program {
                    name,
                    message: e.to_string(),
                })?;
            prog.load().map_err(|e| Error::Program {
                name,
                message: format!("{e:?}"),
            })?;
            let pin = links_dir(&opts.pin_dir).join(name);
            let prog_fd = prog.fd().map_err(|e| Error::Program {
                name,
                message: e.to_string(),
            })?;
            if pin.exists() {
                sys::link_update(&pin, prog_fd.as_fd()).map_err(|e| Error::Program {
                    name,
                    message: format!("updating pinned link {}: {e}", pin.display()),
                })?;
                debug!(program = name, "replaced the program in its pinned link");
            } else {
                let id = prog
                    .attach(
                        &cgroup, // With bpf_link the kernel takes no attach flags: links always coexist with
                        // other programs on the hook.
                        CgroupAttachMode::Single,
                    )
                    .map_err(|e| Error::Program {
                        name,
                        message: format!("attach to {}: {e:?}", opts.cgroup.display()),
                    })?;
                let link = prog.take_link(id).map_err(|e| Error::Program {
                    name,
                    message: e.to_string(),
                })?;
                let fd_link: FdLink =
                    link.try_into()
                        .map_err(|e: aya::programs::links::LinkError| Error::Program {
                            name,
                            message: e.to_string(),
                        })?;
                fd_link.pin(&pin).map_err(|e| Error::Program {
                    name,
                    message: format!("pin link: {e}"),
                })?;
                debug!(program = name, cgroup = %opts.cgroup.display(), "attached");
            }
        }

        let mut config: Array<MapData, Config> = take(&mut ebpf, CONFIG_MAP)?;
        let cookie = netns_cookie().map_err(|e| Error::Map {
            name: CONFIG_MAP,
            message: format!("SO_NETNS_COOKIE: {e}"),
        })?;
        config
            .set(
                0,
                Config {
                    host_netns_cookie: cookie,
                },
                0,
            )
            .map_err(|e| Error::Map {
                name: CONFIG_MAP,
                message: e.to_string(),
            })?;

        let mut cidrs: LpmTrie<MapData, [u32; 5], u32> = take(&mut ebpf, SERVICE_CIDRS_MAP)?;
        set_service_cidrs(&mut cidrs, &opts.service_cidrs).map_err(|e| Error::Map {
            name: SERVICE_CIDRS_MAP,
            message: e.to_string(),
        })?;

        let services: HashMap<MapData, ServiceKey, ServiceValue> = take(&mut ebpf, SERVICES_MAP)?;
        let backends: HashMap<MapData, u32, Backend> = take(&mut ebpf, BACKENDS_MAP)?;
        let maglev: HashMap<MapData, u32, MaglevTable> = take(&mut ebpf, MAGLEV_MAP)?;
        let node_addrs: HashMap<MapData, NodeAddrKey, u32> = take(&mut ebpf, NODE_ADDRS_MAP)?;
        let reverse_entries = take(&mut ebpf, REVERSE_MAP)?;
        let counters = take(&mut ebpf, COUNTERS_MAP)?;

        let open = |name: &'static str| {
            MapData::from_pin(opts.pin_dir.join(name)).map_err(|e| Error::Map {
                name,
                message: e.to_string(),
            })
        };
        let services_fd = open(SERVICES_MAP)?;
        let backends_fd = open(BACKENDS_MAP)?;
        let mirror = read_state(&services, &backends, &maglev, &node_addrs)?;
        info!(
            frontends = mirror.services.keys().filter(|k| k.slot == 0).count(),
            backends = mirror.backends.len(),
            pin_dir = %opts.pin_dir.display(),
            "eBPF data plane ready"
        );
        let ids = Ids::after(&mirror);
        Ok(EbpfDataplane {
            _ebpf: ebpf,
            services,
            backends,
            services_fd,
            backends_fd,
            maglev,
            node_addrs,
            reverse_entries,
            counters,
            mirror,
            ids,
            cgroup: opts.cgroup.clone(),
            applied: None,
            maglev_m: opts.maglev_m,
        })
    }

    /// What the maps hold, as read at start-up and kept since.
    pub fn state(&self) -> &MapState {
        &self.mirror
    }

    fn write(&mut self, op: &Op) -> Result<(), MapError> {
        let ignore_missing = |r: Result<(), MapError>| match r {
            Err(MapError::SyscallError(SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
            other => other,
        };
        match op {
            Op::PutNodeAddr(a) => self.node_addrs.insert(a, 1, 0),
            Op::PutBackend(id, b) => self.backends.insert(id, b, 0),
            Op::PutSlot(k, v) => self.services.insert(k, v, 0),
            Op::PutMaglev(id, t) => {
                let mut table = Box::new(MaglevTable {
                    m: t.len() as u32,
                    table: [0; MAGLEV_MAX_TABLE],
                    _pad: 0,
                });
                let n = t.len().min(MAGLEV_MAX_TABLE);
                table.table[..n].copy_from_slice(&t[..n]);
                self.maglev.insert(id, *table, 0)
            }
            Op::DelSlot(k) => ignore_missing(self.services.remove(k)),
            Op::DelBackend(id) => ignore_missing(self.backends.remove(id)),
            Op::DelMaglev(id) => ignore_missing(self.maglev.remove(id)),
            Op::DelNodeAddr(a) => ignore_missing(self.node_addrs.remove(a)),
        }
    }

    /// Applies changes in their safe order; a plan whose preparation failed is rolled
    /// back and keeps its last committed state. Within a stage, writes are grouped by kind
    /// (backends before slots, slot deletions before backend deletions) and batched.
    pub fn apply(&mut self, ch: &Changes) -> SyncReport {
        self.apply_stages(&ch.plans, [&ch.prepare, &ch.commit, &ch.cleanup])
    }

    fn apply_stages(
        &mut self,
        plans: &[crate::model::PlanKey],
        stages: [&Vec<plan::Tagged>; 3],
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let mut failed: HashSet<usize> = HashSet::new();
        // What undoes each write, tagged with its plan, in write order (no per-write
        // lookup: rolling back is rare, writing is not).
        let mut undo: Vec<(usize, Op)> = Vec::new();
        // Grow the mirror once, not by doubling while 100,000s of entries go in.
        let (slots, backends) =
            stages
                .iter()
                .flat_map(|s| s.iter())
                .fold((0, 0), |(s, b), (_, op)| match op {
                    Op::PutSlot(..) => (s + 1, b),
                    Op::PutBackend(..) => (s, b + 1),
                    _ => (s, b),
                });
        self.mirror.services.reserve(slots);
        self.mirror.backends.reserve(backends);
        for stage in stages {
            // Grouped by kind in rank order (a stable bucket pass, not a sort).
            let mut buckets: [Vec<&plan::Tagged>; 8] = Default::default();
            for t in stage.iter() {
                buckets[rank(&t.1) as usize].push(t);
            }
            let ops: Vec<&plan::Tagged> = buckets.into_iter().flatten().collect();
            let failed_before = failed.clone();
            for group in ops.chunk_by(|a, b| rank(&a.1) == rank(&b.1)) {
                let group: Vec<&plan::Tagged> = group
                    .iter()
                    .copied()
                    .filter(|(p, _)| !p.is_some_and(|p| failed.contains(&p)))
                    .collect();
                let results = self.write_group(&group);
                for ((plan, op), result) in group.iter().zip(results) {
                    match result {
                        Ok(()) => {
                            let inverse = plan::apply_to_mirror(&mut self.mirror, op);
                            if let Some(p) = plan {
                                undo.push((*p, inverse));
                            }
                            report.writes += 1;
                        }
                        Err(e) => {
                            let full = matches!(
                                e.raw_os_error(),
                                Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM)
                            );
                            match plan {
                                Some(p) if failed.insert(*p) => {
                                    report.failed_plans.push(plans[*p].clone());
                                    if full {
                                        report.full_maps.push(map_of(op));
                                    } else {
                                        report.errors += 1;
                                        error!(map = map_of(op), plan = %plans[*p], error = %e, "map write failed");
                                    }
                                }
                                Some(_) => {}
                                None => {
                                    report.errors += 1;
                                    error!(map = map_of(op), error = %e, "map write failed");
                                }
                            }
                        }
                    }
                }
            }
            // Roll back what the plans that just failed had already written.
            // Newest first (each plan's own writes in reverse order), in one pass.
            let newly: HashSet<usize> = failed.difference(&failed_before).copied().collect();
            if !newly.is_empty() {
                let ops: Vec<Op> = undo
                    .iter()
                    .rev()
                    .filter(|(q, _)| newly.contains(q))
                    .map(|(_, op)| op.clone())
                    .collect();
                undo.retain(|(q, _)| !newly.contains(q));
                for op in ops {
                    if self.write(&op).is_ok() {
                        let _ = plan::apply_to_mirror(&mut self.mirror, &op);
                    }
                }
            }
        }
        report
    }

    /// After a full map: retries the plans that failed one by one, smallest first, so
    /// one Service too large for the map does not starve the others.
    fn retry_smallest_first(
        &mut self,
        desired: &DesiredState,
        node_addrs: &BTreeSet<IpAddr>,
    ) -> SyncReport {
        let ch = plan::diff(
            &self.mirror,
            desired,
            node_addrs,
            self.maglev_m,
            &mut self.ids,
        );
        type Bucket = [Vec<plan::Tagged>; 3];
        let mut buckets: std::collections::BTreeMap<Option<usize>, Bucket> = Default::default();
        for (i, stage) in [&ch.prepare, &ch.commit, &ch.cleanup]
            .into_iter()
            .enumerate()
        {
            for t in stage {
                buckets.entry(t.0).or_default()[i].push(t.clone());
            }
        }
        let mut order: Vec<(Option<usize>, Bucket)> = buckets.into_iter().collect();
        // Removals (untagged) first: they free room.
        order.sort_by_key(|(p, b)| (p.is_some(), b.iter().map(Vec::len).sum::<usize>()));
        let mut report = SyncReport::default();
        let mut full: BTreeSet<&'static str> = BTreeSet::new();
        for (plan, b) in &order {
            // Once a map is full, a plan that needs a new entry cannot fit: it fails
            // without a write (100,000s of them would otherwise each try and roll back);
            // plans that only change entries in place still go.
            if !full.is_empty()
                && let Some(p) = plan
                && b.iter()
                    .flatten()
                    .any(|(_, op)| full.contains(map_of(op)) && self.needs_new_entry(op))
            {
                report.failed_plans.push(ch.plans[*p].clone());
                continue;
            }
            let r = self.apply_stages(&ch.plans, [&b[0], &b[1], &b[2]]);
            report.writes += r.writes;
            report.errors += r.errors;
            report.failed_plans.extend(r.failed_plans);
            full.extend(r.full_maps.iter().copied());
            report.full_maps.extend(r.full_maps);
        }
        report
    }

    /// Whether a write adds a key its map does not hold yet.
    fn needs_new_entry(&self, op: &Op) -> bool {
        match op {
            Op::PutSlot(k, _) => !self.mirror.services.contains_key(k),
            Op::PutBackend(id, _) => !self.mirror.backends.contains_key(id),
            Op::PutMaglev(id, _) => !self.mirror.maglev.contains_key(id),
            Op::PutNodeAddr(a) => !self.mirror.node_addrs.contains(a),
            _ => false,
        }
    }

    /// Writes a group of operations of one kind; one result per operation.
    fn write_group(&mut self, group: &[&plan::Tagged]) -> Vec<std::io::Result<()>> {
        let Some((_, first)) = group.first() else {
            return Vec::new();
        };
        match first {
            Op::PutSlot(..) => {
                let (keys, values): (Vec<ServiceKey>, Vec<ServiceValue>) = group
                    .iter()
                    .filter_map(|(_, op)| {
                        if let Op::PutSlot(k, v) = op {
                            Some((*k, *v))
                        } else {
                            None
                        }
                    })
                    .unzip();
                let fd = self.services_fd.fd().as_fd();
                batched(keys.len(), false, |from, to| {
                    sys::update_batch(fd, &keys[from..to], &values[from..to])
                })
            }
            Op::PutBackend(..) => {
                let (keys, values): (Vec<u32>, Vec<Backend>) = group
                    .iter()
                    .filter_map(|(_, op)| {
                        if let Op::PutBackend(k, v) = op {
                            Some((*k, *v))
                        } else {
                            None
                        }
                    })
                    .unzip();
                let fd = self.backends_fd.fd().as_fd();
                batched(keys.len(), false, |from, to| {
                    sys::update_batch(fd, &keys[from..to], &values[from..to])
                })
            }
            Op::DelSlot(..) => {
                let keys: Vec<ServiceKey> = group
                    .iter()
                    .filter_map(|(_, op)| {
                        if let Op::DelSlot(k) = op {
                            Some(*k)
                        } else {
                            None
                        }
                    })
                    .collect();
                let fd = self.services_fd.fd().as_fd();
                batched(keys.len(), true, |from, to| {
                    sys::delete_batch(fd, &keys[from..to])
                })
            }
            Op::DelBackend(..) => {
                let keys: Vec<u32> = group
                    .iter()
                    .filter_map(|(_, op)| {
                        if let Op::DelBackend(k) = op {
                            Some(*k)
                        } else {
                            None
                        }
                    })
                    .collect();
                let fd = self.backends_fd.fd().as_fd();
                batched(keys.len(), true, |from, to| {
                    sys::delete_batch(fd, &keys[from..to])
                })
            }
            _ => group
                .iter()
                .map(|(_, op)| {
                    self.write(op).map_err(|e| match e {
                        MapError::SyscallError(SyscallError { io_error, .. }) => io_error,
                        other => std::io::Error::other(other.to_string()),
                    })
                })
                .collect(),
        }
    }
}

/// Batches at least this long are split between two threads: the kernel's hash maps take
/// concurrent writers (per-bucket locks), and programming a large cluster from nothing is
/// mostly these writes.
const PARALLEL_BATCH_MIN: usize = 8192;

/// Runs a batch call over `n` elements (`call(from, to)` writes elements `from..to`),
/// resuming after each element the kernel refused (a deletion of a missing key counts as
/// done). Long batches run in two halves at once.
fn batched(
    n: usize,
    deleting: bool,
    call: impl Fn(usize, usize) -> sys::BatchResult + Sync,
) -> Vec<std::io::Result<()>> {
    if n < PARALLEL_BATCH_MIN {
        return batched_range(0, n, deleting, &call);
    }
    let mid = n / 2;
    std::thread::scope(|s| {
        let upper = s.spawn(|| batched_range(mid, n, deleting, &call));
        let mut out = batched_range(0, mid, deleting, &call);
        match upper.join() {
            Ok(rest) => out.extend(rest),
            Err(_) => {
                out.extend((mid..n).map(|_| Err(std::io::Error::other("map writer thread failed"))))
            }
        }
        out
    })
}

fn batched_range(
    start: usize,
    end: usize,
    deleting: bool,
    call: &impl Fn(usize, usize) -> sys::BatchResult,
) -> Vec<std::io::Result<()>> {
    let n = end - start;
    let mut out: Vec<std::io::Result<()>> = Vec::with_capacity(n);
    while out.len() < n {
        let from = start + out.len();
        let r = call(from, end);
        out.extend((0..r.done.min(n - out.len())).map(|_| Ok(())));
        if let Some(e) = r.error
            && out.len() < n
        {
            if deleting && e.raw_os_error() == Some(libc::ENOENT) {
                out.push(Ok(()));
            } else if !deleting && e.raw_os_error() == Some(libc::E2BIG) {
                // The map is full: nothing else fits in this pass.
                while out.len() < n {
                    out.push(Err(std::io::Error::from_raw_os_error(libc::E2BIG)));
                }
            } else {
                out.push(Err(e));
            }
        }
    }
    out
}

/// The order kinds of writes go in within a stage.
fn rank(op: &Op) -> u8 {
    match op {
        Op::PutNodeAddr(_) => 0,
        Op::PutBackend(..) => 1,
        Op::PutSlot(..) => 2,
        Op::PutMaglev(..) => 3,
        Op::DelSlot(_) => 4,
        Op::DelBackend(_) => 5,
        Op::DelMaglev(_) => 6,
        Op::DelNodeAddr(_) => 7,
    }
}

/// Makes the trie hold exactly `want`.
fn set_service_cidrs(
    trie: &mut LpmTrie<MapData, [u32; 5], u32>,
    want: &[ipnet::IpNet],
) -> Result<(), MapError> {
    let want: Vec<([u32; 5], u32)> = want.iter().map(plan::service_cidr_key).collect();
    let have: Vec<LpmKey<[u32; 5]>> = trie.keys().collect::<Result<_, _>>()?;
    for k in have {
        if !want.contains(&(k.data(), k.prefix_len())) {
            trie.remove(&k)?;
        }
    }
    for (data, len) in want {
        trie.insert(&LpmKey::new(len, data), 1, 0)?;
    }
    Ok(())
}

fn map_of(op: &Op) -> &'static str {
    match op {
        Op::PutNodeAddr(_) | Op::DelNodeAddr(_) => NODE_ADDRS_MAP,
        Op::PutBackend(..) | Op::DelBackend(_) => BACKENDS_MAP,
        Op::PutSlot(..) | Op::DelSlot(_) => SERVICES_MAP,
        Op::PutMaglev(..) | Op::DelMaglev(_) => MAGLEV_MAP,
    }
}

fn read_state(
    services: &HashMap<MapData, ServiceKey, ServiceValue>,
    backends: &HashMap<MapData, u32, Backend>,
    maglev: &HashMap<MapData, u32, MaglevTable>,
    node_addrs: &HashMap<MapData, NodeAddrKey, u32>,
) -> Result<MapState, Error> {
    let err = |name: &'static str| {
        move |e: MapError| Error::Map {
            name,
            message: e.to_string(),
        }
    };
    let mut st = MapState::default();
    for kv in services.iter() {
        let (k, v) = kv.map_err(err(SERVICES_MAP))?;
        st.services.insert(k, v);
    }
    for kv in backends.iter() {
        let (k, v) = kv.map_err(err(BACKENDS_MAP))?;
        st.backends.insert(k, v);
    }
    for kv in maglev.iter() {
        let (k, v) = kv.map_err(err(MAGLEV_MAP))?;
        let m = (v.m as usize).min(MAGLEV_MAX_TABLE);
        st.maglev.insert(k, v.table[..m].to_vec());
    }
    for k in node_addrs.keys() {
        st.node_addrs.insert(k.map_err(err(NODE_ADDRS_MAP))?);
    }
    Ok(st)
}

impl Dataplane for EbpfDataplane {
    fn sync(&mut self, desired: &DesiredState, node_addrs: &BTreeSet<IpAddr>) -> SyncReport {
        let report = self.sync_inner(desired, node_addrs);
        // Remember what is in place, so the next sync can look at what changed only.
        if report.failed_plans.is_empty() && report.errors == 0 {
            self.applied = Some((desired.clone(), node_addrs.clone()));
        } else {
            self.applied = None;
        }
        report
    }

    fn resync(&mut self) {
        self.applied = None;
    }

    fn map_entries(&self) -> Vec<(&'static str, usize)> {
        vec![
            (SERVICES_MAP, self.mirror.services.len()),
            (BACKENDS_MAP, self.mirror.backends.len()),
            (MAGLEV_MAP, self.mirror.maglev.len()),
            (NODE_ADDRS_MAP, self.mirror.node_addrs.len()),
        ]
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let names = [
            (counter::TRANSLATED, "translated"),
            (counter::REFUSED_NO_ENDPOINT, "refused_no_endpoint"),
            (counter::AFFINITY_HIT, "affinity_hit"),
            (counter::REVERSE_FULL, "reverse_map_insert_failed"),
            (counter::SLOT_MISS, "slot_miss"),
            (
                counter::REFUSED_UNKNOWN_FRONTEND,
                "refused_unknown_frontend",
            ),
        ];
        names
            .iter()
            .filter_map(|(i, n)| {
                let v = self.counters.get(i, 0).ok()?;
                Some((*n, v.iter().sum::<u64>()))
            })
            .collect()
    }
}

impl EbpfDataplane {
    /// Destroys connected UDP sockets to backends that no Service uses any more.
    fn terminate_udp_sockets(&self, removed: Vec<Backend>) {
        if removed.is_empty() {
            return;
        }
        let key = |b: &Backend| (b.addr, b.port, b.family);
        let still: HashSet<_> = self
            .mirror
            .backends
            .values()
            .filter(|b| b.proto == PROTO_UDP)
            .map(key)
            .collect();
        let targets: BTreeSet<std::net::SocketAddr> = removed
            .iter()
            .filter(|b| !still.contains(&key(b)))
            .map(|b| {
                std::net::SocketAddr::new(
                    plan::words_addr(b.addr, b.family),
                    plan::host_port(b.port),
                )
            })
            .collect();
        let n = sockterm::destroy_udp_sockets(&self.cgroup, &targets);
        if n > 0 {
            info!(
                sockets = n,
                backends = targets.len(),
                "destroyed connected UDP sockets to removed backends"
            );
        }
    }

    /// Number of reverse-translation entries (sockets remembered), for the bench.
    pub fn reverse_len(&self) -> usize {
        self.reverse_entries.keys().count()
    }
}

impl EbpfDataplane {
    /// The changes for `desired`: only what changed since the last complete sync when
    /// there was one (and the node addresses are the same), else everything.
    fn changes_for(&mut self, desired: &DesiredState, node_addrs: &BTreeSet<IpAddr>) -> Changes {
        let Some((prev, prev_addrs)) = self.applied.as_ref().filter(|(_, a)| a == node_addrs)
        else {
            return plan::diff(
                &self.mirror,
                desired,
                node_addrs,
                self.maglev_m,
                &mut self.ids,
            );
        };
        let _ = prev_addrs;
        let mut changed = DesiredState::default();
        let mut scope: HashSet<ServiceKey> = HashSet::new();
        // Shared structure is skipped: this costs the size of the change.
        for item in prev.plans.diff(&desired.plans) {
            match item {
                imbl::ordmap::DiffItem::Add(key, p) => {
                    scope.extend(p.frontends.iter().map(plan::frontend_key));
                    changed.plans.insert(key.clone(), p.clone());
                }
                imbl::ordmap::DiffItem::Update {
                    old: (_, old),
                    new: (key, p),
                } => {
                    scope.extend(p.frontends.iter().map(plan::frontend_key));
                    scope.extend(old.frontends.iter().map(plan::frontend_key));
                    changed.plans.insert(key.clone(), p.clone());
                }
                imbl::ordmap::DiffItem::Remove(_, old) => {
                    scope.extend(old.frontends.iter().map(plan::frontend_key));
                }
            }
        }
        plan::diff_scoped(
            &self.mirror,
            &changed,
            node_addrs,
            self.maglev_m,
            &mut self.ids,
            &scope,
        )
    }

    fn sync_inner(&mut self, desired: &DesiredState, node_addrs: &BTreeSet<IpAddr>) -> SyncReport {
        let t = std::time::Instant::now();
        let changes = self.changes_for(desired, node_addrs);
        if changes.is_empty() {
            return SyncReport::default();
        }
        let diff_us = t.elapsed().as_micros() as u64;
        debug!(
            prepare = changes.prepare.len(),
            commit = changes.commit.len(),
            cleanup = changes.cleanup.len(),
            diff_us,
            "applying map changes"
        );
        let removed_udp: Vec<Backend> = changes
            .cleanup
            .iter()
            .filter_map(|(_, op)| match op {
                Op::DelBackend(id) => self.mirror.backends.get(id).copied(),
                _ => None,
            })
            .filter(|b| b.proto == PROTO_UDP)
            .collect();
        let t = std::time::Instant::now();
        let mut report = self.apply(&changes);
        report.diff_us = diff_us;
        report.apply_us = t.elapsed().as_micros() as u64;
        debug!(
            apply_us = report.apply_us,
            writes = report.writes,
            "applied"
        );
        self.terminate_udp_sockets(removed_udp);
        if !report.full_maps.is_empty() {
            warn!(
                failed_plans = report.failed_plans.len(),
                "a map is full; retrying the failed Services smallest first"
            );
            report = self.retry_smallest_first(desired, node_addrs);
            if !report.full_maps.is_empty() {
                error!(
                    maps = ?report.full_maps.iter().collect::<BTreeSet<_>>(),
                    failed_plans = report.failed_plans.len(),
                    example = %report.failed_plans.first().map(|p| p.to_string()).unwrap_or_default(),
                    "map is full: these Services keep their last state (raise the map size flags)"
                );
            }
        }
        report
    }
}

/// `--cleanup`: unpins every link (detaching the programs) and every map capstan made
/// under `pin_dir`, then removes the directory. Missing pieces are fine.
pub fn cleanup(pin_dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    let links = links_dir(pin_dir);
    for dir in [links.as_path(), pin_dir] {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
    }
    for dir in [links.as_path(), pin_dir] {
        match fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(dir = %dir.display(), error = %e, "could not remove"),
        }
    }
    Ok(removed)
}
