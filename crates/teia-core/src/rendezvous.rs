//! The rendezvous registry: records keyed by (observed IP, namespace, name), their expiry,
//! and the per-IP and total record limits. Sans-IO: the caller passes the current wall-clock
//! time and persists the changes the registry reports.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use teia_wire::rendezvous::PeerRecord;

/// Milliseconds since the UNIX epoch: the registry's clock, wall time so that expiry keeps
/// counting across a restart.
pub type UnixMillis = u64;

/// Identity of a record. Ordered by namespace first, so one namespace is one range.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordKey {
    /// Namespace (room).
    pub namespace: String,
    /// Peer name within the namespace.
    pub name: String,
    /// Source address the record was registered from.
    pub ip: IpAddr,
}

/// A registered peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its identity.
    pub key: RecordKey,
    /// Port the peer listens on.
    pub port: u16,
    /// Lifetime it was registered with, in seconds.
    pub ttl: u32,
    /// Source port of the registering connection.
    pub observed_port: u16,
    /// When it was last registered.
    pub registered_at: UnixMillis,
    /// When it expires: `registered_at + ttl` seconds.
    pub expires_at: UnixMillis,
}

impl Record {
    /// The record as listed in a DISCOVER answer at time `now`.
    pub fn to_peer_record(&self, now: UnixMillis) -> PeerRecord {
        let ip = self.key.ip.to_string();
        PeerRecord {
            observed_ip: ip.clone(),
            ip,
            port: self.port,
            name: self.key.name.clone(),
            namespace: self.key.namespace.clone(),
            ttl: self.ttl,
            expires_in: self.expires_at.saturating_sub(now).div_ceil(1000),
            observed_port: self.observed_port,
        }
    }
}

/// Limits on what the registry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Records in total; a REGISTER of a new record beyond it is refused as busy.
    pub max_records: usize,
    /// Records per source IP; a REGISTER of a new record beyond it is refused as over quota.
    pub max_records_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_records: 100_000,
            max_records_per_ip: 1_024,
        }
    }
}

/// Why a REGISTER was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// The registry holds `max_records`.
    #[error("the server holds its maximum of {limit} records")]
    Full {
        /// The limit reached.
        limit: usize,
    },
    /// The source IP holds `max_records_per_ip`.
    #[error("this address holds its maximum of {limit} records")]
    OverQuota {
        /// The limit reached.
        limit: usize,
    },
}

/// A REGISTER to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The record's identity.
    pub key: RecordKey,
    /// Port the peer listens on.
    pub port: u16,
    /// Lifetime in seconds.
    pub ttl: u32,
    /// Source port of the registering connection.
    pub observed_port: u16,
}

/// The records, with an expiry index and per-IP counts.
#[derive(Debug, Default)]
pub struct Registry {
    records: BTreeMap<RecordKey, Record>,
    expiry: BTreeSet<(UnixMillis, RecordKey)>,
    per_ip: HashMap<IpAddr, usize>,
    limits: Limits,
}

impl Registry {
    /// An empty registry with the given limits.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Number of records held (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when no record is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Inserts records read back from storage, dropping those expired at `now`.
    /// Returns how many were kept. Limits are not applied: these were accepted before.
    pub fn restore(&mut self, records: impl IntoIterator<Item = Record>, now: UnixMillis) -> usize {
        let mut kept = 0;
        for record in records {
            if record.expires_at > now {
                self.insert(record);
                kept += 1;
            }
        }
        kept
    }

    /// Registers or refreshes a record at `now`, returning the record as stored.
    pub fn register(
        &mut self,
        registration: Registration,
        now: UnixMillis,
    ) -> Result<Record, RegisterError> {
        self.expire(now);
        if !self.records.contains_key(&registration.key) {
            if self.records.len() >= self.limits.max_records {
                return Err(RegisterError::Full {
                    limit: self.limits.max_records,
                });
            }
            let held = self.per_ip.get(&registration.key.ip).copied().unwrap_or(0);
            if held >= self.limits.max_records_per_ip {
                return Err(RegisterError::OverQuota {
                    limit: self.limits.max_records_per_ip,
                });
            }
        }
        let record = Record {
            key: registration.key,
            port: registration.port,
            ttl: registration.ttl,
            observed_port: registration.observed_port,
            registered_at: now,
            expires_at: now.saturating_add(u64::from(registration.ttl) * 1000),
        };
        self.insert(record.clone());
        Ok(record)
    }

