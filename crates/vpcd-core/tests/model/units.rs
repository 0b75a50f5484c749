//! Multi-step units of the packet sequences: floods of distinct connections (to reach the
//! connection-tracking limits) and TCP scripts (the corners of nf_conntrack's state table).

use proptest::prelude::*;
use proptest::sample::Index;

use super::ops::{
    CDst, Dst, FlagSel, KeyTweak, L4Gen, Op, PortTweak, SenderTweak, Shape, Step, cdst, shape,
};

/// A shape without tweaks: the packet is what a well-behaved sender sends.
fn clean(mut s: Shape) -> Shape {
    s.spoof = false;
    s.port = PortTweak::Right;
    s.big = None;
    s.first_frag = false;
    s.mutation = None;
    s.encap.key = KeyTweak::Right;
    s.encap.sender = SenderTweak::Right;
    s.encap.gre = None;
    s.encap.outer = None;
    s.twist = 2;
    s.foreign = None;
    s
}

/// A new packet from `sender` to `dst` (the VPC or the cloud mix's op).
fn fresh(
    cloud: bool,
    remote: bool,
    sender: &Index,
    dst: &Dests,
    n: usize,
    l4: L4Gen,
    shape: &Shape,
) -> Op {
    let sender = *sender;
    let shape = shape.clone();
    if cloud {
        Op::CFresh {
            remote,
            wide: false,
            sender,
            dst: dst.cloud[n % dst.cloud.len()].clone(),
            l4,
            shape,
        }
    } else {
        Op::Fresh {
            remote,
            wide: false,
            sender,
            dst: dst.vpc[n % dst.vpc.len()].clone(),
            l4,
            shape,
        }
    }
}

/// The other end answers the latest packet (`back`), or its sender sends again.
fn turn(cloud: bool, back: bool, k: usize, flags: u8, shape: &Shape) -> Op {
    let k = super::ops::Pick::Recent(k);
    let flags = FlagSel::Raw(flags);
    let shape = shape.clone();
    match (cloud, back) {
        (false, true) => Op::Reply { k, flags, shape },
        (false, false) => Op::Again { k, flags, shape },
        (true, true) => Op::CReply { k, flags, shape },
        (true, false) => Op::CAgain { k, flags, shape },
    }
}

/// Destinations of a unit, for either mix.
#[derive(Debug, Clone)]
struct Dests {
    vpc: Vec<Dst>,
    cloud: Vec<CDst>,
}

