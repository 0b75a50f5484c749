//! Random packet sequences: abstract steps drawn by proptest, resolved against the topology
//! and the history of the sequence into bytes and an ingress.

use std::net::Ipv4Addr;

use proptest::prelude::*;
use proptest::sample::Index;
use vpcd_core::policy::route::NextHop;
use vpcd_core::topology::{Channel, HostId, InstanceId, PeeringId, Space, VpcId};
use vpcd_core::{Decision, Ingress, Topology};

use super::build::{self, GreOpts, Ip4};

pub const SPORTS: [u16; 6] = [1000, 1500, 40000, 40001, 5432, 80];
pub const DPORTS: [u16; 8] = [22, 80, 443, 1000, 1500, 4754, 5432, 40000];
pub const OUTSIDE: [[u8; 4]; 9] = [
    [198, 51, 100, 7],
    [198, 51, 100, 200],
    [203, 0, 113, 5],
    [203, 0, 113, 200],
    [8, 8, 8, 8],
    [10, 1, 0, 10],
    [10, 0, 1, 10],
    [172, 16, 1, 10],
    [9, 9, 9, 9],
];
pub const SPECIAL: [[u8; 4]; 6] = [
    [255, 255, 255, 255],
    [224, 0, 0, 5],
    [239, 1, 2, 3],
    [192, 0, 2, 1],
    [192, 0, 2, 2],
    [192, 0, 2, 3],
];

/// The transport of a packet, as generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp { sport: u16, dport: u16, flags: u8 },
    Udp { sport: u16, dport: u16 },
    Icmp { ty: u8, code: u8, ident: u16 },
    Raw(u8),
}

/// The reply type of an ICMP query type, and the other way round.
fn icmp_answer(ty: u8) -> Option<u8> {
    match ty {
        8 => Some(0),
        0 => Some(8),
        13 | 15 | 17 => Some(ty + 1),
        14 | 16 | 18 => Some(ty - 1),
        _ => None,
    }
}

impl Proto {
    /// The packet the other end sends back: ports swapped, TCP with `flags`; ICMP queries and
    /// replies answered by their counterpart, or (`twist` 0) by the same type (a query from
    /// the responder's side), or (`twist` 1) by the counterpart of another query kind.
    fn reversed(self, flags: u8, twist: u8) -> Proto {
        match self {
            Proto::Icmp { ty, code, ident } if icmp_answer(ty).is_some() => {
                let ty = match twist {
                    0 => ty,
                    1 => [0u8, 14, 16, 18, 8][usize::from(ty) % 5],
                    _ => icmp_answer(ty).unwrap(),
                };
                Proto::Icmp { ty, code, ident }
            }
            other => other.reversed_ports(flags),
        }
    }

    fn reversed_ports(self, flags: u8) -> Proto {
        match self {
            Proto::Tcp { sport, dport, .. } => Proto::Tcp {
                sport: dport,
                dport: sport,
                flags,
            },
            Proto::Udp { sport, dport } => Proto::Udp {
                sport: dport,
                dport: sport,
            },
            other => other,
        }
    }

    fn with_flags(self, flags: u8) -> Proto {
        match self {
            Proto::Tcp { sport, dport, .. } => Proto::Tcp {
                sport,
                dport,
                flags,
            },
            other => other,
        }
    }

    fn flags(self) -> Option<u8> {
        match self {
            Proto::Tcp { flags, .. } => Some(flags),
            _ => None,
        }
    }

    fn number(self) -> u8 {
        match self {
            Proto::Tcp { .. } => 6,
            Proto::Udp { .. } => 17,
            Proto::Icmp { .. } => 1,
            Proto::Raw(p) => p,
        }
    }

    fn header_len(self) -> usize {
        match self {
            Proto::Tcp { .. } => 20,
            Proto::Udp { .. } | Proto::Icmp { .. } => 8,
            Proto::Raw(_) => 0,
        }
    }

    fn transport(self, payload: &[u8]) -> Vec<u8> {
        match self {
            Proto::Tcp {
                sport,
                dport,
                flags,
            } => build::tcp(sport, dport, flags, payload),
            Proto::Udp { sport, dport } => build::udp(sport, dport, payload),
            Proto::Icmp { ty, code, ident } => {
                let [a, b] = ident.to_be_bytes();
                build::icmp(ty, code, [a, b, 0, 1], payload)
            }
            Proto::Raw(_) => payload.to_vec(),
        }
    }
}

#[derive(Debug, Clone)]
pub enum L4Gen {
    Tcp {
        sport: Index,
        dport: Index,
        flags: u8,
    },
    Udp {
        sport: Index,
        dport: Index,
    },
    /// Any ICMP message (errors quote nothing: they are made by the error steps).
    Icmp {
        ty: u8,
        code: u8,
        ident: u16,
    },
    /// Explicit ports (floods of distinct connections): TCP, UDP, or ICMP echo with the
    /// source port as identifier.
    Ports {
        proto: u8,
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Raw(u8),
}

#[derive(Debug, Clone)]
pub enum Dst {
    SameVpc(Index),
    /// An instance of the sender's VPC on this host (any of the VPC if none).
    LocalSameVpc(Index),
    AnyInstance(Index),
    Missing(Index),
    Outside(Index),
    Special(Index),
}

#[derive(Debug, Clone, Copy)]
pub enum Mutation {
    Truncate(usize),
    Version(u8),
    Ihl(u8),
    TotalDelta(i16),
    L4Cut(usize),
    TcpDoff(u8),
    /// Valid IP options (4 NOPs): IHL 6.
    Options,
    BadIpChecksum,
}

#[derive(Debug, Clone, Copy)]
pub enum GreTweak {
    Version(u16),
    Bit(u16),
    NoKey,
    Proto(u16),
    BadChecksum,
    Truncate(usize),
    EmptyInner,
    CutInner(usize),
}

#[derive(Debug, Clone)]
pub enum OuterTweak {
    Short(usize),
    Version(u8),
    Ihl(u8),
    Options,
    TotalDelta(i16),
    Mf,
    Offset,
    Proto(u8),
    Dst(Index),
    BadChecksum,
}

#[derive(Debug, Clone)]
pub enum KeyTweak {
    Right,
    /// Another channel's key.
    Other(Index),
    /// The key of a channel from the sender's space (often not the one its route takes).
    Sibling(Index),
    Unknown,
}

#[derive(Debug, Clone)]
pub enum SenderTweak {
    Right,
    Host(Index),
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Encap {
    pub udp: bool,
    pub csum: bool,
    pub seq: bool,
    pub key: KeyTweak,
    pub sender: SenderTweak,
    pub gre: Option<GreTweak>,
    pub outer: Option<OuterTweak>,
}

#[derive(Debug, Clone)]
pub enum PortTweak {
    Right,
    Remote(Index),
    Bogus,
}

#[derive(Debug, Clone)]
pub struct Shape {
    pub payload: usize,
    pub spoof: bool,
    pub port: PortTweak,
    pub df: bool,
    pub big: Option<i32>,
    pub first_frag: bool,
    pub id: u16,
    pub mutation: Option<Mutation>,
    pub encap: Encap,
    /// How an ICMP query or reply is answered (see [`Proto::reversed`]).
    pub twist: u8,
    /// An appliance (source check off) sends with another source: which (see `foreign_src`).
    pub foreign: Option<Index>,
}

#[derive(Debug, Clone)]
pub enum QuoteTweak {
    Exact,
    Full,
    Short(usize),
    WrongSrc,
    FragOffset,
    NotIpv4,
    Mf,
    BadTotal,
}

#[derive(Debug, Clone)]
pub enum Op {
    Fresh {
        remote: bool,
        /// Remote senders: any remote instance, not only those of VPCs present here.
        wide: bool,
        sender: Index,
        dst: Dst,
        l4: L4Gen,
        shape: Shape,
    },
    Reply {
        k: Pick,
        flags: FlagSel,
        shape: Shape,
    },
    Again {
        k: Pick,
        flags: FlagSel,
        shape: Shape,
    },
    Repeat {
        k: Pick,
    },
    IcmpError {
        k: Pick,
        ty: u8,
        code: u8,
        quote: QuoteTweak,
        shape: Shape,
    },
    Later {
        k: Pick,
        offset: u16,
        mf: bool,
        len: usize,
        shape: Shape,
    },
    /// The first fragment of an earlier packet's datagram again, changed (TCP flags, or an
    /// ICMP error type, or another UDP port) so that it is often dropped this time.
    Refirst {
        k: Pick,
        flags: u8,
        shape: Shape,
    },
    /// The same inner packet, sent by the instance with the same address in another VPC.
    Mirror {
        k: Pick,
        shape: Shape,
    },
    /// The same bytes from somewhere else: another port, or another underlay sender.
    Impostor {
        k: Pick,
        via: Index,
    },
    /// Cloud topologies: a new packet from an instance of any network.
    CFresh {
        remote: bool,
        /// Remote senders: any, not only those with something to talk to here.
        wide: bool,
        sender: Index,
        dst: CDst,
        l4: L4Gen,
        shape: Shape,
    },
    /// Cloud topologies: a new packet from the internet.
    CNet {
        src: Index,
        dst: NetDst,
        /// Through the internet's device whatever this host is.
        raw: bool,
        l4: L4Gen,
        shape: Shape,
    },
    /// Cloud topologies: what the gateway relays into the cloud, made up.
    CRelay {
        src: Index,
        to: Index,
        local: bool,
        key: RelayKey,
        l4: L4Gen,
        shape: Shape,
    },
    /// Cloud topologies: the receiver answers, through the NAT it went through.
    CReply {
        k: Pick,
        flags: FlagSel,
        shape: Shape,
    },
    /// Cloud topologies: the sender sends again, the same way.
    CAgain {
        k: Pick,
        flags: FlagSel,
        shape: Shape,
    },
    /// Cloud topologies: the receiver answers with an ICMP error quoting what it received.
    CError {
        k: Pick,
        ty: u8,
        code: u8,
        quote: QuoteTweak,
        shape: Shape,
    },
    /// Cloud topologies: a later fragment of an earlier packet, the same way.
    CLater {
        k: Pick,
        offset: u16,
        mf: bool,
        len: usize,
        shape: Shape,
    },
    /// Cloud topologies: the same inner packet through the underlay with another GRE key (or
    /// none), from the same sender (the flow cache must tell them apart).
    CRekey {
        k: Pick,
        key: RelayKey,
    },
    /// Cloud topologies: the same inner packet through another way in (the internet's
    /// device, a local port, the underlay from any host with the same key).
    CImpostor {
        k: Pick,
        via: Index,
    },
    /// An appliance (source check off) that received a packet for another address sends it
    /// on, unchanged (a foreign source); the VPC and the cloud mix alike.
    Forward {
        k: Pick,
        shape: Shape,
    },
    /// The same topology installed again (`set_topology`): no packet.
    Retopo,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub dt: u64,
    pub op: Op,
}

/// Which earlier packet a step refers to: one of the last three, or any.
#[derive(Debug, Clone)]
pub enum Pick {
    Recent(usize),
    Any(Index),
}

impl Pick {
    pub fn index(&self, len: usize) -> usize {
        match self {
            Pick::Recent(j) => len - 1 - (*j).min(len - 1),
            Pick::Any(i) => i.index(len),
        }
    }
}

/// TCP flags of a reply or follow-up: what a real peer would send next, or drawn at random.
#[derive(Debug, Clone, Copy)]
pub enum FlagSel {
    Natural(u8),
    Raw(u8),
}

impl FlagSel {
    /// The flags, given the flags of the packet referred to and whether this one goes back.
    pub fn resolve(self, prev: Option<u8>, reply: bool) -> u8 {
        let n = match self {
            FlagSel::Raw(f) => return f,
            FlagSel::Natural(n) => usize::from(n),
        };
        let prev = prev.unwrap_or(0x02) & 0x3f & !0x28;
        let options: &[u8] = match (prev, reply) {
            (0x02, true) => &[0x12],
            (0x02, false) => &[0x02, 0x10],
            (0x12, true) => &[0x10, 0x10, 0x18],
            (0x12, false) => &[0x12, 0x10],
            (0x10, _) => &[0x10, 0x18, 0x11],
            (0x11, _) => &[0x10, 0x11, 0x11],
            (0x04 | 0x14, _) => &[0x02],
            _ => &[0x10, 0x02],
        };
        options[n % options.len()]
    }
}

impl Op {
    /// The variant's name, for the coverage report.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Fresh { remote: false, .. } => "fresh from a local instance",
            Op::Fresh { remote: true, .. } => "fresh from a remote instance",
            Op::Reply { .. } => "reply",
            Op::Again { .. } => "again (same direction)",
            Op::Repeat { .. } => "repeat (identical bytes)",
            Op::IcmpError { .. } => "icmp error",
            Op::Later { .. } => "later fragment",
            Op::Refirst { .. } => "first fragment again",
            Op::Mirror { .. } => "mirror in another VPC",
            Op::Impostor { .. } => "same bytes from elsewhere",
            Op::CFresh { remote: false, .. } => "cloud: fresh from a local instance",
            Op::CFresh { remote: true, .. } => "cloud: fresh from a remote instance",
            Op::CNet { .. } => "cloud: from the internet",
            Op::CRelay { .. } => "cloud: relayed by the gateway",
            Op::CReply { .. } => "cloud: reply",
            Op::CAgain { .. } => "cloud: again (same direction)",
            Op::CError { .. } => "cloud: icmp error",
            Op::CLater { .. } => "cloud: later fragment",
            Op::CRekey { .. } => "cloud: same inner packet, another key",
            Op::CImpostor { .. } => "cloud: same inner packet, another way in",
            Op::Forward { .. } => "forwarded by an appliance",
            Op::Retopo => "topology installed again",
        }
    }
}