    /// Records of `namespace` (all namespaces for `None`) that are alive at `now`, the most
    /// recently registered first; at most `max` of them.
    pub fn discover(&self, namespace: Option<&str>, now: UnixMillis, max: usize) -> Discovered {
        let alive = |r: &&Record| r.expires_at > now;
        let mut records: Vec<Record> = match namespace {
            Some(ns) => {
                let start = RecordKey {
                    namespace: ns.to_owned(),
                    name: String::new(),
                    ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                };
                self.records
                    .range(start..)
                    .take_while(|(k, _)| k.namespace == ns)
                    .map(|(_, r)| r)
                    .filter(alive)
                    .cloned()
                    .collect()
            }
            None => self.records.values().filter(alive).cloned().collect(),
        };
        let total = records.len();
        records.sort_by_key(|r| std::cmp::Reverse(r.registered_at));
        records.truncate(max);
        Discovered { records, total }
    }

    /// Removes the records of `ip` in `namespace`, only those of `name` and `port` when
    /// given. Returns the keys removed.
    pub fn unregister(
        &mut self,
        ip: IpAddr,
        namespace: &str,
        name: Option<&str>,
        port: Option<u16>,
    ) -> Vec<RecordKey> {
        let start = RecordKey {
            namespace: namespace.to_owned(),
            name: name.unwrap_or_default().to_owned(),
            ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let doomed: Vec<RecordKey> = self
            .records
            .range(start..)
            .take_while(|(k, _)| k.namespace == namespace && name.is_none_or(|n| k.name == n))
            .filter(|(k, r)| k.ip == ip && port.is_none_or(|p| r.port == p))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &doomed {
            self.remove(key);
        }
        doomed
    }

    /// Drops every record expired at `now`; returns how many.
    pub fn expire(&mut self, now: UnixMillis) -> usize {
        let mut dropped = 0;
        while let Some((at, key)) = self.expiry.first().cloned() {
            if at > now {
                break;
            }
            self.remove(&key);
            dropped += 1;
        }
        dropped
    }

    /// When the next record expires, if any: the time to call [`Registry::expire`] again.
    pub fn next_expiry(&self) -> Option<UnixMillis> {
        self.expiry.first().map(|(at, _)| *at)
    }

    fn insert(&mut self, record: Record) {
        let key = record.key.clone();
        let expires_at = record.expires_at;
        match self.records.insert(key.clone(), record) {
            Some(old) => {
                self.expiry.remove(&(old.expires_at, key.clone()));
            }
            None => *self.per_ip.entry(key.ip).or_default() += 1,
        }
        self.expiry.insert((expires_at, key));
    }

    fn remove(&mut self, key: &RecordKey) {
        if let Some(old) = self.records.remove(key) {
            self.expiry.remove(&(old.expires_at, old.key));
            if let Some(count) = self.per_ip.get_mut(&key.ip) {
                *count -= 1;
                if *count == 0 {
                    self.per_ip.remove(&key.ip);
                }
            }
        }
    }
}

/// The answer to a discovery: the records to list and how many there were in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// Records to list.
    pub records: Vec<Record>,
    /// Records alive before any cut.
    pub total: usize,
}