fn dests() -> impl Strategy<Value = Dests> {
    let vpc = prop_oneof![
        4 => any::<Index>().prop_map(Dst::SameVpc),
        4 => any::<Index>().prop_map(Dst::LocalSameVpc),
        1 => any::<Index>().prop_map(Dst::AnyInstance),
        1 => any::<Index>().prop_map(Dst::Outside),
    ];
    (
        prop::collection::vec(vpc, 1..=2),
        prop::collection::vec(cdst(), 1..=2),
    )
        .prop_map(|(vpc, cloud)| Dests { vpc, cloud })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flood {
    Syn,
    Handshake,
    Udp,
    UdpAnswered,
    Echo,
    EchoAnswered,
}

/// The `i`th connection of a flood: its first packet, and the answers its kind has.
fn flood_connection(
    cloud: bool,
    (remote, sender): (bool, &Index),
    dst: &Dests,
    i: usize,
    kind: Flood,
    shape: &Shape,
) -> Vec<Step> {
    let (proto, flags) = match kind {
        Flood::Syn | Flood::Handshake => (6, 0x02),
        Flood::Udp | Flood::UdpAnswered => (17, 0),
        Flood::Echo | Flood::EchoAnswered => (1, 0),
    };
    let l4 = L4Gen::Ports {
        proto,
        sport: 20_000 + i as u16,
        dport: if proto == 17 { 53 } else { 80 },
        flags,
    };
    let op = fresh(cloud, remote, sender, dst, i, l4, shape);
    let mut v = vec![Step {
        dt: (i % 3) as u64,
        op,
    }];
    let answer = |k, flags, back| Step {
        dt: 1,
        op: turn(cloud, back, k, flags, shape),
    };
    match kind {
        Flood::Handshake => v.extend([answer(0, 0x12, true), answer(1, 0x10, false)]),
        Flood::UdpAnswered | Flood::EchoAnswered if i.is_multiple_of(2) => {
            v.push(answer(0, 0, true))
        }
        _ => {}
    }
    v
}

/// Many distinct connections in a row, from one to three senders to one or two destinations,
/// some answered (assured: protected from eviction), then one from any instance (often an
/// idle one, opening late).
pub(super) fn flood(cloud: bool) -> impl Strategy<Value = Vec<Step>> {
    let kind = prop::sample::select(vec![
        Flood::Syn,
        Flood::Handshake,
        Flood::Handshake,
        Flood::Udp,
        Flood::UdpAnswered,
        Flood::Echo,
        Flood::EchoAnswered,
    ]);
    (
        (any::<bool>(), prop::collection::vec(any::<Index>(), 1..=3)),
        (dests(), 3usize..=24, kind, shape()),
        (any::<Index>(), any::<bool>()),
        prop::sample::select(vec![0u64, 1000, 30_001, 60_001, 120_001]),
    )
        .prop_map(
            move |((remote, senders), (dst, n, kind, shape), (late, late_remote), late_dt)| {
                let shape = clean(shape);
                let mut v = Vec::new();
                for i in 0..n {
                    let sender = &senders[i % senders.len()];
                    v.extend(flood_connection(
                        cloud,
                        (remote, sender),
                        &dst,
                        i,
                        kind,
                        &shape,
                    ));
                }
                let l4 = L4Gen::Ports {
                    proto: 6,
                    sport: 31_000,
                    dport: 22,
                    flags: 0x02,
                };
                let op = fresh(cloud, late_remote, &late, &dst, 0, l4, &shape);
                v.push(Step { dt: late_dt, op });
                v
            },
        )
}

const S: u8 = 0x02;
const SA: u8 = 0x12;
const A: u8 = 0x10;
const PA: u8 = 0x18;
const FA: u8 = 0x11;
const R: u8 = 0x04;
const RA: u8 = 0x14;
const U: u8 = 0x20;
const E: u8 = 0x40;
const C: u8 = 0x80;
/// From the opener (`O`) or from the other end (`X`).
const O: bool = true;
const X: bool = false;

/// TCP scripts: who sends which flags, in order (the first is the opener's fresh packet).
const SCRIPTS: &[&[(bool, u8)]] = &[
    // simultaneous open
    &[
        (O, S),
        (X, S),
        (O, SA),
        (X, SA),
        (X, A),
        (O, A),
        (O, PA),
        (X, FA),
        (O, FA),
        (X, A),
    ],
    &[(O, S), (X, S), (X, SA), (O, A), (X, A), (O, PA), (X, PA)],
    // a SYN answered by RST, then data, then a new SYN
    &[(O, S), (X, RA), (O, A), (O, PA), (O, S), (X, SA), (O, A)],
    &[(O, S), (X, R), (O, S), (X, SA), (O, A), (X, PA)],
    // SYN and SYN/ACK retransmits
    &[
        (O, S),
        (O, S),
        (X, SA),
        (X, SA),
        (O, A),
        (X, SA),
        (O, S),
        (X, PA),
    ],
    // FIN/ACK in every order, data after TIME_WAIT, reopen by SYN
    &[
        (O, S),
        (X, SA),
        (O, A),
        (O, FA),
        (X, A),
        (X, FA),
        (O, A),
        (O, A),
        (O, PA),
        (O, S),
        (X, SA),
        (O, A),
    ],
    &[
        (O, S),
        (X, SA),
        (O, A),
        (X, FA),
        (O, FA),
        (X, A),
        (O, A),
        (X, S),
        (O, SA),
        (X, A),
    ],
    &[
        (O, S),
        (X, SA),
        (O, A),
        (O, FA),
        (X, FA),
        (O, A),
        (X, A),
        (O, S),
        (X, SA),
    ],
    &[
        (O, S),
        (X, SA),
        (O, FA),
        (X, FA),
        (X, A),
        (O, A),
        (O, FA),
        (X, S),
    ],
    &[
        (O, S),
        (X, SA),
        (O, A),
        (X, FA),
        (X, A),
        (O, A),
        (O, FA),
        (X, A),
        (O, PA),
    ],
    // pickups, each direction, and a RST before any reply
    &[(O, A), (X, A), (O, PA), (X, FA), (O, FA), (X, A)],
    &[(O, PA | U), (X, PA), (O, R), (O, A)],
    &[(O, A), (O, A), (X, R), (O, A), (X, A)],
    &[(O, A), (O, R), (O, A), (X, A), (X, SA)],
    // RST in ESTABLISHED, then SYNs from either end
    &[
        (O, S),
        (X, SA),
        (O, A),
        (X, A),
        (O, RA),
        (O, S),
        (X, SA),
        (O, A),
    ],
    &[
        (O, S),
        (X, SA),
        (O, A),
        (X, A),
        (X, R),
        (O, S),
        (X, S),
        (O, A),
    ],
    // ECE, CWR, URG, PSH, and invalid combinations
    &[
        (O, S | E | C),
        (X, SA | E),
        (O, A | C),
        (O, S | U),
        (O, S | 0x01),
        (X, 0x00),
        (O, FA | U),
        (X, 0x29),
    ],
    &[
        (O, S | 0x08),
        (X, SA | 0x08),
        (X, SA | U),
        (O, A | 0x08),
        (O, R | A | U),
        (X, FA | 0x08),
    ],
];

/// A TCP script between a fresh sender and its destination, with its own times (timeouts'
/// edges included) and sometimes one step's flags replaced.
pub(super) fn tcp_script(cloud: bool) -> impl Strategy<Value = Vec<Step>> {
    let dt = prop_oneof![
        6 => Just(0u64),
        4 => 1u64..1000,
        1 => prop::sample::select(vec![
            10_000u64, 10_001, 30_000, 60_001, 120_000, 120_001, 300_000, 300_001,
        ]),
    ];
    (
        (0..SCRIPTS.len(), any::<bool>(), any::<Index>(), dests()),
        (any::<Index>(), any::<Index>()),
        prop::collection::vec(dt, 12),
        shape(),
        prop::option::weighted(
            0.2,
            (
                1usize..12,
                prop::sample::select(vec![A, FA, R, S, SA, 0x01]),
            ),
        ),
    )
        .prop_map(
            move |((n, remote, sender, dst), (sport, dport), dts, shape, swap)| {
                let shape = clean(shape);
                let script = SCRIPTS[n];
                let l4 = L4Gen::Tcp {
                    sport,
                    dport,
                    flags: script[0].1,
                };
                let mut v = vec![Step {
                    dt: dts[0],
                    op: fresh(cloud, remote, &sender, &dst, 0, l4, &shape),
                }];
                let mut last = O;
                for (i, &(from, flags)) in script.iter().enumerate().skip(1) {
                    let flags = match swap {
                        Some((j, f)) if j == i => f,
                        _ => flags,
                    };
                    let op = turn(cloud, from != last, 0, flags, &shape);
                    last = from;
                    v.push(Step {
                        dt: dts[i % dts.len()],
                        op,
                    });
                }
                v
            },
        )
}
