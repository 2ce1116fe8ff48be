//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Cilium uses it: every
//! backend fills a prime-sized lookup table in the order of its own permutation, so that
//! adding or removing one backend moves only about 1/N of the table.

/// Cilium's default table size; any prime larger than 100 × the backend count works.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

/// The primes the agent accepts for `--maglev-table-size` (Cilium's list up to the map's
/// fixed capacity).
pub const TABLE_SIZES: [u32; 6] = [251, 509, 1021, 2039, 4093, 16381];

fn fnv1a(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf29ce484222325u64 ^ seed;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    // Final avalanche so that close names land far apart.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^ (h >> 33)
}

/// Whether `m` is prime (tables must be).
pub fn is_prime(m: u32) -> bool {
    if m < 2 {
        return false;
    }
    let mut d = 2u32;
    while (d as u64) * (d as u64) <= m as u64 {
        if m.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Builds a table of size `m` (prime) over `backends`, identified by a stable name
/// (`ip:port`). Entries are 1-based indexes into `backends`; an empty backend list gives
/// an all-zero table.
pub fn table(backends: &[String], m: u32) -> Vec<u16> {
    let m = m as usize;
    let n = backends.len();
    let mut entry = vec![0u16; m];
    if n == 0 || m < 2 {
        return entry;
    }
    let perm: Vec<(usize, usize)> = backends
        .iter()
        .map(|b| {
            let offset = (fnv1a(b.as_bytes(), 0) % m as u64) as usize;
            let skip = (fnv1a(b.as_bytes(), 0x9e3779b97f4a7c15) % (m as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; n];
    let mut filled = 0;
    while filled < m {
        for i in 0..n {
            let (offset, skip) = perm[i];
            loop {
                let c = (offset + next[i] * skip) % m;
                next[i] += 1;
                if entry[c] == 0 {
                    entry[c] = (i + 1) as u16;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:8080", i / 250, i % 250))
            .collect()
    }

    #[test]
    fn every_entry_is_a_backend_and_shares_are_even() {
        let b = names(10);
        let t = table(&b, 1021);
        let mut counts = vec![0usize; 10];
        for e in &t {
            assert!((1..=10).contains(e));
            counts[*e as usize - 1] += 1;
        }
        // Maglev guarantees shares within a few entries of M/N.
        for c in counts {
            assert!((95..=110).contains(&c), "share {c}");
        }
    }

    #[test]
    fn removing_one_backend_moves_little() {
        let b = names(20);
        let before = table(&b, 16381);
        let mut fewer = b.clone();
        fewer.remove(7);
        let after = table(&fewer, 16381);
        let name = |v: &Vec<String>, e: u16| v[e as usize - 1].clone();
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(x, y)| name(&b, **x) != name(&fewer, **y))
            .count();
        // The removed backend's share must move (1/20); little else may.
        assert!(moved < 16381 / 20 + 16381 / 50, "moved {moved}");
    }

    #[test]
    fn deterministic_and_empty() {
        assert_eq!(table(&names(5), 251), table(&names(5), 251));
        assert!(table(&[], 251).iter().all(|e| *e == 0));
        assert!(TABLE_SIZES.iter().all(|m| is_prime(*m)));
        assert!(!is_prime(16383));
    }
}
