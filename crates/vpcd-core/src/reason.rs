//! Why a packet was dropped: one enum variant per reason, each with a sentence.
//!
//! The variant's name doubles as the name of its counter (as VPP's error counters do), so
//! `vpcd` reports drops as `GreUnknownKey: GRE key matches no VPC` rather than a number.

use std::fmt;

macro_rules! drop_reasons {
    ($( $(#[$doc:meta])* $name:ident => $sentence:literal, )*) => {
        /// Why a packet was dropped. Every stage of the pipeline drops with one of these.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum DropReason {
            $( $(#[$doc])* #[doc = $sentence] $name, )*
        }

        impl DropReason {
            /// Every reason, in declaration order (the order of the counter array).
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];
            /// The number of reasons.
            pub const COUNT: usize = DropReason::ALL.len();

            /// The counter's name: the variant's name.
            pub const fn name(self) -> &'static str {
                match self { $(DropReason::$name => stringify!($name),)* }
            }

            /// One sentence saying what happened.
            pub const fn sentence(self) -> &'static str {
                match self { $(DropReason::$name => $sentence,)* }
            }

            /// The reason with this name, if any (for test manifests and the CLI).
            pub fn from_name(name: &str) -> Option<DropReason> {
                DropReason::ALL.iter().copied().find(|r| r.name() == name)
            }

            /// The index of this reason's counter.
            pub const fn index(self) -> usize {
                self as usize
            }
        }
    };
}

drop_reasons! {
    // --- the inner (instance) packet ---
    Ipv6Unsupported => "IPv6 packet: vpcd carries IPv4 only for now",
    InnerNotIpv4 => "packet is neither IPv4 nor IPv6 (bad version nibble)",
    InnerTruncated => "packet is shorter than an IPv4 header",
    InnerBadIhl => "IPv4 header length (IHL) is under 5 words or longer than the packet",
    InnerLengthMismatch => "IPv4 total length does not match the bytes received",
    L4Malformed => "TCP, UDP or ICMP header is truncated or invalid",
    UnknownPort => "packet from a port that is no instance on this host",
    SourceSpoofed => "source address is not the sending instance's address",
    NotUnicast => "broadcast or multicast destination: a VPC carries unicast only",
    OversizeNoDf => "packet exceeds the instance MTU and has DF clear: vpcd does not fragment",
    InnerDstUnderlay => "destination is an underlay (host) address",
    TunnelLoop => "packet is GRE or GRE-in-UDP addressed back into the underlay",
    // --- fragments ---
    FragmentTooShort => "first fragment does not hold the whole transport header",
    FragmentOverlap => "non-first fragment overlaps the transport header",
    FragmentWithoutFirst => "non-first fragment whose first fragment was not admitted",
    // --- the underlay ---
    OuterMalformed => "outer IPv4 header is malformed",
    OuterNotGre => "outer IPv4 packet is not GRE (protocol 47)",
    OuterFragment => "outer packet is an IPv4 fragment: never parsed as GRE",
    UnknownUnderlaySource => "underlay sender is not a host of the topology",
    UnderlayFromSelf => "underlay packet claims to come from this very host",
    NotAddressedToHost => "outer destination is not this host's underlay address",
    GreTruncated => "GRE packet is shorter than its flags announce",
    GreBadVersion => "GRE version is not 0",
    GreReservedBits => "GRE routing or reserved bit 1, 4 or 5 is set",
    GreNoKey => "GRE packet carries no key, and there is no basic network",
    GreUnknownKey => "GRE key belongs to no VPC",
    GreKeyNotOnHost => "GRE key's network (a VPC, or no key: the basic network) has no instance on this host",
    GreBadChecksum => "GRE checksum is wrong",
    GreProtocolMismatch => "GRE protocol type does not match the inner packet",
    GreProtocolUnsupported => "GRE protocol type is not IPv4",
    UnderlayTooBig => "decapsulated packet is larger than the instance MTU (the kernel reassembled outer fragments)",
    InnerSourceNotOnSender => "inner source is not an instance of the sending host (on an internet channel: not a public address from the internet gateway)",
    GreKeyMismatch => "the sender's route does not lead where the GRE key's channel goes",
    NotLocalDestination => "decapsulated packet is for no instance on this host",
    // --- routing ---
    NoRoute => "no route matches the destination",
    RouteDrop => "a route sends the destination to drop",
    RouteLoop => "a route sends the packet back to the instance that sent it",
    NoSuchInstance => "destination is inside the VPC but no instance has that address",
    PeeringNotTransitive => "a route sends to a peering a destination outside the peer VPC: peering is not transitive",
    PeeringNoReturnRoute => "the receiving VPC's route table does not send the source back over the same peering",
    NoEip => "a route sends the packet to the internet, but the instance has no Elastic IP",
    NoSuchEip => "packet from the internet to an address that is no Elastic IP",
    LbNoListener => "packet to a load balancer's VIP on a protocol and port it has no listener for",
    LbNoBackend => "new connection to a listener whose backends all have weight 0 (or none)",
    LbOtherTenant => "basic network: the load balancer belongs to another tenant or region",
    LbSessionsFull => "new connection through a load balancer while its session table is full",
    LbTupleInUse => "new connection through a load balancer whose every backend already has one from the same client address and port",
    BasicOtherTenant => "basic network: the two instances belong to different tenants",
    BasicOtherRegion => "basic network: the two instances are in different regions",
    ForeignSourceLeavesVpc => "an appliance's packet with a source other than its own may only go to an instance of its own VPC",
    // --- policy ---
    AclEgress => "network ACL of the source subnet denies the packet (egress)",
    AclIngress => "network ACL of the destination subnet denies the packet (ingress)",
    SgEgress => "security groups of the sending instance deny the packet (egress)",
    SgIngress => "security groups of the receiving instance deny the packet (ingress)",
    // --- connection tracking ---
    TcpInvalid => "TCP flags that no real connection sends in this state",
    TcpNoConnection => "TCP packet that is neither a SYN nor part of a tracked connection",
    IcmpErrorUnrelated => "ICMP error that quotes no tracked connection",
    ConntrackFull => "connection table is full and holds nothing evictable",
    ConntrackInstanceLimit => "instance holds its maximum of tracked connections, none evictable",
    // --- the buffer ---
    NoHeadroom => "packet buffer has no headroom for the outer headers",
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name(), self.sentence())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_index_the_counter_array() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(DropReason::from_name(r.name()), Some(*r));
            assert!(!r.sentence().is_empty());
        }
        assert_eq!(DropReason::from_name("NoSuchReason"), None);
    }
}