/// How long a client waits before registering again, so that a record granted `ttl`
/// seconds never lapses: half the ttl, at least 500 ms.
pub fn refresh_after(ttl_secs: u32) -> Duration {
    Duration::from_millis((u64::from(ttl_secs) * 500).max(500))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn reg(ip_last: u8, ns: &str, name: &str, port: u16, ttl: u32) -> Registration {
        Registration {
            key: RecordKey {
                namespace: ns.into(),
                name: name.into(),
                ip: ip(ip_last),
            },
            port,
            ttl,
            observed_port: 40_000,
        }
    }

    #[test]
    fn register_replaces_port_and_ttl_of_same_key() {
        let mut r = Registry::default();
        r.register(reg(1, "UnB", "alice", 7000, 60), 0).unwrap();
        r.register(reg(1, "UnB", "alice", 7001, 120), 1_000)
            .unwrap();
        assert_eq!(r.len(), 1);
        let found = r.discover(Some("UnB"), 2_000, 100).records;
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].port, 7001);
        assert_eq!(found[0].to_peer_record(2_000).expires_in, 119);
        assert_eq!(r.next_expiry(), Some(121_000));
    }

    #[test]
    fn same_name_from_two_ips_is_two_records() {
        let mut r = Registry::default();
        r.register(reg(1, "UnB", "alice", 7000, 60), 0).unwrap();
        r.register(reg(2, "UnB", "alice", 7000, 60), 0).unwrap();
        assert_eq!(r.discover(Some("UnB"), 0, 100).total, 2);
    }

    #[test]
    fn discover_filters_namespace_and_expired() {
        let mut r = Registry::default();
        r.register(reg(1, "a", "x", 1, 10), 0).unwrap();
        r.register(reg(1, "ab", "y", 1, 10), 0).unwrap();
        r.register(reg(1, "b", "z", 1, 1), 0).unwrap();
        let names = |d: Discovered| {
            d.records
                .into_iter()
                .map(|r| r.key.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(r.discover(Some("a"), 0, 100)), ["x"]);
        assert_eq!(
            names(r.discover(Some("nope"), 0, 100)),
            Vec::<String>::new()
        );
        assert_eq!(r.discover(None, 0, 100).total, 3);
        assert_eq!(
            r.discover(None, 1_000, 100).total,
            2,
            "expired at exactly ttl"
        );
    }

    #[test]
    fn expire_reclaims_memory_in_order() {
        let mut r = Registry::default();
        r.register(reg(1, "a", "x", 1, 5), 0).unwrap();
        r.register(reg(1, "a", "y", 1, 1), 0).unwrap();
        assert_eq!(r.next_expiry(), Some(1_000));
        assert_eq!(r.expire(999), 0);
        assert_eq!(r.expire(1_000), 1);
        assert_eq!(r.len(), 1);
        assert_eq!(r.next_expiry(), Some(5_000));
        assert_eq!(r.expire(10_000), 1);
        assert!(r.is_empty());
        assert_eq!(r.next_expiry(), None);
        assert!(r.per_ip.is_empty());
    }

    #[test]
    fn unregister_only_touches_callers_ip() {
        let mut r = Registry::default();
        r.register(reg(1, "a", "x", 1, 60), 0).unwrap();
        r.register(reg(1, "a", "y", 2, 60), 0).unwrap();
        r.register(reg(2, "a", "x", 1, 60), 0).unwrap();
        r.register(reg(1, "b", "x", 1, 60), 0).unwrap();
        assert!(r.unregister(ip(3), "a", None, None).is_empty());
        assert!(r.unregister(ip(1), "a", Some("x"), Some(9)).is_empty());
        assert_eq!(r.unregister(ip(1), "a", Some("x"), None).len(), 1);
        assert_eq!(r.unregister(ip(1), "a", None, Some(2)).len(), 1);
        assert_eq!(r.len(), 2);
        assert_eq!(r.unregister(ip(2), "a", None, None).len(), 1);
        assert_eq!(r.discover(None, 0, 100).records[0].key.namespace, "b");
    }

    #[test]
    fn limits_are_enforced_for_new_records_only() {
        let mut r = Registry::new(Limits {
            max_records: 3,
            max_records_per_ip: 2,
        });
        r.register(reg(1, "a", "x", 1, 60), 0).unwrap();
        r.register(reg(1, "a", "y", 1, 60), 0).unwrap();
        assert_eq!(
            r.register(reg(1, "a", "z", 1, 60), 0),
            Err(RegisterError::OverQuota { limit: 2 })
        );
        r.register(reg(1, "a", "y", 2, 60), 0).unwrap();
        r.register(reg(2, "a", "z", 1, 60), 0).unwrap();
        assert_eq!(
            r.register(reg(3, "a", "w", 1, 60), 0),
            Err(RegisterError::Full { limit: 3 })
        );
        assert!(
            r.register(reg(3, "a", "w", 1, 60), 60_000).is_ok(),
            "expired records free room"
        );
    }

    #[test]
    fn restore_skips_expired_and_keeps_counting() {
        let mut r = Registry::default();
        let live = r.register(reg(1, "a", "x", 1, 100), 0).unwrap();
        let dead = r.register(reg(1, "a", "y", 1, 10), 0).unwrap();
        let mut restored = Registry::default();
        assert_eq!(restored.restore([live, dead], 50_000), 1);
        let found = restored.discover(None, 50_000, 100).records;
        assert_eq!(found[0].to_peer_record(50_000).expires_in, 50);
    }

    #[test]
    fn discover_cut_keeps_the_freshest() {
        let mut r = Registry::default();
        for i in 0..10u16 {
            r.register(reg(1, "a", &format!("n{i}"), i + 1, 60), u64::from(i))
                .unwrap();
        }
        let d = r.discover(Some("a"), 10, 3);
        assert_eq!(d.total, 10);
        let ports: Vec<u16> = d.records.iter().map(|r| r.port).collect();
        assert_eq!(ports, [10, 9, 8]);
    }

    #[test]
    fn refresh_comes_before_expiry() {
        assert_eq!(refresh_after(7200), Duration::from_secs(3600));
        assert_eq!(refresh_after(1), Duration::from_millis(500));
    }
}
