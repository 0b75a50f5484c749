//! Settings: `[underlay]`, `[conntrack]`, `[limits]`, `[basic]` and `[internet]`.

use toml::Spanned;

use super::super::model::*;
use super::Scope;
use super::diagnostics::Diagnostics;
use super::network::{nth, overlaps, private_ranges};

/// Default size of the connection table.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
/// Default per-instance connection cap.
pub const DEFAULT_CONNTRACK_PER_INSTANCE: u32 = 65_536;
/// Default flow-cache slots.
pub const DEFAULT_FLOW_CACHE: u32 = 65_536;

impl Scope<'_> {
    pub(super) fn check_underlay(&self, d: &mut Diagnostics) -> Option<Underlay> {
        let mut u = Underlay {
            transport: Transport::Gre,
            mtu: 1500,
            checksum: false,
            instance_mtu: 0,
        };
        u.instance_mtu = u.default_instance_mtu();
        let Some(raw) = &self.f.underlay else {
            return Some(u);
        };
        let raw = raw.get_ref();
        let item = "[underlay]";
        if let Some(t) = &raw.transport {
            u.transport = match t.get_ref().as_str() {
                "gre" => Transport::Gre,
                "gre-udp" => Transport::GreUdp,
                other => {
                    d.err(
                        t.span(),
                        item,
                        format!("transport \"{other}\" is neither \"gre\" nor \"gre-udp\""),
                    );
                    return None;
                }
            };
        }
        u.checksum = raw.checksum.unwrap_or(false);
        if let Some(m) = &raw.mtu {
            let min = i64::from(u.overhead()) + 576;
            u.mtu = d.int_in(m, item, "mtu", min..65_536)? as u16;
        }
        u.instance_mtu = u.default_instance_mtu();
        if let Some(m) = &raw.instance_mtu {
            let max = i64::from(u.room());
            u.instance_mtu = d.int_in(m, item, "instance_mtu", 576..max + 1)? as u16;
        }
        Some(u)
    }

    pub(super) fn check_conntrack(&self, d: &mut Diagnostics) -> Option<ConntrackLimits> {
        let mut c = ConntrackLimits {
            max_entries: DEFAULT_CONNTRACK_ENTRIES,
            max_per_instance: DEFAULT_CONNTRACK_PER_INSTANCE,
            flow_cache: DEFAULT_FLOW_CACHE,
        };
        if let Some(raw) = &self.f.conntrack {
            let raw = raw.get_ref();
            let item = "[conntrack]";
            // Every bad value is reported, not only the first.
            let mut ok = true;
            for (v, slot, what, range) in [
                (
                    &raw.max_entries,
                    &mut c.max_entries,
                    "max_entries",
                    16..(1 << 26),
                ),
                (
                    &raw.max_per_instance,
                    &mut c.max_per_instance,
                    "max_per_instance",
                    1..(1 << 26),
                ),
                (
                    &raw.flow_cache,
                    &mut c.flow_cache,
                    "flow_cache",
                    16..(1 << 24),
                ),
            ] {
                if let Some(v) = v {
                    match d.int_in(v, item, what, range) {
                        Some(x) => *slot = x as u32,
                        None => ok = false,
                    }
                }
            }
            if !ok {
                return None;
            }
        }
        c.max_per_instance = c.max_per_instance.min(c.max_entries);
        c.flow_cache = c.flow_cache.next_power_of_two();
        Some(c)
    }

    pub(super) fn check_limits(&self, d: &mut Diagnostics) -> Limits {
        let mut l = Limits::default();
        let Some(raw) = &self.f.limits else { return l };
        let raw = raw.get_ref();
        let item = "[limits]";
        let fields: [(&Option<Spanned<i64>>, &mut usize, &str); 5] = [
            (
                &raw.security_groups_per_instance,
                &mut l.security_groups_per_instance,
                "security_groups_per_instance",
            ),
            (
                &raw.rules_per_security_group,
                &mut l.rules_per_security_group,
                "rules_per_security_group",
            ),
            (&raw.rules_per_acl, &mut l.rules_per_acl, "rules_per_acl"),
            (
                &raw.routes_per_table,
                &mut l.routes_per_table,
                "routes_per_table",
            ),
            (
                &raw.route_tables_per_vpc,
                &mut l.route_tables_per_vpc,
                "route_tables_per_vpc",
            ),
        ];
        let mut errors = Vec::new();
        for (v, slot, what) in fields {
            if let Some(v) = v {
                if (1..=1_000_000).contains(v.get_ref()) {
                    *slot = *v.get_ref() as usize;
                } else {
                    errors.push((
                        v.span(),
                        format!("{what} {} is out of range 1..=1000000", v.get_ref()),
                    ));
                }
            }
        }
        for (span, m) in errors {
            d.err(span, item, m);
        }
        l
    }

    pub(super) fn check_basic(&self, d: &mut Diagnostics) -> Option<BasicNetwork> {
        let raw = self.f.basic.as_ref()?;
        let item = "[basic]";
        let cidr = d.cidr(&raw.get_ref().cidr, item, "cidr", false)?;
        let private = private_ranges().iter().any(|(r, _)| r.contains(&cidr));
        if !private || cidr.prefix_len() > 28 {
            d.err(
                raw.get_ref().cidr.span(),
                item,
                format!("cidr {cidr}: the basic pool is a private range (10/8, 172.16/12, 192.168/16) of at least /28"),
            );
            return None;
        }
        Some(BasicNetwork {
            cidr,
            gateway: nth(cidr, 1),
        })
    }

    /// `Some(None)` when `[internet]` is present but invalid (its errors are reported).
    pub(super) fn check_internet(&self, d: &mut Diagnostics) -> Option<Option<Internet>> {
        let raw = self.f.internet.as_ref()?;
        let r = raw.get_ref();
        let item = "[internet]";
        let cidr = d.cidr(&r.cidr, item, "cidr", false);
        if let Some(c) = cidr
            && private_ranges().iter().any(|(p, _)| overlaps(*p, c))
        {
            d.err(r.cidr.span(), item, format!("cidr {c} is private: the internet's addresses are public ones (e.g. 203.0.113.0/24)"));
            return Some(None);
        }
        let gateway = d.resolve(&self.names.host, "host", &r.gateway, item);
        let client = match (&r.client, cidr) {
            (Some(t), Some(c)) => d.address(t, item, "client").filter(|a| {
                let ok = c.contains(a);
                if !ok {
                    d.err(t.span(), item, format!("client {a} lies outside cidr {c}"));
                }
                ok
            }),
            (None, Some(c)) => Some(nth(c, 1)),
            _ => None,
        };
        let netns = r.netns.as_ref().map(|n| n.get_ref().clone());
        Some((|| {
            Some(Internet {
                cidr: cidr?,
                gateway: HostId(gateway?),
                netns,
                client: client?,
            })
        })())
    }
}
