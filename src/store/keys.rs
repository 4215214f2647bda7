//! Every Redis key name creditd uses, in one place.
//!
//! All keys of a tenant share the hash tag `{t:<tenant>}`, so a script may
//! touch any of them atomically, on one Redis or on Redis Cluster. Scripts
//! derive account keys from the prefix (`TenantKeys::prefix`) while walking
//! the tree; the prefix always ends with the tag and a colon.

/// The key names of one tenant.
#[derive(Clone, Debug)]
pub struct TenantKeys {
    prefix: String,
}

impl TenantKeys {
    /// `base` namespaces a deployment (or a test) inside one Redis.
    pub fn new(base: &str, tenant: &str) -> Self {
        TenantKeys { prefix: format!("{base}{{t:{tenant}}}:") }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The fence hash (see fence.lua).
    pub fn fence(&self) -> String {
        format!("{}fence", self.prefix)
    }

    pub fn account(&self, account_id: &str) -> String {
        format!("{}a:{account_id}", self.prefix)
    }

    pub fn hold(&self, hold_id: &str) -> String {
        format!("{}h:{hold_id}", self.prefix)
    }

    pub fn holds(&self) -> String {
        format!("{}holds", self.prefix)
    }

    pub fn committing(&self) -> String {
        format!("{}committing", self.prefix)
    }

    /// Idempotency record of one RPC (`r` reserve, `c` commit, `g` charge,
    /// `l` release, `x` extend).
    pub fn idempotency(&self, rpc: char, key: &str) -> String {
        format!("{}i:{rpc}:{key}", self.prefix)
    }

    /// Stream of fired alerts, moved to PostgreSQL by a job.
    pub fn alerts(&self) -> String {
        format!("{}alerts", self.prefix)
    }

    /// Marker of a ledger row applied to a hot balance.
    pub fn marker(&self, ledger_entry: i64) -> String {
        format!("{}m:{ledger_entry}", self.prefix)
    }

    /// Claim of the tenant's current reconciliation interval (one replica
    /// reconciles a tenant per interval).
    pub fn reconcile_claim(&self) -> String {
        format!("{}rc", self.prefix)
    }

    /// The Redis Cluster hash slot of every key of the tenant.
    pub fn slot(&self) -> u16 {
        let start = self.prefix.find('{').map_or(0, |i| i + 1);
        let end = self.prefix[start..].find('}').map_or(self.prefix.len(), |i| start + i);
        crc16_xmodem(&self.prefix.as_bytes()[start..end]) % 16384
    }

    /// Pattern matching every key of the tenant (for a rebuild).
    pub fn pattern(&self) -> String {
        // `{` `}` `[` `]` `*` `?` are glob characters; the prefix's braces
        // must be escaped.
        let mut escaped = String::with_capacity(self.prefix.len() + 4);
        for c in self.prefix.chars() {
            if "*?[]\\".contains(c) {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        escaped.push('*');
        escaped
    }
}

/// CRC16/XMODEM, the checksum Redis Cluster slots are computed with.
fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_tenant_hash_tag() {
        let keys = TenantKeys::new("creditd:", "acme");
        for key in [keys.fence(), keys.account("u1"), keys.hold("h"), keys.holds(), keys.idempotency('r', "k")] {
            assert!(key.starts_with("creditd:{t:acme}:"), "{key}");
        }
        assert_eq!(keys.pattern(), "creditd:{t:acme}:*");
    }

    #[test]
    fn slots_follow_the_redis_cluster_spec() {
        // Reference values from the Redis Cluster specification.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(TenantKeys::new("x:", "acme").slot(), crc16_xmodem(b"t:acme") % 16384);
        assert_eq!(TenantKeys::new("other-prefix:", "acme").slot(), TenantKeys::new("x:", "acme").slot());
    }
}