// ----- strategies ---------------------------------------------------------------------------

fn flags(kind: u8) -> BoxedStrategy<u8> {
    let useful: Vec<u8> = match kind {
        // fresh: mostly SYN
        0 => vec![
            0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x12, 0x10, 0x11, 0x04, 0x18,
        ],
        // reply: mostly SYN+ACK and ACK
        1 => vec![
            0x12, 0x12, 0x12, 0x12, 0x10, 0x10, 0x10, 0x11, 0x11, 0x04, 0x14, 0x18, 0x02,
        ],
        // again: ACK, data, FIN
        _ => vec![
            0x10, 0x10, 0x10, 0x18, 0x18, 0x11, 0x11, 0x02, 0x02, 0x04, 0x12, 0x14,
        ],
    };
    let garbage = vec![
        0x03, 0x00, 0x0a, 0x01, 0x30, 0x22, 0xff, 0xc2, 0x06, 0x38, 0x19,
    ];
    prop_oneof![
        12 => prop::sample::select(useful),
        1 => prop::sample::select(garbage),
    ]
    .boxed()
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        3 => (0usize..3).prop_map(Pick::Recent),
        2 => any::<Index>().prop_map(Pick::Any),
    ]
}

fn flag_sel(kind: u8) -> impl Strategy<Value = FlagSel> {
    prop_oneof![
        3 => any::<u8>().prop_map(FlagSel::Natural),
        2 => flags(kind).prop_map(FlagSel::Raw),
    ]
}

fn l4() -> impl Strategy<Value = L4Gen> {
    prop_oneof![
        50 => (any::<Index>(), any::<Index>(), flags(0))
            .prop_map(|(sport, dport, flags)| L4Gen::Tcp { sport, dport, flags }),
        25 => (any::<Index>(), any::<Index>()).prop_map(|(sport, dport)| L4Gen::Udp { sport, dport }),
        18 => icmp(),
        6 => prop::sample::select(vec![47u8, 50, 132, 4]).prop_map(L4Gen::Raw),
    ]
}

/// ICMP: mostly queries, every type 0 to 18 and some unassigned ones, with codes.
fn icmp() -> impl Strategy<Value = L4Gen> {
    let ty = prop_oneof![
        10 => prop::sample::select(vec![8u8, 8, 8, 13, 15, 17]),
        3 => prop::sample::select(vec![0u8, 14, 16, 18]),
        4 => 0u8..=18,
        1 => prop::sample::select(vec![19u8, 30, 42, 255]),
    ];
    let code = prop_oneof![6 => Just(0u8), 1 => prop::sample::select(vec![1u8, 3, 4, 15, 255])];
    let ident = prop::sample::select(vec![0u16, 7, 7, 0x1234, 0xffff]);
    (ty, code, ident).prop_map(|(ty, code, ident)| L4Gen::Icmp { ty, code, ident })
}

fn dst() -> impl Strategy<Value = Dst> {
    prop_oneof![
        8 => any::<Index>().prop_map(Dst::SameVpc),
        8 => any::<Index>().prop_map(Dst::LocalSameVpc),
        2 => any::<Index>().prop_map(Dst::AnyInstance),
        1 => any::<Index>().prop_map(Dst::Missing),
        2 => any::<Index>().prop_map(Dst::Outside),
        1 => any::<Index>().prop_map(Dst::Special),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        prop::sample::select(vec![0usize, 1, 10, 19, 21]).prop_map(Mutation::Truncate),
        prop::sample::select(vec![6u8, 5, 0, 15]).prop_map(Mutation::Version),
        prop::sample::select(vec![4u8, 0, 6, 15]).prop_map(Mutation::Ihl),
        prop::sample::select(vec![-1i16, 1, -20, 100]).prop_map(Mutation::TotalDelta),
        prop::sample::select(vec![0usize, 3, 4, 7, 19]).prop_map(Mutation::L4Cut),
        prop::sample::select(vec![0u8, 4, 6, 15]).prop_map(Mutation::TcpDoff),
        Just(Mutation::Options),
        Just(Mutation::BadIpChecksum),
    ]
}

fn gre_tweak() -> impl Strategy<Value = GreTweak> {
    prop_oneof![
        (1u16..=7).prop_map(GreTweak::Version),
        prop::sample::select(vec![
            0x4000u16, 0x0800, 0x0400, 0x0200, 0x0100, 0x0040, 0x0008
        ])
        .prop_map(GreTweak::Bit),
        Just(GreTweak::NoKey),
        prop::sample::select(vec![0x86ddu16, 0x6558, 0x0806, 0x0000]).prop_map(GreTweak::Proto),
        Just(GreTweak::BadChecksum),
        prop::sample::select(vec![0usize, 2, 3, 5, 9]).prop_map(GreTweak::Truncate),
        Just(GreTweak::EmptyInner),
        prop::sample::select(vec![1usize, 4]).prop_map(GreTweak::CutInner),
    ]
}

fn outer_tweak() -> impl Strategy<Value = OuterTweak> {
    prop_oneof![
        1 => prop::sample::select(vec![0usize, 10, 19]).prop_map(OuterTweak::Short),
        1 => prop::sample::select(vec![6u8, 5]).prop_map(OuterTweak::Version),
        1 => prop::sample::select(vec![4u8, 15]).prop_map(OuterTweak::Ihl),
        3 => Just(OuterTweak::Options),
        1 => prop::sample::select(vec![-1i16, 1]).prop_map(OuterTweak::TotalDelta),
        1 => Just(OuterTweak::Mf),
        1 => Just(OuterTweak::Offset),
        1 => prop::sample::select(vec![17u8, 4]).prop_map(OuterTweak::Proto),
        1 => any::<Index>().prop_map(OuterTweak::Dst),
        1 => Just(OuterTweak::BadChecksum),
    ]
}

fn encap() -> impl Strategy<Value = Encap> {
    (
        prop::bool::weighted(0.4),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.3),
        prop_oneof![
            40 => Just(KeyTweak::Right),
            2 => any::<Index>().prop_map(KeyTweak::Other),
            2 => any::<Index>().prop_map(KeyTweak::Sibling),
            1 => Just(KeyTweak::Unknown),
        ],
        prop_oneof![
            40 => Just(SenderTweak::Right),
            1 => any::<Index>().prop_map(SenderTweak::Host),
            1 => Just(SenderTweak::Unknown),
        ],
        prop::option::weighted(0.05, gre_tweak()),
        prop::option::weighted(0.05, outer_tweak()),
    )
        .prop_map(|(udp, csum, seq, key, sender, gre, outer)| Encap {
            udp,
            csum,
            seq,
            key,
            sender,
            gre,
            outer,
        })
}

pub(super) fn shape() -> BoxedStrategy<Shape> {
    (
        0usize..48,
        prop::bool::weighted(0.02),
        prop_oneof![
            60 => Just(PortTweak::Right),
            1 => any::<Index>().prop_map(PortTweak::Remote),
            1 => Just(PortTweak::Bogus),
        ],
        prop::bool::weighted(0.5),
        prop::option::weighted(0.04, prop::sample::select(vec![-1i32, 0, 1, 40])),
        prop::bool::weighted(0.06),
        prop_oneof![4 => 0u16..3, 1 => any::<u16>()],
        prop::option::weighted(0.05, mutation()),
        encap(),
        0u8..8,
        prop::option::weighted(0.35, any::<Index>()),
    )
        .prop_map(
            |(payload, spoof, port, df, big, first_frag, id, mutation, encap, twist, foreign)| {
                Shape {
                    payload,
                    spoof,
                    port,
                    df,
                    big,
                    first_frag,
                    id,
                    mutation,
                    encap,
                    twist,
                    foreign,
                }
            },
        )
        .boxed()
}

fn fresh(remote: bool) -> impl Strategy<Value = Op> {
    (
        prop::bool::weighted(0.15),
        any::<Index>(),
        dst(),
        l4(),
        shape(),
    )
        .prop_map(move |(wide, sender, dst, l4, shape)| Op::Fresh {
            remote,
            wide,
            sender,
            dst,
            l4,
            shape,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => fresh(false).boxed(),
        14 => fresh(true).boxed(),
        22 => (pick(), flag_sel(1), shape()).prop_map(|(k, flags, shape)| Op::Reply { k, flags, shape }).boxed(),
        9 => (pick(), flag_sel(2), shape()).prop_map(|(k, flags, shape)| Op::Again { k, flags, shape }).boxed(),
        15 => pick().prop_map(|k| Op::Repeat { k }).boxed(),
        8 => (pick(), shape()).prop_map(|(k, shape)| Op::Mirror { k, shape }).boxed(),
        4 => (pick(), shape()).prop_map(|(k, shape)| Op::Forward { k, shape }).boxed(),
        3 => (pick(), any::<Index>()).prop_map(|(k, via)| Op::Impostor { k, via }).boxed(),
        5 => (
            pick(),
            prop::sample::select(vec![3u8, 3, 3, 11, 4, 5, 12, 13]),
            prop::sample::select(vec![3u8, 4, 0]),
            prop_oneof![
                8 => Just(QuoteTweak::Exact),
                3 => Just(QuoteTweak::Full),
                2 => prop::sample::select(vec![0usize, 3, 4, 7, 8]).prop_map(QuoteTweak::Short),
                1 => Just(QuoteTweak::Mf),
                1 => Just(QuoteTweak::BadTotal),
                1 => Just(QuoteTweak::WrongSrc),
                1 => Just(QuoteTweak::FragOffset),
                1 => Just(QuoteTweak::NotIpv4),
            ],
            shape(),
        )
            .prop_map(|(k, ty, code, quote, shape)| Op::IcmpError { k, ty, code, quote, shape }).boxed(),
        5 => (
            pick(),
            prop::sample::select(vec![1u16, 2, 3, 4, 185]),
            any::<bool>(),
            prop::sample::select(vec![8usize, 16, 40]),
            shape(),
        )
            .prop_map(|(k, offset, mf, len, shape)| Op::Later { k, offset, mf, len, shape }).boxed(),
    ]
}

fn dt() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => Just(0u64),
        5 => 1u64..2000,
        1 => 2000u64..20_000,
        2 => prop::sample::select(vec![
            10_000u64, 29_999, 30_000, 30_001, 59_999, 60_000, 60_001, 120_000, 120_001, 200_000,
            300_000, 300_001,
        ]),
        1 => 0u64..200_000,
    ]
}

fn small_dt() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => Just(0u64),
        3 => 1u64..1000,
        1 => dt(),
    ]
}

