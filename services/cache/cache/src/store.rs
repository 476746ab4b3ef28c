//! The in-memory store: one LRU over every account's keys, bounded in bytes, with per-key expiry.

use std::{
    collections::{BTreeSet, HashMap},
    time::Instant,
};

use lru::LruCache;

/// Bytes counted per entry on top of its account id, key and value (map and list overhead).
pub const ENTRY_OVERHEAD: usize = 64;

/// A stored value.
#[derive(Clone, Debug)]
struct Entry {
    val: Vec<u8>,
    expires: Option<Instant>,
}

/// What a put did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Put {
    /// The key was new for its account (a quota key was used).
    pub created: bool,
    /// Keys evicted to make room, by account: their quota is to be released.
    pub evicted: Vec<String>,
}

/// Accounts' keys and values; not thread-safe by itself (the service wraps it in a mutex).
#[derive(Debug)]
pub struct Store {
    lru: LruCache<(String, String), Entry>,
    /// Every account's keys in order, for streaming dumps in chunks.
    index: HashMap<String, BTreeSet<String>>,
    bytes: usize,
    max_bytes: usize,
}

fn size(account: &str, key: &str, val: &[u8]) -> usize {
    account.len() + key.len() + val.len() + ENTRY_OVERHEAD
}

impl Store {
    /// An empty store holding at most `max_bytes` (entries counted by [`ENTRY_OVERHEAD`] + lengths).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            lru: LruCache::unbounded(),
            index: HashMap::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// Changes the bound to `max_bytes` (`cache.max_bytes` changed live); when the store holds more, evicts
    /// least recently used entries until it fits and returns their accounts (their quota is to be released).
    pub fn set_max_bytes(&mut self, max_bytes: usize) -> Vec<String> {
        self.max_bytes = max_bytes;
        let mut evicted = Vec::new();
        while self.bytes > self.max_bytes {
            let Some(((a, victim), e)) = self.lru.pop_lru() else {
                break;
            };
            self.bytes -= size(&a, &victim, &e.val);
            self.unindex(&a, &victim);
            evicted.push(a);
        }
        evicted
    }

    /// Bytes in use.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether `account` has a live `key` (expired ones count as absent).
    pub fn contains(&mut self, account: &str, key: &str, now: Instant) -> bool {
        self.get(account, key, now).0.is_some()
    }

    /// Whether a value of `len` bytes can ever fit.
    pub fn fits(&self, account: &str, key: &str, len: usize) -> bool {
        account.len() + key.len() + len + ENTRY_OVERHEAD <= self.max_bytes
    }

    /// Stores `val`; evicts least recently used entries (of any account) until it fits.
    pub fn put(&mut self, account: &str, key: &str, val: Vec<u8>, expires: Option<Instant>) -> Put {
        let k = (account.to_owned(), key.to_owned());
        let mut out = Put::default();
        match self.lru.pop(&k) {
            Some(old) => self.bytes -= size(account, key, &old.val),
            None => out.created = true,
        }
        let need = size(account, key, &val);
        while self.bytes + need > self.max_bytes {
            let Some(((a, victim), e)) = self.lru.pop_lru() else {
                break;
            };
            self.bytes -= size(&a, &victim, &e.val);
            self.unindex(&a, &victim);
            out.evicted.push(a);
        }
        self.bytes += need;
        self.index
            .entry(k.0.clone())
            .or_default()
            .insert(k.1.clone());
        self.lru.put(k, Entry { val, expires });
        out
    }

    /// The live value of `key` and, when it had expired (and was removed), its account to release.
    pub fn get(
        &mut self,
        account: &str,
        key: &str,
        now: Instant,
    ) -> (Option<Vec<u8>>, Option<String>) {
        let k = (account.to_owned(), key.to_owned());
        match self.lru.get(&k) {
            None => (None, None),
            Some(e) if e.expires.is_some_and(|t| t <= now) => {
                self.remove(account, key);
                (None, Some(account.to_owned()))
            }
            Some(e) => (Some(e.val.clone()), None),
        }
    }

