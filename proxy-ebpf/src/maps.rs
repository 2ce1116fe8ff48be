//! The maps, pinned by name under the agent's bpffs directory. Sizes here are defaults:
//! the agent sets the real ones from its flags before loading.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use capstan_proxy_common::*;

/// For maps whose entries are allocated on demand (Maglev tables are large and few; LPM
/// tries require it). The Service and backend maps are preallocated, as Cilium's are:
/// inserts then take no allocation, which is what makes programming 10,000 Services fast.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "CS_SVC_V1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(DEFAULT_SERVICES_MAX, 0);

#[map(name = "CS_BACKEND_V1")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(DEFAULT_BACKENDS_MAX, 0);

#[map(name = "CS_REVSK_V1")]
pub static REVERSE: LruHashMap<ReverseKey, ReverseValue> =
    LruHashMap::pinned(DEFAULT_REVERSE_MAX, 0);

#[map(name = "CS_AFFINITY_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(DEFAULT_AFFINITY_MAX, 0);

#[map(name = "CS_MAGLEV_V1")]
pub static MAGLEV: HashMap<u32, MaglevTable> =
    HashMap::pinned(DEFAULT_MAGLEV_MAX, BPF_F_NO_PREALLOC);

#[map(name = "CS_NODEADDR_V1")]
pub static NODE_ADDRS: HashMap<NodeAddrKey, u32> = HashMap::pinned(DEFAULT_NODE_ADDRS_MAX, 0);

/// Value: unused (1).
#[map(name = "CS_SVCCIDR_V1")]
pub static SERVICE_CIDRS: LpmTrie<[u32; 5], u32> =
    LpmTrie::pinned(SERVICE_CIDRS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "CS_CONFIG_V1")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "CS_COUNT_V1")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}