/// A conversation: a reply to an earlier packet, then turns back and forth with natural flags.
/// `reply` and `again` make the ops of each direction (VPC or cloud topologies).
fn conversation(
    reply: fn(Pick, FlagSel, Shape) -> Op,
    again: fn(Pick, FlagSel, Shape) -> Op,
) -> impl Strategy<Value = Vec<Step>> {
    let turn = (small_dt(), prop::bool::weighted(0.7), flag_sel(1), shape());
    (
        pick(),
        dt(),
        flag_sel(1),
        shape(),
        prop::collection::vec(turn, 1..6),
    )
        .prop_map(move |(k, dt, flags, shape, turns)| {
            let mut v = vec![Step {
                dt,
                op: reply(k, flags, shape),
            }];
            for (dt, back, flags, shape) in turns {
                let k = Pick::Recent(0);
                let op = if back {
                    reply(k, flags, shape)
                } else {
                    again(k, flags, shape)
                };
                v.push(Step { dt, op });
            }
            v
        })
}

fn talk() -> impl Strategy<Value = Vec<Step>> {
    conversation(
        |k, flags, shape| Op::Reply { k, flags, shape },
        |k, flags, shape| Op::Again { k, flags, shape },
    )
}

/// Later fragments of the datagram of the most recent packet: (dt, offset, MF, length, shape).
fn later_fragments() -> impl Strategy<Value = Vec<(u64, u16, bool, usize, Shape)>> {
    let frag_dt = prop_oneof![
        3 => Just(0u64),
        2 => 1u64..5000,
        1 => prop::sample::select(vec![29_999u64, 30_000, 30_001]),
    ];
    let later = (
        frag_dt,
        prop::sample::select(vec![1u16, 2, 3, 4, 185]),
        any::<bool>(),
        prop::sample::select(vec![8usize, 16, 40]),
        shape(),
    );
    prop::collection::vec(later, 1..4)
}

/// The first fragment of a datagram: its shape says so, and it is never oversize.
fn first_fragment(shape: &mut Shape) {
    shape.first_frag = true;
    shape.big = None;
}

/// A first fragment and some later fragments of the same datagram.
fn fragments() -> impl Strategy<Value = Vec<Step>> {
    (
        dt(),
        prop_oneof![fresh(false), fresh(true)],
        later_fragments(),
        prop::option::weighted(
            0.3,
            (
                small_dt(),
                prop::sample::select(vec![0x03u8, 0x00, 0x01, 0x10, 0x12, 0x02]),
                shape(),
            ),
        ),
    )
        .prop_map(|(dt, mut first, laters, refirst)| {
            if let Op::Fresh { shape, .. } = &mut first {
                first_fragment(shape);
            }
            let mut v = vec![Step { dt, op: first }];
            if let Some((dt, flags, shape)) = refirst {
                let op = Op::Refirst {
                    k: Pick::Recent(0),
                    flags,
                    shape,
                };
                v.push(Step { dt, op });
            }
            for (dt, offset, mf, len, shape) in laters {
                let op = Op::Later {
                    k: Pick::Recent(0),
                    offset,
                    mf,
                    len,
                    shape,
                };
                v.push(Step { dt, op });
            }
            v
        })
}

pub fn steps() -> impl Strategy<Value = Vec<Step>> {
    // Boxed: a union's value tree holds room for every branch's, and the vector moves them.
    let unit = prop_oneof![
        14 => (dt(), op()).prop_map(|(dt, op)| vec![Step { dt, op }]).boxed(),
        3 => talk().boxed(),
        1 => fragments().boxed(),
        1 => super::units::flood(false).boxed(),
        2 => super::units::tcp_script(false).boxed(),
    ];
    (
        (dt(), fresh(false)).prop_map(|(dt, op)| Step { dt, op }),
        prop::collection::vec(unit, 8..=20),
    )
        .prop_map(|(first, rest)| {
            let mut v = vec![first];
            v.extend(rest.into_iter().flatten());
            v
        })
}

// ----- resolution ---------------------------------------------------------------------------

/// What a sent packet was, logically (for replies, errors and fragments that refer to it).
#[derive(Debug, Clone)]
pub struct Flow {
    /// The instance that sent it (as far as the generator meant).
    pub sender: usize,
    /// Sent from this host's instance (else through the underlay).
    pub local: bool,
    pub vpc: usize,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: Proto,
    pub id: u16,
    /// The inner packet bytes.
    pub inner: Vec<u8>,
    pub encap: Encap,
    /// Cloud packets: who sent it and how it reached this host.
    pub cloud: Option<CloudFlow>,
}

/// One packet of a sequence.
#[derive(Debug, Clone)]
pub struct Sent {
    pub ingress: Ingress,
    pub bytes: Vec<u8>,
    pub at: u64,
    pub what: String,
    pub flow: Flow,
    pub decision: Option<Decision>,
}

pub struct Resolver<'a> {
    pub topo: &'a Topology,
    pub this: usize,
    pub mtu: u16,
}

