//! The expert cache: experts fetched from the container, kept while the
//! memory budget allows, the least recently used evicted first.

use serde::Serialize;
use std::collections::HashMap;
use std::hash::Hash;

/// Counters of a cache over its life.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups served from memory, and lookups that had to fetch.
    pub hits: u64,
    pub misses: u64,
    /// Entries dropped to make room.
    pub evictions: u64,
    /// Bytes held now, and the most held at once.
    pub bytes: u64,
    pub peak_bytes: u64,
    /// The most bytes it may hold.
    pub capacity_bytes: u64,
}

impl CacheStats {
    /// Hits ÷ lookups; `None` before the first lookup.
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.hits + self.misses;
        (n > 0).then(|| self.hits as f64 / n as f64)
    }
}

/// A least-recently-used cache of values with a size in bytes, holding at
/// most `capacity` bytes. A value larger than the capacity is not kept.
pub struct Lru<K, V> {
    entries: HashMap<K, Entry<V>>,
    tick: u64,
    stats: CacheStats,
}

struct Entry<V> {
    value: V,
    bytes: u64,
    last_use: u64,
}

impl<K: Hash + Eq + Clone, V: Clone> Lru<K, V> {
    pub fn new(capacity_bytes: u64) -> Lru<K, V> {
        Lru {
            entries: HashMap::new(),
            tick: 0,
            stats: CacheStats {
                capacity_bytes,
                ..CacheStats::default()
            },
        }
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// The value of `key`, counted as a hit, or `fetch`'s (counted as a
    /// miss) kept if it fits, evicting the least recently used entries.
    /// `fetch` returns the value and its size.
    pub fn get_or_fetch<E>(
        &mut self,
        key: &K,
        fetch: impl FnOnce() -> Result<(V, u64), E>,
    ) -> Result<V, E> {
        self.tick += 1;
        if let Some(e) = self.entries.get_mut(key) {
            e.last_use = self.tick;
            self.stats.hits += 1;
            return Ok(e.value.clone());
        }
        self.stats.misses += 1;
        let (value, bytes) = fetch()?;
        if bytes <= self.stats.capacity_bytes {
            while self.stats.bytes + bytes > self.stats.capacity_bytes {
                let oldest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.last_use)
                    .map(|(k, _)| k.clone())
                    .expect("bytes held means an entry");
                let e = self.entries.remove(&oldest).expect("present");
                self.stats.bytes -= e.bytes;
                self.stats.evictions += 1;
            }
            self.stats.bytes += bytes;
            self.stats.peak_bytes = self.stats.peak_bytes.max(self.stats.bytes);
            self.entries.insert(
                key.clone(),
                Entry {
                    value: value.clone(),
                    bytes,
                    last_use: self.tick,
                },
            );
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(c: &mut Lru<u32, u32>, k: u32, bytes: u64) -> u32 {
        c.get_or_fetch(&k, || Ok::<_, ()>((k * 10, bytes))).unwrap()
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let mut c = Lru::new(30);
        assert_eq!(get(&mut c, 1, 10), 10);
        get(&mut c, 2, 10);
        get(&mut c, 3, 10);
        get(&mut c, 1, 10); // 1 is now the most recent; 2 the least
        get(&mut c, 4, 10);
        assert!(c.contains(&1) && !c.contains(&2) && c.contains(&3) && c.contains(&4));
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.evictions), (1, 4, 1));
        assert_eq!((s.bytes, s.peak_bytes), (30, 30));
        assert_eq!(s.hit_rate(), Some(0.2));
    }

    #[test]
    fn never_holds_more_than_its_capacity() {
        let mut c = Lru::new(100);
        let mut x = 12345u64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = (x % 37) as u32;
            get(&mut c, k, 1 + x % 40);
            assert!(c.stats().bytes <= 100);
        }
        let s = c.stats();
        assert_eq!(s.hits + s.misses, 2000);
        assert!(s.hits > 0 && s.evictions > 0);
    }

    #[test]
    fn a_value_larger_than_the_capacity_is_served_but_not_kept() {
        let mut c = Lru::new(5);
        assert_eq!(get(&mut c, 7, 6), 70);
        assert!(c.is_empty());
        let mut zero: Lru<u32, u32> = Lru::new(0);
        assert_eq!(get(&mut zero, 1, 1), 10);
        assert_eq!(get(&mut zero, 1, 1), 10);
        assert_eq!(zero.stats().hit_rate(), Some(0.0));
    }

    #[test]
    fn a_failed_fetch_is_a_miss_and_keeps_nothing() {
        let mut c: Lru<u32, u32> = Lru::new(10);
        assert_eq!(c.get_or_fetch(&1, || Err("disk")), Err("disk"));
        assert!(c.is_empty());
        assert_eq!(c.stats().misses, 1);
    }
}