    /// Removes a key; whether it was there.
    pub fn remove(&mut self, account: &str, key: &str) -> bool {
        match self.lru.pop(&(account.to_owned(), key.to_owned())) {
            Some(e) => {
                self.bytes -= size(account, key, &e.val);
                self.unindex(account, key);
                true
            }
            None => false,
        }
    }

    /// Up to `n` of `account`'s keys after `after` (all from the start when `None`), in key order.
    pub fn keys_after(&self, account: &str, after: Option<&str>, n: usize) -> Vec<String> {
        let Some(keys) = self.index.get(account) else {
            return Vec::new();
        };
        let range: Box<dyn Iterator<Item = &String>> = match after {
            Some(a) => Box::new(
                keys.range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            ),
            None => Box::new(keys.iter()),
        };
        range.take(n).cloned().collect()
    }

    fn unindex(&mut self, account: &str, key: &str) {
        if let Some(keys) = self.index.get_mut(account) {
            keys.remove(key);
            if keys.is_empty() {
                self.index.remove(account);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_entries_go_first_and_bytes_stay_bounded() {
        let per = size("a", "k0", &[0; 100]);
        let mut s = Store::new(per * 3);
        let now = Instant::now();
        for i in 0..3 {
            assert!(s.put("a", &format!("k{i}"), vec![0; 100], None).created);
        }
        assert!(s.contains("a", "k0", now), "touch k0: k1 is now the oldest");
        let put = s.put("b", "k9", vec![0; 100], None);
        assert_eq!(
            put,
            Put {
                created: true,
                evicted: vec!["a".into()]
            }
        );
        assert!(!s.contains("a", "k1", now) && s.contains("a", "k0", now));
        assert!(s.bytes() <= per * 3);
        let replaced = s.put("a", "k0", vec![1; 100], None);
        assert!(!replaced.created && replaced.evicted.is_empty());
    }

    #[test]
    fn a_smaller_bound_evicts_the_least_recently_used_entries_at_once() {
        let per = size("a", "k0", &[0; 100]);
        let mut s = Store::new(per * 4);
        let now = Instant::now();
        for (account, key) in [("a", "k0"), ("b", "k1"), ("a", "k2"), ("b", "k3")] {
            s.put(account, key, vec![0; 100], None);
        }
        assert!(
            s.contains("a", "k0", now),
            "touch k0: k1 and k2 are now the oldest"
        );
        assert_eq!(s.set_max_bytes(per * 2), ["b", "a"]);
        assert_eq!(s.bytes(), per * 2);
        assert!(s.contains("a", "k0", now) && s.contains("b", "k3", now));
        assert!(s.keys_after("b", None, 10) == ["k3"], "the index follows");
        assert!(
            s.set_max_bytes(per * 8).is_empty(),
            "a larger bound evicts nothing"
        );
        assert!(s.put("c", "k4", vec![0; 100], None).evicted.is_empty());
    }

    #[test]
    fn keys_are_per_account_expire_and_list_in_chunks() {
        let mut s = Store::new(1 << 20);
        let now = Instant::now();
        s.put("a", "x", b"1".to_vec(), None);
        s.put("b", "x", b"2".to_vec(), None);
        assert_eq!(s.get("a", "x", now).0.unwrap(), b"1");
        assert_eq!(s.get("b", "x", now).0.unwrap(), b"2");
        s.put("a", "gone", b"3".to_vec(), Some(now));
        assert_eq!(
            s.get("a", "gone", now),
            (None, Some("a".into())),
            "expired: removed, quota to release"
        );
        for k in ["c", "b", "d"] {
            s.put("a", k, vec![], None);
        }
        assert_eq!(s.keys_after("a", None, 2), vec!["b", "c"]);
        assert_eq!(s.keys_after("a", Some("c"), 10), vec!["d", "x"]);
        assert!(s.keys_after("nobody", None, 10).is_empty());
    }
}