fn ip(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

impl Resolver<'_> {
    fn local(&self, i: usize) -> bool {
        self.topo.instances[i].host.0 as usize == self.this
    }

    fn vpc_key(&self, vpc: usize) -> u32 {
        self.topo.vpcs[vpc].key
    }

    /// Resolves a step of either mix against the history: one method a kind of step, the
    /// steps both mixes share (later fragments, the same packet again) by one method each.
    pub fn resolve(&self, op: &Op, hist: &[Sent], at: u64) -> Sent {
        match op {
            Op::Fresh {
                remote,
                wide,
                sender,
                dst,
                l4,
                shape,
            } => self.fresh((*remote, *wide), sender, dst, l4, shape, at),
            Op::Refirst { k, flags, shape } => self.refirst(k, *flags, shape, hist, at),
            Op::Mirror { k, shape } => self.mirror(k, shape, hist, at),
            Op::Impostor { k, via } => self.impostor(k, via, hist, at),
            Op::Repeat { k } => repeat(k.index(hist.len()), hist, at),
            Op::Reply { k, flags, shape } => self.reply(k, *flags, shape, hist, at),
            Op::Again { k, flags, shape } | Op::CAgain { k, flags, shape } => {
                self.again(k.index(hist.len()), hist, *flags, shape, at)
            }
            Op::IcmpError {
                k,
                ty,
                code,
                quote,
                shape,
            } => self.icmp_error(k, (*ty, *code), quote, shape, hist, at),
            Op::Later {
                k,
                offset,
                mf,
                len,
                shape,
            }
            | Op::CLater {
                k,
                offset,
                mf,
                len,
                shape,
            } => self.later(k, (*offset, *mf, *len), shape, hist, at),
            Op::Forward { k, shape } => self.forward(k, hist, shape, at),
            Op::CFresh {
                remote,
                wide,
                sender,
                dst,
                l4,
                shape,
            } => self.cfresh((*remote, *wide), sender, dst, l4, shape, at),
            Op::CNet {
                src,
                dst,
                raw,
                l4,
                shape,
            } => self.cnet(src, dst, *raw, l4, shape, at),
            Op::CRelay {
                src,
                to,
                local,
                key,
                l4,
                shape,
            } => self.crelay((src, to, *local), key, l4, shape, at),
            Op::CReply { k, flags, shape } => self.creply(k, *flags, shape, hist, at),
            Op::CError {
                k,
                ty,
                code,
                quote,
                shape,
            } => self.cerror(k, (*ty, *code), quote, shape, hist, at),
            Op::CRekey { k, key } => self.crekey(k.index(hist.len()), key, hist, at),
            Op::CImpostor { k, via } => self.cimpostor(k.index(hist.len()), via, hist, at),
            Op::Retopo => unreachable!("run by the test itself"),
        }
    }

    /// [`Op::Fresh`]: a new packet from a local or remote instance.
    fn fresh(
        &self,
        (remote, wide): (bool, bool),
        sender: &Index,
        dst: &Dst,
        l4: &L4Gen,
        shape: &Shape,
        at: u64,
    ) -> Sent {
        let n = self.topo.instances.len();
        let vpc_of = |i: usize| self.topo.instances[i].vpc().unwrap().index();
        let here = |v: usize| (0..n).any(|j| self.local(j) && vpc_of(j) == v);
        let mut remotes: Vec<usize> = (0..n)
            .filter(|&i| !self.local(i) && (wide || here(vpc_of(i))))
            .collect();
        if remotes.is_empty() {
            remotes = (0..n).filter(|&i| !self.local(i)).collect();
        }
        let locals: Vec<usize> = (0..n).filter(|&i| self.local(i)).collect();
        let s = if remote && !remotes.is_empty() {
            remotes[sender.index(remotes.len())]
        } else {
            locals[sender.index(locals.len())]
        };
        let vpc = vpc_of(s);
        let d = self.fresh_dst(s, vpc, dst);
        let proto = proto_of(l4);
        let src = self.source_of(s, shape);
        self.emit("fresh", s, vpc, src, d, proto, None, shape, at)
    }

    /// The destination of a fresh packet of the VPC mix from `s` (in `vpc`).
    fn fresh_dst(&self, s: usize, vpc: usize, dst: &Dst) -> Ipv4Addr {
        let n = self.topo.instances.len();
        let in_vpc = |j: usize| self.topo.instances[j].vpc().unwrap().index() == vpc;
        match dst {
            Dst::SameVpc(i) => {
                let same = not_self((0..n).filter(|&j| in_vpc(j)).collect(), s, i);
                self.topo.instances[same[i.index(same.len())]].ip
            }
            Dst::LocalSameVpc(i) => {
                let mut same: Vec<usize> = (0..n).filter(|&j| in_vpc(j) && self.local(j)).collect();
                if same.iter().all(|&j| j == s) {
                    same = (0..n).filter(|&j| in_vpc(j)).collect();
                }
                let same = not_self(same, s, i);
                self.topo.instances[same[i.index(same.len())]].ip
            }
            Dst::AnyInstance(i) => self.topo.instances[i.index(n)].ip,
            Dst::Missing(i) => {
                let [a, b, _, _] = self.topo.vpcs[vpc].cidr.network().octets();
                let choices = [
                    [a, b, 1, 77],
                    [a, b, 2, 1],
                    [a, b, 1, 255],
                    [a, b, 9, 9],
                    [a, b, 3, 10],
                ];
                ip(choices[i.index(choices.len())])
            }
            Dst::Outside(i) => ip(OUTSIDE[i.index(OUTSIDE.len())]),
            Dst::Special(i) => ip(SPECIAL[i.index(SPECIAL.len())]),
        }
    }

    /// [`Op::Refirst`]: the first fragment of an earlier datagram again.
    fn refirst(&self, k: &Pick, flags: u8, shape: &Shape, hist: &[Sent], at: u64) -> Sent {
        let ki = k.index(hist.len());
        let f = &hist[ki].flow;
        let proto = match f.proto {
            Proto::Tcp { sport, dport, .. } => Proto::Tcp {
                sport,
                dport,
                flags,
            },
            Proto::Udp { sport, .. } => Proto::Udp { sport, dport: 4754 },
            Proto::Icmp { .. } => Proto::Icmp {
                ty: 3,
                code: 1,
                ident: 0,
            },
            other => other,
        };
        let mut shape = shape.clone();
        shape.id = f.id;
        shape.first_frag = true;
        shape.big = None;
        shape.mutation = None;
        self.emit(
            &format!("first fragment of #{ki}'s datagram again"),
            f.sender,
            f.vpc,
            f.src,
            f.dst,
            proto,
            None,
            &shape,
            at,
        )
    }

    /// [`Op::Mirror`]: an earlier packet sent by its sender's twin (same address, another
    /// VPC); repeated when it has none.
    fn mirror(&self, k: &Pick, shape: &Shape, hist: &[Sent], at: u64) -> Sent {
        let n = self.topo.instances.len();
        let ki = k.index(hist.len());
        let f = &hist[ki].flow;
        let ip = self.topo.instances[f.sender].ip;
        let twin = (0..n).find(|&i| {
            let x = &self.topo.instances[i];
            x.ip == ip && x.vpc().unwrap().index() != f.vpc
        });
        let Some(t) = twin else {
            let mut sent = repeat(ki, hist, at);
            sent.what = format!("repeat of #{ki} (no twin to mirror it)");
            return sent;
        };
        let vpc = self.topo.instances[t].vpc().unwrap().index();
        let flow = Flow {
            sender: t,
            local: self.local(t),
            vpc,
            ..f.clone()
        };
        self.wrap(
            &format!("#{ki} mirrored by i{t} in v{vpc}"),
            t,
            f.inner.clone(),
            flow,
            &shape.port,
            &shape.encap,
            at,
        )
    }

    /// [`Op::Impostor`]: an earlier packet's bytes from another port or underlay address.
    fn impostor(&self, k: &Pick, via: &Index, hist: &[Sent], at: u64) -> Sent {
        let n = self.topo.instances.len();
        let ki = k.index(hist.len());
        let h = &hist[ki];
        let hosts = &self.topo.hosts;
        let (ingress, bytes, note) = match h.ingress {
            Ingress::Instance(_) | Ingress::Internet => {
                let id = via.index(n + 1) as u32;
                let id = if id as usize == n { 99 } else { id };
                let ingress = Ingress::Instance(vpcd_core::topology::InstanceId(id));
                (ingress, h.bytes.clone(), format!("port {id}"))
            }
            Ingress::UnderlayUdp { .. } => {
                let from = hosts[via.index(hosts.len())].address;
                (
                    Ingress::UnderlayUdp { from },
                    h.bytes.clone(),
                    format!("udp from {from}"),
                )
            }
            Ingress::UnderlayIp => {
                let from = hosts[via.index(hosts.len())].address;
                let mut b = h.bytes.clone();
                if b.len() >= 20 {
                    b[12..16].copy_from_slice(&from.octets());
                    build::fix_ip_checksum(&mut b);
                }
                (Ingress::UnderlayIp, b, format!("outer source {from}"))
            }
        };
        Sent {
            ingress,
            bytes,
            at,
            what: format!("#{ki}'s bytes from {note}"),
            flow: h.flow.clone(),
            decision: None,
        }
    }

    /// [`Op::Reply`]: the receiver of a forwarded packet answers (its sender sends again when
    /// nobody received it).
    fn reply(&self, k: &Pick, flags: FlagSel, shape: &Shape, hist: &[Sent], at: u64) -> Sent {
        let ki = pick_forwarded(k, hist);
        let f = &hist[ki].flow;
        match self.receiver(&hist[ki]) {
            Some(r) => self.emit(
                &format!("reply to #{ki}"),
                r,
                f.vpc,
                f.dst,
                f.src,
                f.proto
                    .reversed(flags.resolve(f.proto.flags(), true), shape.twist),
                None,
                shape,
                at,
            ),
            None => self.emit(
                &format!("again (no receiver) #{ki}"),
                f.sender,
                f.vpc,
                f.src,
                f.dst,
                f.proto.with_flags(flags.resolve(f.proto.flags(), false)),
                None,
                shape,
                at,
            ),
        }
    }

    /// [`Op::IcmpError`]: the receiver of a forwarded packet answers it with an ICMP error
    /// quoting it (see [`QuoteTweak`]).
    fn icmp_error(
        &self,
        k: &Pick,
        (ty, code): (u8, u8),
        quote: &QuoteTweak,
        shape: &Shape,
        hist: &[Sent],
        at: u64,
    ) -> Sent {
        let ki = pick_forwarded(k, hist);
        let f = &hist[ki].flow;
        let r = self.receiver(&hist[ki]).unwrap_or(f.sender);
        let mut q = f.inner.clone();
        tweak_quote(&mut q, quote);
        let src = self.topo.instances[r].ip;
        let proto = Proto::Icmp { ty, code, ident: 0 };
        self.emit(
            &format!("icmp error {ty}/{code} ({quote:?}) about #{ki}"),
            r,
            f.vpc,
            src,
            f.src,
            proto,
            Some(&q),
            shape,
            at,
        )
    }

    /// [`Op::Again`] and [`Op::CAgain`]: the sender of packet `ki` sends again, the same way.
    fn again(&self, ki: usize, hist: &[Sent], flags: FlagSel, shape: &Shape, at: u64) -> Sent {
        let f = &hist[ki].flow;
        let proto = f.proto.with_flags(flags.resolve(f.proto.flags(), false));
        let Some(c) = f.cloud.clone() else {
            let what = format!("again #{ki}");
            return self.emit(&what, f.sender, f.vpc, f.src, f.dst, proto, None, shape, at);
        };
        let (inner, desc) = self.build_inner(f.src, f.dst, proto, None, shape);
        let flow = Flow {
            proto,
            id: shape.id,
            inner: inner.clone(),
            encap: shape.encap.clone(),
            ..f.clone()
        };
        let what = format!("again #{ki}: {:?} {desc}", c.origin);
        self.arrive(&what, c.via, inner, flow, &shape.port, &shape.encap, at)
    }

    /// [`Op::Later`] and [`Op::CLater`]: a later fragment of an earlier datagram (of a first
    /// fragment, when `k` picks the last or any and there is one), sent the same way.
    fn later(
        &self,
        k: &Pick,
        (offset, mf, len): (u16, bool, usize),
        shape: &Shape,
        hist: &[Sent],
        at: u64,
    ) -> Sent {
        let firsts: Vec<usize> = (0..hist.len())
            .filter(|&i| {
                let b = &hist[i].flow.inner;
                b.len() >= 8 && b[6] & 0x20 != 0 && b[6] & 0x1f == 0 && b[7] == 0
            })
            .collect();
        let ki = match k {
            Pick::Recent(0) | Pick::Any(_) if !firsts.is_empty() => firsts[k.index(firsts.len())],
            _ => k.index(hist.len()),
        };
        let f = hist[ki].flow.clone();
        let payload: Vec<u8> = (0..len).map(|x| x as u8 ^ 0x5a).collect();
        let header = Ip4 {
            src: f.src,
            dst: f.dst,
            proto: f.proto.number(),
            id: f.id,
            df: false,
            mf,
            offset,
        };
        let inner = build::ipv4(&header, &payload);
        let what = format!(
            "later fragment of #{ki}: offset {} bytes, mf {mf}, {} bytes",
            offset * 8,
            inner.len()
        );
        let encap = if f.local {
            shape.encap.clone()
        } else {
            f.encap.clone()
        };
        match f.cloud.clone() {
            Some(c) => self.arrive(&what, c.via, inner, f, &shape.port, &encap, at),
            None => self.wrap(&what, f.sender, inner, f, &shape.port, &encap, at),
        }
    }

    /// Who received `h`: the pipeline's deliver target, or the encapsulation's remote instance,
    /// or the instance holding its destination address.
    fn receiver(&self, h: &Sent) -> Option<usize> {
        let f = &h.flow;
        let n = self.topo.instances.len();
        match h.decision {
            Some(Decision::Deliver { to, .. }) => Some(to.0 as usize),
            Some(Decision::Encapsulate { host, key, .. }) => {
                self.reached(self.channel_of_key(key)?, host, f.dst)
            }
            _ => (0..n).find(|&i| {
                let x = &self.topo.instances[i];
                x.vpc().unwrap().index() == f.vpc && x.ip == f.dst
            }),
        }
    }

    /// Builds the inner packet of `sender` and sends it (from its port or through the underlay).
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        what: &str,
        sender: usize,
        vpc: usize,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: Proto,
        icmp_payload: Option<&[u8]>,
        shape: &Shape,
        at: u64,
    ) -> Sent {
        let (inner, desc) = self.build_inner(src, dst, proto, icmp_payload, shape);
        let desc = format!("{what}: i{sender} {desc}");
        let flow = Flow {
            sender,
            local: self.local(sender),
            vpc,
            src,
            dst,
            proto,
            id: shape.id,
            inner: inner.clone(),
            encap: shape.encap.clone(),
            cloud: None,
        };
        self.wrap(&desc, sender, inner, flow, &shape.port, &shape.encap, at)
    }

    #[allow(clippy::too_many_arguments)]
    fn wrap(
        &self,
        what: &str,
        sender: usize,
        inner: Vec<u8>,
        mut flow: Flow,
        port: &PortTweak,
        e: &Encap,
        at: u64,
    ) -> Sent {
        flow.inner = inner.clone();
        let n = self.topo.instances.len();
        if self.local(sender) {
            let (id, note) = match port {
                PortTweak::Right => (sender as u32, String::new()),
                PortTweak::Remote(i) => {
                    let i = i.index(n);
                    (i as u32, format!(" via port i{i}"))
                }
                PortTweak::Bogus => (99, " via port 99".to_string()),
            };
            return Sent {
                ingress: Ingress::Instance(vpcd_core::topology::InstanceId(id)),
                bytes: inner,
                at,
                what: format!("{what}{note}"),
                flow,
                decision: None,
            };
        }
        let hosts = &self.topo.hosts;
        let sender_host = self.topo.instances[sender].host.index();
        let right = hosts[sender_host].address;
        let key = self.key_towards(sender, flow.src, flow.dst, false);
        let (ingress, bytes, desc) = self.underlay(what, (right, key), Some(sender), inner, e);
        Sent {
            ingress,
            bytes,
            at,
            what: desc,
            flow,
            decision: None,
        }
    }

    /// An inner packet through the underlay from `right` (the sending host) with `right_key`,
    /// as the encapsulation's tweaks change it: (ingress, bytes, description).
    fn underlay(
        &self,
        what: &str,
        (right, right_key): (Ipv4Addr, Option<u32>),
        sender: Option<usize>,
        inner: Vec<u8>,
        e: &Encap,
    ) -> (Ingress, Vec<u8>, String) {
        let hosts = &self.topo.hosts;
        let me = hosts[self.this].address;
        let from = match &e.sender {
            SenderTweak::Right => right,
            SenderTweak::Host(i) => hosts[i.index(hosts.len())].address,
            SenderTweak::Unknown => Ipv4Addr::new(192, 0, 2, 99),
        };
        let key = match &e.key {
            KeyTweak::Right => right_key,
            KeyTweak::Other(i) => Some(self.any_key(i)),
            KeyTweak::Sibling(i) => match sender {
                Some(s) => self.sibling_key(s, i),
                None => Some(self.any_key(i)),
            },
            KeyTweak::Unknown => Some(424_242),
        };
        let mut o = GreOpts {
            checksum: e.csum,
            key,
            seq: e.seq.then_some(0x0102_0304),
            extra_bits: 0,
            proto: 0x0800,
            bad_checksum: false,
        };
        let mut payload = inner;
        match e.gre {
            Some(GreTweak::Version(v)) => o.extra_bits |= v,
            Some(GreTweak::Bit(b)) => o.extra_bits |= b,
            Some(GreTweak::NoKey) => o.key = None,
            Some(GreTweak::Proto(p)) => o.proto = p,
            Some(GreTweak::BadChecksum) => {
                o.checksum = true;
                o.bad_checksum = true;
            }
            Some(GreTweak::EmptyInner) => payload.clear(),
            Some(GreTweak::CutInner(c)) => {
                let l = payload.len().saturating_sub(c);
                payload.truncate(l);
            }
            Some(GreTweak::Truncate(_)) | None => {}
        }
        let mut g = build::gre(&o, &payload);
        if let Some(GreTweak::Truncate(t)) = e.gre {
            let hlen = g.len() - payload.len();
            g.truncate(t.min(hlen - 1));
        }
        let mut desc = format!(
            "{what} | from {from} key {key:?} csum {} seq {}",
            o.checksum, e.seq
        );
        if let Some(t) = e.gre {
            desc.push_str(&format!(" gre {t:?}"));
        }
        let (ingress, bytes) = if e.udp {
            desc.push_str(" via udp");
            (Ingress::UnderlayUdp { from }, g)
        } else {
            let options = usize::from(matches!(e.outer, Some(OuterTweak::Options))) * 4;
            let mut b = build::outer(from, me, options, &g);
            if let Some(t) = &e.outer {
                desc.push_str(&format!(" outer {t:?}"));
                match t {
                    OuterTweak::Short(n) => b.truncate(*n),
                    OuterTweak::Version(v) => b[0] = (v << 4) | (b[0] & 0x0f),
                    OuterTweak::Ihl(h) => b[0] = (b[0] & 0xf0) | h,
                    OuterTweak::Options | OuterTweak::BadChecksum => {}
                    OuterTweak::TotalDelta(d) => {
                        let t = (b.len() as i32 + i32::from(*d)) as u16;
                        b[2..4].copy_from_slice(&t.to_be_bytes());
                    }
                    OuterTweak::Mf => b[6] |= 0x20,
                    OuterTweak::Offset => b[7] |= 0x01,
                    OuterTweak::Proto(p) => b[9] = *p,
                    OuterTweak::Dst(i) => {
                        let choices: Vec<Ipv4Addr> = hosts
                            .iter()
                            .map(|h| h.address)
                            .chain([Ipv4Addr::new(10, 9, 9, 9)])
                            .collect();
                        b[16..20].copy_from_slice(&choices[i.index(choices.len())].octets());
                    }
                }
                build::fix_ip_checksum(&mut b);
                if matches!(t, OuterTweak::BadChecksum) {
                    b[10] ^= 0x5a;
                }
            }
            (Ingress::UnderlayIp, b)
        };
        (ingress, bytes, desc)
    }
}

/// Candidates without the sender itself, when there are others (and one time in eight anyway:
/// an instance talking to itself is one side).
fn not_self(v: Vec<usize>, s: usize, i: &Index) -> Vec<usize> {
    let others: Vec<usize> = v.iter().copied().filter(|&j| j != s).collect();
    if others.is_empty() || i.index(8) == 0 {
        v
    } else {
        others
    }
}

/// The packets of `hist` that were forwarded (what gets a reply or an ICMP error in real life).
fn forwarded(hist: &[Sent]) -> Vec<usize> {
    (0..hist.len())
        .filter(|&i| {
            matches!(
                hist[i].decision,
                Some(
                    Decision::Deliver { .. }
                        | Decision::Encapsulate { .. }
                        | Decision::ToInternet { .. }
                )
            )
        })
        .collect()
}

/// The packet `k` refers to; `Any` picks among the forwarded ones when there are some.
/// Packet `ki` again, as it was sent.
fn repeat(ki: usize, hist: &[Sent], at: u64) -> Sent {
    let h = &hist[ki];
    Sent {
        ingress: h.ingress,
        bytes: h.bytes.clone(),
        at,
        what: format!("repeat of #{ki}"),
        flow: h.flow.clone(),
        decision: None,
    }
}

fn pick_forwarded(k: &Pick, hist: &[Sent]) -> usize {
    let forwarded = forwarded(hist);
    match k {
        Pick::Any(i) if !forwarded.is_empty() => forwarded[i.index(forwarded.len())],
        _ => k.index(hist.len()),
    }
}

/// The packet `k` refers to among the forwarded ones, whatever the pick (cloud replies and
/// errors), else any.
fn pick_forwarded_cloud(k: &Pick, hist: &[Sent]) -> usize {
    let forwarded = forwarded(hist);
    if forwarded.is_empty() {
        k.index(hist.len())
    } else {
        forwarded[k.index(forwarded.len())]
    }
}

/// Breaks an inner packet in one of a few ways (then fixes the header checksum if it can).
pub fn mutate(b: &mut Vec<u8>, m: Mutation) {
    match m {
        Mutation::Truncate(n) => b.truncate(n),
        Mutation::Version(v) => {
            if let Some(x) = b.first_mut() {
                *x = (v << 4) | (*x & 0x0f);
            }
        }
        Mutation::Ihl(h) => {
            if let Some(x) = b.first_mut() {
                *x = (*x & 0xf0) | h;
            }
        }
        Mutation::TotalDelta(d) => {
            if b.len() >= 4 {
                let t = (b.len() as i32 + i32::from(d)) as u16;
                b[2..4].copy_from_slice(&t.to_be_bytes());
            }
        }
        Mutation::L4Cut(n) => {
            if b.len() > 20 + n {
                b.truncate(20 + n);
                let t = b.len() as u16;
                b[2..4].copy_from_slice(&t.to_be_bytes());
            }
        }
        Mutation::TcpDoff(d) => {
            if b.len() >= 40 && b[9] == 6 {
                b[32] = (d << 4) | (b[32] & 0x0f);
            }
        }
        Mutation::Options => {
            if b.len() >= 20 && b[0] == 0x45 {
                b.splice(20..20, [1u8, 1, 1, 1]);
                b[0] = 0x46;
                let t = b.len() as u16;
                b[2..4].copy_from_slice(&t.to_be_bytes());
            }
        }
        Mutation::BadIpChecksum => {
            build::fix_ip_checksum(b);
            if b.len() >= 20 {
                b[10] ^= 0x5a;
            }
            return;
        }
    }
    build::fix_ip_checksum(b);
}

// ----- the cloud: the basic network, Elastic IPs, peering, interconnects ---------------------

/// Internet hosts that send (one private address: the internet does not check).
pub const INET_SRCS: [[u8; 4]; 5] = [
    [198, 51, 100, 7],
    [203, 0, 113, 1],
    [8, 8, 8, 8],
    [198, 51, 100, 200],
    [10, 0, 1, 10],
];
/// Public destinations: the internet's client (default and explicit), others, non-EIPs of
/// the internet's CIDR.
pub const PUBLIC: [[u8; 4]; 7] = [
    [198, 51, 100, 7],
    [203, 0, 113, 1],
    [8, 8, 8, 8],
    [203, 0, 113, 5],
    [203, 0, 113, 200],
    [9, 9, 9, 9],
    [203, 0, 113, 254],
];

/// Destinations of a cloud packet from an instance.
#[derive(Debug, Clone)]
pub enum CDst {
    SameSpace(Index),
    LocalSameSpace(Index),
    /// An instance of a VPC peered with the sender's.
    Peer(Index),
    /// Across an interconnect: the linked basic instance, or the linked VPC's instance.
    Linked(Index),
    Basic(Index),
    AnyInstance(Index),
    /// Some instance's Elastic IP (the sender's own included).
    Eip(Index),
    Public(Index),
    /// An instance of a VPC that is neither the sender's nor its peer.
    Third(Index),
    Missing(Index),
    Special(Index),
}

/// Destinations of a packet from the internet.
#[derive(Debug, Clone)]
pub enum NetDst {
    Eip(Index),
    Public(Index),
    Private(Index),
    Special(Index),
}

/// The key of a made-up relay from the gateway.
#[derive(Debug, Clone)]
pub enum RelayKey {
    Right,
    None,
    Other(Index),
    /// A channel from the sender's space.
    Sibling(Index),
}

/// How a cloud packet is sent: as routed, as a reply (an Elastic IP's connection goes back
/// out through it), or straight through the internet's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    Routed,
    Reply,
    Raw,
}

/// Who sent a cloud packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Inst(usize),
    Net,
}

/// How a cloud packet reaches this host (before the encapsulation's tweaks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Port(usize),
    Internet,
    Underlay { from: Ipv4Addr, key: Option<u32> },
}

#[derive(Debug, Clone)]
pub struct CloudFlow {
    pub origin: Origin,
    pub via: Via,
}

/// Where a forwarded packet ended up: the receiver, its own address, and the packet's
/// addresses as it saw them.
#[derive(Debug, Clone, Copy)]
struct Landing {
    rx: Origin,
    rx_addr: Ipv4Addr,
    seen_src: Ipv4Addr,
    seen_dst: Ipv4Addr,
}

pub(super) fn cdst() -> impl Strategy<Value = CDst> {
    prop_oneof![
        6 => any::<Index>().prop_map(CDst::SameSpace),
        5 => any::<Index>().prop_map(CDst::LocalSameSpace),
        4 => any::<Index>().prop_map(CDst::Peer),
        3 => any::<Index>().prop_map(CDst::Linked),
        3 => any::<Index>().prop_map(CDst::Basic),
        2 => any::<Index>().prop_map(CDst::AnyInstance),
        4 => any::<Index>().prop_map(CDst::Eip),
        5 => any::<Index>().prop_map(CDst::Public),
        1 => any::<Index>().prop_map(CDst::Third),
        1 => any::<Index>().prop_map(CDst::Missing),
        1 => any::<Index>().prop_map(CDst::Special),
    ]
}

fn cfresh(remote: bool) -> impl Strategy<Value = Op> {
    (
        prop::bool::weighted(0.15),
        any::<Index>(),
        cdst(),
        l4(),
        shape(),
    )
        .prop_map(move |(wide, sender, dst, l4, shape)| Op::CFresh {
            remote,
            wide,
            sender,
            dst,
            l4,
            shape,
        })
}

fn cnet() -> impl Strategy<Value = Op> {
    let dst = prop_oneof![
        16 => any::<Index>().prop_map(NetDst::Eip),
        2 => any::<Index>().prop_map(NetDst::Public),
        2 => any::<Index>().prop_map(NetDst::Private),
        1 => any::<Index>().prop_map(NetDst::Special),
    ];
    (
        any::<Index>(),
        dst,
        prop::bool::weighted(0.1),
        l4(),
        shape(),
    )
        .prop_map(|(src, dst, raw, l4, shape)| Op::CNet {
            src,
            dst,
            raw,
            l4,
            shape,
        })
}

fn crelay() -> impl Strategy<Value = Op> {
    let key = prop_oneof![
        7 => Just(RelayKey::Right),
        2 => Just(RelayKey::None),
        1 => any::<Index>().prop_map(RelayKey::Other),
    ];
    (
        any::<Index>(),
        any::<Index>(),
        prop::bool::weighted(0.8),
        key,
        l4(),
        shape(),
    )
        .prop_map(|(src, to, local, key, l4, shape)| Op::CRelay {
            src,
            to,
            local,
            key,
            l4,
            shape,
        })
}

fn cloud_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        24 => cfresh(false).boxed(),
        14 => cfresh(true).boxed(),
        8 => cnet().boxed(),
        4 => crelay().boxed(),
        22 => (pick(), flag_sel(1), shape()).prop_map(|(k, flags, shape)| Op::CReply { k, flags, shape }).boxed(),
        8 => (pick(), flag_sel(2), shape()).prop_map(|(k, flags, shape)| Op::CAgain { k, flags, shape }).boxed(),
        12 => pick().prop_map(|k| Op::Repeat { k }).boxed(),
        2 => (pick(), any::<Index>()).prop_map(|(k, via)| Op::Impostor { k, via }).boxed(),
        5 => (
            pick(),
            prop::sample::select(vec![3u8, 3, 3, 11, 4, 5, 12]),
            prop::sample::select(vec![3u8, 4, 0]),
            prop_oneof![
                10 => Just(QuoteTweak::Exact),
                3 => Just(QuoteTweak::Full),
                1 => prop::sample::select(vec![0usize, 3, 4, 7, 8]).prop_map(QuoteTweak::Short),
                1 => Just(QuoteTweak::WrongSrc),
                1 => Just(QuoteTweak::Mf),
            ],
            shape(),
        )
            .prop_map(|(k, ty, code, quote, shape)| Op::CError { k, ty, code, quote, shape }).boxed(),
        3 => (
            pick(),
            prop::sample::select(vec![1u16, 2, 3, 4, 185]),
            any::<bool>(),
            prop::sample::select(vec![8usize, 16, 40]),
            shape(),
        )
            .prop_map(|(k, offset, mf, len, shape)| Op::CLater { k, offset, mf, len, shape }).boxed(),
        2 => (
            pick(),
            prop_oneof![
                3 => Just(RelayKey::Right),
                1 => Just(RelayKey::None),
                1 => any::<Index>().prop_map(RelayKey::Other),
                2 => any::<Index>().prop_map(RelayKey::Sibling),
            ],
        )
            .prop_map(|(k, key)| Op::CRekey { k, key }).boxed(),
        2 => (pick(), any::<Index>()).prop_map(|(k, via)| Op::CImpostor { k, via }).boxed(),
        4 => (pick(), shape()).prop_map(|(k, shape)| Op::Forward { k, shape }).boxed(),
        1 => Just(Op::Retopo).boxed(),
    ]
}

/// A conversation through whatever NAT the first packet went through.
fn cloud_talk() -> impl Strategy<Value = Vec<Step>> {
    conversation(
        |k, flags, shape| Op::CReply { k, flags, shape },
        |k, flags, shape| Op::CAgain { k, flags, shape },
    )
}

fn cloud_fragments() -> impl Strategy<Value = Vec<Step>> {
    (
        dt(),
        prop_oneof![cfresh(false), cfresh(true), cnet()],
        later_fragments(),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(dt, mut first, laters, retopo)| {
            if let Op::CFresh { shape, .. } | Op::CNet { shape, .. } = &mut first {
                first_fragment(shape);
            }
            let mut v = vec![Step { dt, op: first }];
            if retopo {
                v.push(Step {
                    dt: 0,
                    op: Op::Retopo,
                });
            }
            for (dt, offset, mf, len, shape) in laters {
                let op = Op::CLater {
                    k: Pick::Recent(0),
                    offset,
                    mf,
                    len,
                    shape,
                };
                v.push(Step { dt, op });
            }
            v
        })
}

/// Packet sequences for cloud topologies.
pub fn cloud_steps() -> impl Strategy<Value = Vec<Step>> {
    let unit = prop_oneof![
        14 => (dt(), cloud_op()).prop_map(|(dt, op)| vec![Step { dt, op }]).boxed(),
        4 => cloud_talk().boxed(),
        1 => cloud_fragments().boxed(),
        1 => super::units::flood(true).boxed(),
        2 => super::units::tcp_script(true).boxed(),
    ];
    (
        (dt(), cfresh(false)).prop_map(|(dt, op)| Step { dt, op }),
        prop::collection::vec(unit, 8..=20),
    )
        .prop_map(|(first, rest)| {
            let mut v = vec![first];
            v.extend(rest.into_iter().flatten());
            v
        })
}

fn proto_of(l4: &L4Gen) -> Proto {
    match l4 {
        L4Gen::Tcp {
            sport,
            dport,
            flags,
        } => Proto::Tcp {
            sport: SPORTS[sport.index(SPORTS.len())],
            dport: DPORTS[dport.index(DPORTS.len())],
            flags: *flags,
        },
        L4Gen::Udp { sport, dport } => Proto::Udp {
            sport: SPORTS[sport.index(SPORTS.len())],
            dport: DPORTS[dport.index(DPORTS.len())],
        },
        L4Gen::Icmp { ty, code, ident } => Proto::Icmp {
            ty: *ty,
            code: *code,
            ident: *ident,
        },
        L4Gen::Ports {
            proto: 6,
            sport,
            dport,
            flags,
        } => Proto::Tcp {
            sport: *sport,
            dport: *dport,
            flags: *flags,
        },
        L4Gen::Ports {
            proto: 17,
            sport,
            dport,
            ..
        } => Proto::Udp {
            sport: *sport,
            dport: *dport,
        },
        L4Gen::Ports { sport, .. } => Proto::Icmp {
            ty: 8,
            code: 0,
            ident: *sport,
        },
        L4Gen::Raw(p) => Proto::Raw(*p),
    }
}

fn tweak_quote(q: &mut Vec<u8>, quote: &QuoteTweak) {
    let ihl = q.first().map_or(20, |b| usize::from(b & 0x0f) * 4);
    match quote {
        QuoteTweak::Exact => q.truncate(ihl + 8),
        QuoteTweak::Full => q.truncate(400),
        QuoteTweak::Short(m) => q.truncate(20 + m),
        QuoteTweak::WrongSrc => {
            q.truncate(ihl + 8);
            if q.len() >= 16 {
                q[15] ^= 0x40;
            }
        }
        QuoteTweak::FragOffset => {
            q.truncate(ihl + 8);
            if q.len() >= 8 {
                q[7] |= 3;
            }
        }
        QuoteTweak::Mf => {
            q.truncate(ihl + 8);
            if q.len() >= 8 {
                q[6] |= 0x20;
            }
        }
        QuoteTweak::BadTotal => {
            q.truncate(ihl + 8);
            if q.len() >= 4 {
                q[2] = 0;
                q[3] = 19;
            }
        }
        QuoteTweak::NotIpv4 => {
            q.truncate(ihl + 8);
            if !q.is_empty() {
                q[0] = 0x60 | (q[0] & 0x0f);
            }
        }
    }
}

fn private(a: Ipv4Addr) -> bool {
    let [x, y, _, _] = a.octets();
    x == 10 || (x == 172 && (16..32).contains(&y)) || (x == 192 && y == 168)
}

impl Resolver<'_> {
    fn space(&self, i: usize) -> Space {
        self.topo.instances[i].space()
    }

    /// The GRE key of an instance's network.
    fn key_of(&self, i: usize) -> Option<u32> {
        self.topo.instances[i]
            .vpc()
            .map(|v| self.vpc_key(v.index()))
    }

    fn gateway(&self) -> Option<usize> {
        self.topo.internet.as_ref().map(|n| n.gateway.index())
    }

    fn eip_owner(&self, a: Ipv4Addr) -> Option<usize> {
        self.topo.instances.iter().position(|i| i.eip == Some(a))
    }

    fn linked_vpc(&self, i: usize) -> Option<usize> {
        self.topo
            .interconnects
            .iter()
            .find(|c| c.instance.index() == i)
            .map(|c| c.vpc.index())
    }

    fn peers(&self, v: usize) -> Vec<usize> {
        self.topo
            .peerings
            .iter()
            .filter_map(|p| {
                let [a, b] = [p.vpcs[0].index(), p.vpcs[1].index()];
                if a == v {
                    Some(b)
                } else if b == v {
                    Some(a)
                } else {
                    None
                }
            })
            .collect()
    }

    /// The longest route of `s`'s subnet table holding `dst`.
    fn lpm(&self, s: usize, dst: Ipv4Addr) -> Option<NextHop> {
        let subnet = self.topo.instances[s].subnet()?;
        let table = self.topo.subnet(subnet).route_table.index();
        self.topo.route_tables[table]
            .routes
            .as_slice()
            .iter()
            .filter(|r| r.destination.contains(&dst))
            .max_by_key(|r| r.destination.prefix_len())
            .map(|r| r.next_hop)
    }

    /// The channel `s`'s host sends its packet from `src` to `dst` on: the generator's guess
    /// at the sender's route (the model decides). An appliance's foreign source goes on its
    /// own channel; a public destination reached through the Elastic IP on the internet's
    /// (`reply`: also where a route sends it elsewhere, as an Elastic IP reply does).
    fn channel_towards(&self, s: usize, src: Ipv4Addr, dst: Ipv4Addr, reply: bool) -> Channel {
        let t = self.topo;
        let inst = &t.instances[s];
        if src != inst.ip && !inst.source_check {
            return Channel::Appliance(InstanceId(s as u32));
        }
        let eip_out = inst.eip.is_some() && !private(dst) && t.internet.is_some();
        let out = Channel::Internet {
            space: inst.space(),
            inbound: false,
        };
        let Some(v) = inst.vpc() else {
            return match self.linked_vpc(s) {
                _ if t.basic.is_some_and(|b| b.cidr.contains(&dst)) => Channel::Basic,
                Some(v) if t.vpcs[v].cidr.contains(&dst) => Channel::Interconnect {
                    vpc: VpcId(v as u32),
                    to_basic: false,
                },
                _ if eip_out => out,
                _ => Channel::Basic,
            };
        };
        if t.vpc(v).cidr.contains(&dst) {
            return Channel::Vpc(v);
        }
        let n = t.instances.len();
        if (0..n).any(|b| {
            t.instances[b].is_basic()
                && t.instances[b].ip == dst
                && self.linked_vpc(b) == Some(v.index())
        }) {
            return Channel::Interconnect {
                vpc: v,
                to_basic: true,
            };
        }
        match self.lpm(s, dst) {
            Some(NextHop::Peering(PeeringId(p))) => {
                let [a, b] = t.peerings[p as usize].vpcs;
                let to = if a == v { b } else { a };
                Channel::Peering {
                    peering: PeeringId(p),
                    to,
                }
            }
            Some(NextHop::Internet) => out,
            Some(NextHop::Instance(_)) if reply && eip_out => out,
            None if eip_out => out,
            _ => Channel::Vpc(v),
        }
    }

    /// The GRE key of a channel (none for the basic network's).
    fn key_of_channel(&self, c: Channel) -> Option<u32> {
        self.topo.key_of(c)
    }

    fn key_towards(&self, s: usize, src: Ipv4Addr, dst: Ipv4Addr, reply: bool) -> Option<u32> {
        self.key_of_channel(self.channel_towards(s, src, dst, reply))
    }

    /// Every channel's key, in order.
    fn channel_keys(&self) -> Vec<u32> {
        let mut keys: Vec<u32> = self.topo.channels().map(|(k, _)| k).collect();
        keys.sort_unstable();
        keys
    }

    /// Some channel's key (often the wrong one for the packet).
    fn any_key(&self, i: &Index) -> u32 {
        let keys = self.channel_keys();
        keys[i.index(keys.len())]
    }

    /// The space a channel's packets come from (none for the internet's inbound ones).
    fn tx_space(&self, c: Channel) -> Option<Space> {
        Some(match c {
            Channel::Vpc(v)
            | Channel::Interconnect {
                vpc: v,
                to_basic: true,
            } => Space::Vpc(v),
            Channel::Peering { peering, to } => {
                let [a, b] = self.topo.peerings[peering.index()].vpcs;
                Space::Vpc(if a == to { b } else { a })
            }
            Channel::Interconnect { .. } | Channel::Basic => Space::Basic,
            Channel::Internet {
                space,
                inbound: false,
            } => space,
            Channel::Internet { .. } => return None,
            Channel::Appliance(x) => self.topo.instance(x).space(),
        })
    }

    /// The key of some channel from `s`'s space (the basic network's: none).
    fn sibling_key(&self, s: usize, i: &Index) -> Option<u32> {
        let sp = self.space(s);
        let mut keys: Vec<Option<u32>> = self
            .channel_keys()
            .into_iter()
            .filter(|&k| self.topo.channel(k).and_then(|c| self.tx_space(c)) == Some(sp))
            .map(Some)
            .collect();
        if sp == Space::Basic {
            keys.push(None);
        }
        keys[i.index(keys.len())]
    }

    /// The channel of a key (none: the basic network's).
    fn channel_of_key(&self, key: Option<u32>) -> Option<Channel> {
        match key {
            None => Some(Channel::Basic),
            Some(k) => self.topo.channel(k),
        }
    }

    /// The space a channel delivers into (none for the way out to the internet).
    fn rx_space(&self, c: Channel) -> Option<Space> {
        Some(match c {
            Channel::Vpc(v)
            | Channel::Peering { to: v, .. }
            | Channel::Interconnect {
                vpc: v,
                to_basic: false,
            } => Space::Vpc(v),
            Channel::Interconnect { to_basic: true, .. } | Channel::Basic => Space::Basic,
            Channel::Internet {
                space,
                inbound: true,
            } => space,
            Channel::Internet { .. } => return None,
            Channel::Appliance(x) => self.topo.instance(x).space(),
        })
    }

    /// The instance on `host` a packet on channel `c` for `dst` reaches: the one at `dst` in
    /// the channel's space, else any there (an appliance a route sent it to, roughly).
    fn reached(&self, c: Channel, host: HostId, dst: Ipv4Addr) -> Option<usize> {
        let sp = self.rx_space(c)?;
        let n = self.topo.instances.len();
        let on = |i: usize| {
            let x = &self.topo.instances[i];
            x.host == host && x.space() == sp
        };
        (0..n)
            .find(|&i| on(i) && self.topo.instances[i].ip == dst)
            .or_else(|| (0..n).find(|&i| on(i)))
    }

    /// A foreign source for appliance `s`: another instance's address, one of the
    /// internet's, or one nobody has.
    fn foreign_src(&self, s: usize, i: &Index) -> Ipv4Addr {
        let mut all: Vec<Ipv4Addr> = self.topo.instances.iter().map(|x| x.ip).collect();
        all.extend(INET_SRCS.iter().map(|a| ip(*a)));
        all.extend(OUTSIDE.iter().map(|a| ip(*a)));
        all.retain(|a| *a != self.topo.instances[s].ip);
        all[i.index(all.len())]
    }

    /// The source an instance sends with, as the shape says.
    fn source_of(&self, s: usize, shape: &Shape) -> Ipv4Addr {
        let inst = &self.topo.instances[s];
        match &shape.foreign {
            Some(i) if !inst.source_check => self.foreign_src(s, i),
            _ if shape.spoof => {
                let mut o = inst.ip.octets();
                o[3] ^= 1;
                ip(o)
            }
            _ => inst.ip,
        }
    }

    /// Whether `r` may send to `x` directly: same space, peered VPCs, an interconnect.
    fn neighbours(&self, r: usize, x: usize) -> bool {
        let t = self.topo;
        if self.space(r) == self.space(x) {
            return true;
        }
        match (t.instances[r].vpc(), t.instances[x].vpc()) {
            (Some(v), Some(w)) => self.peers(v.index()).contains(&w.index()),
            (Some(v), None) => self.linked_vpc(x) == Some(v.index()),
            (None, Some(w)) => self.linked_vpc(r) == Some(w.index()),
            (None, None) => false,
        }
    }

    fn cdst(&self, s: usize, d: &CDst) -> Ipv4Addr {
        let t = self.topo;
        let n = t.instances.len();
        let sp = self.space(s);
        let all: Vec<usize> = (0..n).collect();
        let pick = |v: Vec<usize>, i: &Index, fallback: Vec<usize>| {
            let v = if !v.is_empty() {
                v
            } else if !fallback.is_empty() {
                fallback
            } else {
                all.clone()
            };
            t.instances[v[i.index(v.len())]].ip
        };
        // A remote sender's packet is for this host only if its destination is here: prefer
        // local destinations then.
        let remote = !self.local(s);
        let filter = |f: &dyn Fn(usize) -> bool| {
            let v: Vec<usize> = (0..n).filter(|&i| f(i)).collect();
            let here: Vec<usize> = v.iter().copied().filter(|&i| self.local(i)).collect();
            if remote && !here.is_empty() { here } else { v }
        };
        let basics = filter(&|i| t.instances[i].is_basic());
        match d {
            CDst::SameSpace(i) => pick(not_self(filter(&|j| self.space(j) == sp), s, i), i, vec![]),
            CDst::LocalSameSpace(i) => pick(
                not_self(filter(&|j| self.space(j) == sp && self.local(j)), s, i),
                i,
                filter(&|j| self.space(j) == sp),
            ),
            CDst::Peer(i) => {
                let peers = t.instances[s]
                    .vpc()
                    .map_or(vec![], |v| self.peers(v.index()));
                pick(
                    filter(&|j| {
                        t.instances[j]
                            .vpc()
                            .is_some_and(|w| peers.contains(&w.index()))
                    }),
                    i,
                    filter(&|j| t.instances[j].vpc().is_some() && self.space(j) != sp),
                )
            }
            CDst::Linked(i) => {
                let linked = match t.instances[s].vpc() {
                    Some(v) => filter(&|j| self.linked_vpc(j) == Some(v.index())),
                    None => match self.linked_vpc(s) {
                        Some(v) => filter(&|j| t.instances[j].vpc().map(|w| w.index()) == Some(v)),
                        None => vec![],
                    },
                };
                pick(linked, i, basics.clone())
            }
            CDst::Basic(i) => pick(basics, i, vec![]),
            CDst::AnyInstance(i) => pick(all.clone(), i, vec![]),
            CDst::Eip(i) => {
                let mut eips: Vec<Ipv4Addr> = t.instances.iter().filter_map(|x| x.eip).collect();
                let here: Vec<Ipv4Addr> = (0..n)
                    .filter(|&x| self.local(x))
                    .filter_map(|x| t.instances[x].eip)
                    .collect();
                if remote && self.gateway() != Some(self.this) && !here.is_empty() {
                    eips = here;
                }
                if eips.is_empty() {
                    ip(PUBLIC[i.index(PUBLIC.len())])
                } else {
                    eips[i.index(eips.len())]
                }
            }
            CDst::Public(i) => ip(PUBLIC[i.index(PUBLIC.len())]),
            CDst::Third(i) => {
                let mine = t.instances[s].vpc().map(|v| v.index());
                let peers = mine.map_or(vec![], |v| self.peers(v));
                let third = filter(&|j| {
                    t.instances[j]
                        .vpc()
                        .is_some_and(|w| Some(w.index()) != mine && !peers.contains(&w.index()))
                });
                if third.is_empty() {
                    Ipv4Addr::new(10, 2, 1, 10)
                } else {
                    t.instances[third[i.index(third.len())]].ip
                }
            }
            CDst::Missing(i) => {
                let net = match t.instances[s].vpc() {
                    Some(v) => t.vpcs[v.index()].cidr,
                    None => t.basic.unwrap().cidr,
                };
                let base = u32::from(net.network());
                let last = u32::from(net.broadcast());
                let choices = [
                    base + 1,
                    last,
                    (base + 200).min(last - 1),
                    base + 0x0109,
                    base + 0x0301,
                ];
                Ipv4Addr::from(choices[i.index(choices.len())].min(last))
            }
            CDst::Special(i) => ip(SPECIAL[i.index(SPECIAL.len())]),
        }
    }

    fn build_inner(
        &self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: Proto,
        icmp_payload: Option<&[u8]>,
        shape: &Shape,
    ) -> (Vec<u8>, String) {
        let payload: Vec<u8> = match (icmp_payload, shape.big) {
            (Some(q), _) => q.to_vec(),
            (None, Some(delta)) => {
                let want = i32::from(self.mtu) + delta - 20 - proto.header_len() as i32;
                vec![0xab; want.max(0) as usize]
            }
            (None, None) => (0..shape.payload).map(|x| x as u8).collect(),
        };
        let mut inner = build::ipv4(
            &Ip4 {
                src,
                dst,
                proto: proto.number(),
                id: shape.id,
                df: shape.df,
                mf: shape.first_frag,
                offset: 0,
            },
            &proto.transport(&payload),
        );
        build::fix_l4_checksum(&mut inner);
        let mut desc = format!(
            "{src} -> {dst} {proto:?} id {} df {} len {}",
            shape.id,
            shape.df,
            inner.len()
        );
        if shape.first_frag {
            desc.push_str(" FIRST-FRAGMENT");
        }
        if let Some(m) = shape.mutation {
            mutate(&mut inner, m);
            desc.push_str(&format!(" mutation {m:?}"));
        }
        (inner, desc)
    }

    /// How a packet from `origin` gets to this host: the way in, and the addresses after any
    /// NAT at the gateway (the bytes are rewritten).
    fn route_here(
        &self,
        origin: Origin,
        inner: &mut [u8],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        way: Way,
    ) -> (Via, Ipv4Addr, Ipv4Addr) {
        let hosts = &self.topo.hosts;
        let gw = self.gateway();
        let gw_addr = hosts[gw.unwrap_or(0)].address;
        let inbound = |x: usize| {
            self.key_of_channel(Channel::Internet {
                space: self.space(x),
                inbound: true,
            })
        };
        let r = match origin {
            Origin::Inst(r) if self.local(r) => return (Via::Port(r), src, dst),
            Origin::Net if way == Way::Raw || gw == Some(self.this) => {
                return (Via::Internet, src, dst);
            }
            Origin::Net => {
                return match self.eip_owner(dst) {
                    Some(x) => {
                        let to = self.topo.instances[x].ip;
                        build::nat(inner, None, Some(to));
                        let via = Via::Underlay {
                            from: gw_addr,
                            key: inbound(x),
                        };
                        (via, src, to)
                    }
                    None => (Via::Internet, src, dst),
                };
            }
            Origin::Inst(r) => r,
        };
        let from = hosts[self.topo.instances[r].host.index()].address;
        let c = self.channel_towards(r, src, dst, way == Way::Reply);
        let direct = (
            Via::Underlay {
                from,
                key: self.key_of_channel(c),
            },
            src,
            dst,
        );
        let eip = self.topo.instances[r].eip;
        match (c, self.eip_owner(dst)) {
            // Through the gateway's NAT, turned round to an Elastic IP.
            (Channel::Internet { inbound: false, .. }, Some(x)) if gw != Some(self.this) => {
                let to = self.topo.instances[x].ip;
                build::nat(inner, eip, Some(to));
                let via = Via::Underlay {
                    from: gw_addr,
                    key: inbound(x),
                };
                (via, eip.unwrap_or(src), to)
            }
            _ => direct,
        }
    }

    /// A cloud packet from `origin`, built and sent the way it reaches this host.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        what: &str,
        origin: Origin,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: Proto,
        icmp_payload: Option<&[u8]>,
        shape: &Shape,
        way: Way,
        at: u64,
    ) -> Sent {
        let (mut inner, desc) = self.build_inner(src, dst, proto, icmp_payload, shape);
        let (via, s2, d2) = self.route_here(origin, &mut inner, src, dst, way);
        let mut what = format!("{what}: {origin:?} {desc}");
        if (s2, d2) != (src, dst) {
            what.push_str(&format!(" (arrives as {s2} -> {d2})"));
        }
        let flow = Flow {
            sender: match origin {
                Origin::Inst(r) => r,
                Origin::Net => usize::MAX,
            },
            local: matches!(via, Via::Port(_)),
            vpc: usize::MAX,
            src: s2,
            dst: d2,
            proto,
            id: shape.id,
            inner: inner.clone(),
            encap: shape.encap.clone(),
            cloud: Some(CloudFlow { origin, via }),
        };
        self.arrive(&what, via, inner, flow, &shape.port, &shape.encap, at)
    }

    /// The packet through its way in, as the tweaks change it.
    #[allow(clippy::too_many_arguments)]
    fn arrive(
        &self,
        what: &str,
        via: Via,
        inner: Vec<u8>,
        mut flow: Flow,
        port: &PortTweak,
        e: &Encap,
        at: u64,
    ) -> Sent {
        flow.inner = inner.clone();
        let n = self.topo.instances.len();
        let (ingress, bytes, what) = match via {
            Via::Port(r) => {
                let (id, note) = match port {
                    PortTweak::Right => (r as u32, String::new()),
                    PortTweak::Remote(i) => {
                        let i = i.index(n);
                        (i as u32, format!(" via port i{i}"))
                    }
                    PortTweak::Bogus => (99, " via port 99".to_string()),
                };
                (
                    Ingress::Instance(vpcd_core::topology::InstanceId(id)),
                    inner,
                    format!("{what}{note}"),
                )
            }
            Via::Internet => (
                Ingress::Internet,
                inner,
                format!("{what} | from the internet"),
            ),
            Via::Underlay { from, key } => {
                let sender = (flow.sender < n).then_some(flow.sender);
                self.underlay(what, (from, key), sender, inner, e)
            }
        };
        Sent {
            ingress,
            bytes,
            at,
            what,
            flow,
            decision: None,
        }
    }

    /// Where a forwarded cloud packet ended up.
    fn landing(&self, h: &Sent) -> Option<Landing> {
        let f = &h.flow;
        let c = f.cloud.as_ref()?;
        let t = self.topo;
        let at = |x: usize| t.instances[x].ip;
        match h.decision? {
            Decision::Deliver { to, nat, .. } => Some(Landing {
                rx: Origin::Inst(to.index()),
                rx_addr: at(to.index()),
                seen_src: nat.src.unwrap_or(f.src),
                seen_dst: nat.dst.unwrap_or(f.dst),
            }),
            Decision::ToInternet { nat, .. } => Some(Landing {
                rx: Origin::Net,
                rx_addr: f.dst,
                seen_src: nat.src.unwrap_or(f.src),
                seen_dst: f.dst,
            }),
            Decision::Encapsulate { host, key, nat, .. } => {
                let (s1, d1) = (nat.src.unwrap_or(f.src), nat.dst.unwrap_or(f.dst));
                let ch = self.channel_of_key(key)?;
                if let Channel::Internet { inbound: false, .. } = ch {
                    // The gateway translates what this host sent it.
                    let s2 = match c.origin {
                        Origin::Inst(r) => t.instances[r].eip.unwrap_or(s1),
                        Origin::Net => s1,
                    };
                    return Some(match self.eip_owner(d1) {
                        Some(x) => Landing {
                            rx: Origin::Inst(x),
                            rx_addr: at(x),
                            seen_src: s2,
                            seen_dst: at(x),
                        },
                        None => Landing {
                            rx: Origin::Net,
                            rx_addr: d1,
                            seen_src: s2,
                            seen_dst: d1,
                        },
                    });
                }
                let x = self.reached(ch, host, d1)?;
                Some(Landing {
                    rx: Origin::Inst(x),
                    rx_addr: at(x),
                    seen_src: s1,
                    seen_dst: d1,
                })
            }
            _ => None,
        }
    }

    /// [`Op::CFresh`]: a new packet from a local or remote instance of the cloud mix.
    fn cfresh(
        &self,
        (remote, wide): (bool, bool),
        sender: &Index,
        dst: &CDst,
        l4: &L4Gen,
        shape: &Shape,
        at: u64,
    ) -> Sent {
        let n = self.topo.instances.len();
        let locals: Vec<usize> = (0..n).filter(|&i| self.local(i)).collect();
        let mut remotes: Vec<usize> = (0..n).filter(|&i| !self.local(i)).collect();
        let near: Vec<usize> = remotes
            .iter()
            .copied()
            .filter(|&r| locals.iter().any(|&x| self.neighbours(r, x)))
            .collect();
        if !wide && !near.is_empty() {
            remotes = near;
        }
        let s = if (remote || locals.is_empty()) && !remotes.is_empty() {
            remotes[sender.index(remotes.len())]
        } else {
            locals[sender.index(locals.len())]
        };
        let d = self.cdst(s, dst);
        let src = self.source_of(s, shape);
        let what = format!("fresh {dst:?} from i{s}");
        let way = if shape.twist % 2 == 1 {
            Way::Reply
        } else {
            Way::Routed
        };
        let proto = proto_of(l4);
        self.send(&what, Origin::Inst(s), src, d, proto, None, shape, way, at)
    }

    /// [`Op::CNet`]: a packet from the internet.
    fn cnet(
        &self,
        src: &Index,
        dst: &NetDst,
        raw: bool,
        l4: &L4Gen,
        shape: &Shape,
        at: u64,
    ) -> Sent {
        let t = self.topo;
        let s = ip(INET_SRCS[src.index(INET_SRCS.len())]);
        let eips: Vec<Ipv4Addr> = t.instances.iter().filter_map(|x| x.eip).collect();
        let d = match dst {
            NetDst::Eip(i) if !eips.is_empty() => eips[i.index(eips.len())],
            NetDst::Eip(i) | NetDst::Public(i) => ip(PUBLIC[i.index(PUBLIC.len())]),
            NetDst::Private(i) => t.instances[i.index(t.instances.len())].ip,
            NetDst::Special(i) => ip(SPECIAL[i.index(SPECIAL.len())]),
        };
        let what = format!("internet {dst:?}");
        let way = if raw { Way::Raw } else { Way::Routed };
        let proto = proto_of(l4);
        self.send(&what, Origin::Net, s, d, proto, None, shape, way, at)
    }

    /// [`Op::CRelay`]: a packet from the internet, relayed by the gateway host to an instance.
    fn crelay(
        &self,
        (src, to, local): (&Index, &Index, bool),
        key: &RelayKey,
        l4: &L4Gen,
        shape: &Shape,
        at: u64,
    ) -> Sent {
        let t = self.topo;
        let n = t.instances.len();
        let mut srcs: Vec<Ipv4Addr> = INET_SRCS.iter().map(|a| ip(*a)).collect();
        srcs.extend(t.instances.iter().filter_map(|x| x.eip));
        let s = srcs[src.index(srcs.len())];
        let locals: Vec<usize> = (0..n).filter(|&i| self.local(i)).collect();
        let x = if local && !locals.is_empty() {
            locals[to.index(locals.len())]
        } else {
            to.index(n)
        };
        let key = match key {
            RelayKey::Right => self.key_of_channel(Channel::Internet {
                space: self.space(x),
                inbound: true,
            }),
            RelayKey::None => None,
            RelayKey::Other(i) | RelayKey::Sibling(i) => Some(self.any_key(i)),
        };
        let proto = proto_of(l4);
        let d = t.instances[x].ip;
        let (inner, desc) = self.build_inner(s, d, proto, None, shape);
        let from = t.hosts[self.gateway().unwrap_or(0)].address;
        let via = Via::Underlay { from, key };
        let flow = Flow {
            sender: usize::MAX,
            local: false,
            vpc: usize::MAX,
            src: s,
            dst: d,
            proto,
            id: shape.id,
            inner: inner.clone(),
            encap: shape.encap.clone(),
            cloud: Some(CloudFlow {
                origin: Origin::Net,
                via,
            }),
        };
        let what = format!("relayed by the gateway to i{x}: {desc}");
        self.arrive(&what, via, inner, flow, &shape.port, &shape.encap, at)
    }

    /// [`Op::CReply`]: whoever received a forwarded packet answers, to the address it saw
    /// (its sender sends again when nobody received it).
    fn creply(&self, k: &Pick, flags: FlagSel, shape: &Shape, hist: &[Sent], at: u64) -> Sent {
        let ki = pick_forwarded_cloud(k, hist);
        let f = &hist[ki].flow;
        let proto = f
            .proto
            .reversed(flags.resolve(f.proto.flags(), true), shape.twist);
        match self.landing(&hist[ki]) {
            Some(l) => self.send(
                &format!("reply to #{ki}"),
                l.rx,
                l.rx_addr,
                l.seen_src,
                proto,
                None,
                shape,
                Way::Reply,
                at,
            ),
            None => self.again(ki, hist, flags, shape, at),
        }
    }

    /// [`Op::CError`]: whoever received a forwarded packet answers it with an ICMP error
    /// quoting it as it saw it (after any NAT; see [`QuoteTweak`]).
    fn cerror(
        &self,
        k: &Pick,
        (ty, code): (u8, u8),
        quote: &QuoteTweak,
        shape: &Shape,
        hist: &[Sent],
        at: u64,
    ) -> Sent {
        let ki = pick_forwarded_cloud(k, hist);
        let h = &hist[ki];
        let f = &h.flow;
        let c = f.cloud.as_ref().unwrap();
        let mut q = f.inner.clone();
        let (rx, rx_addr, to) = match self.landing(h) {
            Some(l) => {
                build::nat(&mut q, Some(l.seen_src), Some(l.seen_dst));
                (l.rx, l.rx_addr, l.seen_src)
            }
            None => (c.origin, f.dst, f.src),
        };
        tweak_quote(&mut q, quote);
        let proto = Proto::Icmp { ty, code, ident: 0 };
        self.send(
            &format!("icmp error {ty}/{code} ({quote:?}) about #{ki}"),
            rx,
            rx_addr,
            to,
            proto,
            Some(&q),
            shape,
            Way::Reply,
            at,
        )
    }

    /// [`Op::CRekey`]: packet `ki`'s inner packet again through the underlay, under another key.
    fn crekey(&self, ki: usize, key: &RelayKey, hist: &[Sent], at: u64) -> Sent {
        let f = hist[ki].flow.clone();
        let c = f.cloud.clone().unwrap();
        let (from, was) = match c.via {
            Via::Underlay { from, key } => (from, key),
            _ => (self.topo.hosts[self.gateway().unwrap_or(0)].address, None),
        };
        let key = match key {
            RelayKey::Right => self.rekey_into(ki, was, f.dst),
            RelayKey::None => None,
            RelayKey::Other(i) => Some(self.any_key(i)),
            RelayKey::Sibling(i) => match c.origin {
                Origin::Inst(r) => self.sibling_key(r, i),
                Origin::Net => Some(self.any_key(i)),
            },
        };
        let e = Encap {
            key: KeyTweak::Right,
            sender: SenderTweak::Right,
            gre: None,
            outer: None,
            ..f.encap.clone()
        };
        let via = Via::Underlay { from, key };
        let flow = Flow {
            cloud: Some(CloudFlow { via, ..c }),
            encap: e.clone(),
            ..f.clone()
        };
        let what = format!("#{ki}'s inner packet with key {key:?} (was {was:?})");
        self.arrive(&what, via, f.inner.clone(), flow, &PortTweak::Right, &e, at)
    }

    /// Another channel than `was` into a space where `dst` is someone's (no key when none).
    fn rekey_into(&self, ki: usize, was: Option<u32>, dst: Ipv4Addr) -> Option<u32> {
        let t = self.topo;
        let mut into: Vec<Option<u32>> = self
            .channel_keys()
            .into_iter()
            .map(Some)
            .chain([None])
            .filter(|k| *k != was)
            .filter(|&k| {
                let sp = self.channel_of_key(k).and_then(|c| self.rx_space(c));
                (0..t.instances.len())
                    .any(|x| Some(self.space(x)) == sp && t.instances[x].ip == dst)
            })
            .collect();
        if into.is_empty() {
            into.push(None);
        }
        into[ki % into.len()]
    }

    /// [`Op::CImpostor`]: packet `ki`'s inner packet from the internet, a local port or any
    /// host.
    fn cimpostor(&self, ki: usize, via: &Index, hist: &[Sent], at: u64) -> Sent {
        let t = self.topo;
        let f = hist[ki].flow.clone();
        let c = f.cloud.clone().unwrap();
        let key = match c.via {
            Via::Underlay { key, .. } => key,
            _ => match c.origin {
                Origin::Inst(r) => self.key_towards(r, f.src, f.dst, false),
                Origin::Net => None,
            },
        };
        let mut ways = vec![Via::Internet];
        ways.extend(
            (0..t.instances.len())
                .filter(|&i| self.local(i))
                .map(Via::Port),
        );
        ways.extend(t.hosts.iter().map(|h| Via::Underlay {
            from: h.address,
            key,
        }));
        let via = ways[via.index(ways.len())];
        let e = Encap {
            key: KeyTweak::Right,
            sender: SenderTweak::Right,
            gre: None,
            outer: None,
            ..f.encap.clone()
        };
        let flow = Flow {
            cloud: Some(CloudFlow { via, ..c }),
            local: matches!(via, Via::Port(_)),
            encap: e.clone(),
            ..f.clone()
        };
        let what = format!("#{ki}'s inner packet via {via:?}");
        self.arrive(&what, via, f.inner.clone(), flow, &PortTweak::Right, &e, at)
    }

    /// An appliance sends on a packet it received for another address (see [`Op::Forward`]);
    /// with none such, the packet `k` is repeated.
    fn forward(&self, k: &Pick, hist: &[Sent], shape: &Shape, at: u64) -> Sent {
        let t = self.topo;
        let received = |i: usize| -> Option<(usize, Ipv4Addr, Ipv4Addr)> {
            let f = &hist[i].flow;
            let (x, src, dst) = match f.cloud {
                Some(_) => match self.landing(&hist[i])? {
                    Landing {
                        rx: Origin::Inst(x),
                        seen_src,
                        seen_dst,
                        ..
                    } => (x, seen_src, seen_dst),
                    _ => return None,
                },
                None => (self.receiver(&hist[i])?, f.src, f.dst),
            };
            let inst = &t.instances[x];
            (!inst.source_check && dst != inst.ip).then_some((x, src, dst))
        };
        let found: Vec<(usize, (usize, Ipv4Addr, Ipv4Addr))> = forwarded(hist)
            .into_iter()
            .filter_map(|i| received(i).map(|r| (i, r)))
            .collect();
        if found.is_empty() {
            let ki = k.index(hist.len());
            let h = &hist[ki];
            return Sent {
                what: format!("repeat of #{ki} (no appliance received a packet to forward)"),
                at,
                decision: None,
                ..h.clone()
            };
        }
        let (ki, (x, src, dst)) = found[k.index(found.len())];
        let f = &hist[ki].flow;
        let what = format!("#{ki} forwarded by appliance i{x}");
        match f.cloud {
            Some(_) => self.send(
                &what,
                Origin::Inst(x),
                src,
                dst,
                f.proto,
                None,
                shape,
                Way::Routed,
                at,
            ),
            None => {
                let vpc = t.instances[x].vpc().unwrap().index();
                self.emit(&what, x, vpc, src, dst, f.proto, None, shape, at)
            }
        }
    }
}
