use super::*;
use crate::wire::ipv4::TcpFlags;

const Z: Zone = Zone(1001);

fn end(host: u8, port: u16) -> Endpoint {
    Endpoint {
        zone: Z,
        addr: Ipv4Addr::new(10, 0, 1, host),
        port,
    }
}

const A: Endpoint = Endpoint {
    zone: Z,
    addr: Ipv4Addr::new(10, 0, 1, 10),
    port: 40000,
};
const B: Endpoint = Endpoint {
    zone: Z,
    addr: Ipv4Addr::new(10, 0, 2, 20),
    port: 80,
};

fn tcp(flags: u8) -> L4 {
    L4::Tcp {
        sport: 0,
        dport: 0,
        flags: TcpFlags(flags),
    }
}

const UDP: L4 = L4::Udp { sport: 0, dport: 0 };

fn icmp(kind: u8) -> L4 {
    L4::Icmp {
        kind,
        code: 0,
        ident: 7,
    }
}

fn t(s: u64) -> Timestamp {
    Timestamp::from_secs(s)
}

fn key(protocol: u8, l4: &L4, src: Endpoint, dst: Endpoint) -> ConnKey {
    ConnKey::of(A.owner(), protocol, l4, src, dst).unwrap()
}

/// Opens `src -> dst` on A's port, owned by the source.
fn open(
    ct: &mut Conntrack,
    protocol: u8,
    l4: &L4,
    src: Endpoint,
    dst: Endpoint,
    at: u64,
) -> Result<ConnRef, DropReason> {
    ct.open(
        key(protocol, l4, src, dst),
        src,
        src.owner(),
        Open::New,
        t(at),
    )
}

fn tcp_state(ct: &Conntrack, r: ConnRef) -> TcpState {
    match ct.get(r).unwrap().state {
        State::Tcp(t) => t.state,
        _ => unreachable!(),
    }
}

/// Walks a TCP connection A->B through its handshake (assured, protected).
fn establish(ct: &mut Conntrack, a: Endpoint, b: Endpoint, at: u64) -> ConnRef {
    let r = open(ct, proto::TCP, &tcp(0x02), a, b, at).unwrap();
    assert_eq!(
        ct.track(r, &b, &tcp(0x12), t(at)),
        Track::Accepted(Direction::Reply)
    );
    assert_eq!(
        ct.track(r, &a, &tcp(0x10), t(at)),
        Track::Accepted(Direction::Original)
    );
    assert!(ct.get(r).unwrap().state.protected());
    r
}

#[test]
fn key_is_the_same_from_both_directions_zoned_and_per_port() {
    assert_eq!(key(6, &UDP, A, B), key(6, &UDP, B, A));
    let other_tenant = Endpoint {
        zone: Zone(2002),
        ..A
    };
    assert_ne!(key(6, &UDP, A, B), key(6, &UDP, other_tenant, B));
    let other_port = ConnKey::of(B.owner(), 6, &UDP, A, B).unwrap();
    assert_ne!(
        key(6, &UDP, A, B),
        other_port,
        "two instances never share an entry"
    );
}

#[test]
fn icmp_queries_match_only_their_reply_from_the_responder() {
    let mut ct = Conntrack::new(100, 100, 7);
    let echo = key(proto::ICMP, &icmp(8), A, B);
    let r = open(&mut ct, proto::ICMP, &icmp(8), A, B, 0).unwrap();
    // The echo reply from B finds it; B's own echo request, or a timestamp reply, does not.
    assert_eq!(key(proto::ICMP, &icmp(0), B, A), echo);
    assert_ne!(key(proto::ICMP, &icmp(8), B, A), echo);
    assert_ne!(key(proto::ICMP, &icmp(14), B, A), echo);
    assert_ne!(
        key(proto::ICMP, &icmp(0), A, B),
        echo,
        "a reply from the requester"
    );
    for (q, reply) in [(13, 14), (15, 16), (17, 18)] {
        let k = key(proto::ICMP, &icmp(q), A, B);
        assert_eq!(key(proto::ICMP, &icmp(reply), B, A), k);
        assert_ne!(k, echo);
    }
    // Errors and other types have no entry.
    for kind in [3, 4, 5, 9, 10, 11, 12, 19, 42, 255] {
        assert!(
            ConnKey::of(A.owner(), proto::ICMP, &icmp(kind), A, B).is_none(),
            "{kind}"
        );
    }
    assert_eq!(
        ct.track(r, &B, &icmp(0), t(1)),
        Track::Accepted(Direction::Reply)
    );
    assert!(ct.get(r).unwrap().state.protected());
    // An identifier of 8 does not blur the ends: B's request with id 8 after A's.
    let id8 = |kind| L4::Icmp {
        kind,
        code: 0,
        ident: 8,
    };
    let a8 = Endpoint { port: 8, ..A };
    let b8 = Endpoint { port: 8, ..B };
    assert_ne!(
        key(proto::ICMP, &id8(8), a8, b8),
        key(proto::ICMP, &id8(8), b8, a8)
    );
}

#[test]
fn rst_closes_and_close_times_out_in_10s() {
    let mut ct = Conntrack::new(100, 100, 7);
    let r = establish(&mut ct, A, B, 0);
    ct.track(r, &B, &tcp(0x14), t(1));
    assert_eq!(tcp_state(&ct, r), TcpState::Close);
    let k = key(6, &UDP, A, B);
    assert!(ct.lookup(&k, t(11)).is_some());
    assert!(ct.lookup(&k, t(12)).is_none());
}

#[test]
fn a_syn_answered_by_rst_ends_at_once_and_later_data_finds_no_entry() {
    let mut ct = Conntrack::new(100, 100, 7);
    let r = open(&mut ct, proto::TCP, &tcp(0x02), A, B, 0).unwrap();
    assert_eq!(ct.track(r, &B, &tcp(0x14), t(0)), Track::Ended);
    assert!(ct.is_empty());
    assert_eq!(ct.track(r, &A, &tcp(0x18), t(0)), Track::Gone);
}

#[test]
fn invalid_flags_are_refused_in_every_state() {
    let mut ct = Conntrack::new(100, 100, 7);
    let r = open(&mut ct, proto::TCP, &tcp(0x02), A, B, 0).unwrap();
    for bad in [0x03, 0x06, 0x01, 0x00, 0x08] {
        assert_eq!(
            ct.track(r, &A, &tcp(bad), t(0)),
            Track::Invalid(DropReason::TcpInvalid)
        );
    }
    let r = establish(&mut ct, end(9, 1), B, 0);
    assert_eq!(
        ct.track(r, &B, &tcp(0x03), t(0)),
        Track::Invalid(DropReason::TcpInvalid)
    );
}

#[test]
fn udp_timeouts_30s_then_120s_once_replied() {
    let mut ct = Conntrack::new(100, 100, 7);
    let k = key(proto::UDP, &UDP, A, B);
    let r = open(&mut ct, proto::UDP, &UDP, A, B, 0).unwrap();
    assert!(ct.lookup(&k, t(30)).is_some());
    assert!(ct.lookup(&k, t(31)).is_none());
    let r2 = open(&mut ct, proto::UDP, &UDP, A, B, 100).unwrap();
    assert_ne!(r, r2);
    assert_eq!(
        ct.track(r2, &B, &UDP, t(101)),
        Track::Accepted(Direction::Reply)
    );
    assert!(ct.get(r2).unwrap().state.protected());
    assert!(ct.lookup(&k, t(101 + 120)).is_some());
    assert!(ct.lookup(&k, t(101 + 121)).is_none());
}

#[test]
fn a_picked_up_connection_lives_300s_until_answered() {
    let mut ct = Conntrack::new(100, 100, 7);
    let k = key(6, &tcp(0x10), A, B);
    let r = ct
        .open(k, A, A.owner(), Open::Pickup { reply: false }, t(0))
        .unwrap();
    assert_eq!(tcp_state(&ct, r), TcpState::Established);
    assert!(!ct.get(r).unwrap().state.protected());
    assert!(ct.lookup(&k, t(300)).is_some());
    assert!(ct.lookup(&k, t(301)).is_none());
    // Picked up from the far end: opened by B; the next packet from B assures it.
    let r = ct
        .open(k, B, B.owner(), Open::Pickup { reply: true }, t(400))
        .unwrap();
    assert_eq!(
        ct.track(r, &B, &tcp(0x10), t(400)),
        Track::Accepted(Direction::Original)
    );
    assert!(ct.get(r).unwrap().state.protected());
    assert_eq!(ct.owned_by(&B.owner()), 1);
}

#[test]
fn closed_connections_do_not_lock_their_owner_out() {
    // 1,000 short, normally closed connections: the owner can still open more, TCP and UDP.
    let mut ct = Conntrack::new(100_000, 100, 7);
    for p in 0..1000u16 {
        let a = Endpoint { port: p, ..A };
        let r = establish(&mut ct, a, B, 1);
        for (src, f) in [(a, 0x11), (B, 0x10), (B, 0x11), (a, 0x10)] {
            assert!(matches!(
                ct.track(r, &src, &tcp(f), t(1)),
                Track::Accepted(_)
            ));
        }
        assert_eq!(tcp_state(&ct, r), TcpState::TimeWait);
    }
    assert_eq!(ct.owned_by(&A.owner()), 100);
    assert!(open(&mut ct, proto::UDP, &UDP, A, B, 2).is_ok());
    assert!(
        open(
            &mut ct,
            proto::TCP,
            &tcp(0x02),
            Endpoint { port: 9999, ..A },
            B,
            2
        )
        .is_ok()
    );
    assert_eq!(ct.stats().evicted, 902);
}

#[test]
fn an_owner_with_only_protected_entries_is_refused_at_its_share() {
    let mut ct = Conntrack::new(1000, 1, 7);
    let r = open(&mut ct, proto::UDP, &UDP, A, B, 0).unwrap();
    ct.track(r, &B, &UDP, t(0));
    let other = Endpoint { port: 9, ..A };
    assert_eq!(
        open(&mut ct, proto::UDP, &UDP, other, B, 0),
        Err(DropReason::ConntrackInstanceLimit)
    );
    assert_eq!(ct.stats().refused_instance, 1);
}

#[test]
fn a_connection_counts_against_its_opener_only() {
    // Two instances open connections to a third: the third's share stays whole.
    let mut ct = Conntrack::new(1000, 10, 7);
    let (x, y, victim) = (end(1, 1), end(2, 1), end(3, 80));
    for p in 0..50 {
        let _ = open(
            &mut ct,
            proto::TCP,
            &tcp(0x02),
            Endpoint { port: p, ..x },
            victim,
            0,
        );
        let _ = open(
            &mut ct,
            proto::TCP,
            &tcp(0x02),
            Endpoint { port: p, ..y },
            victim,
            0,
        );
    }
    assert_eq!(ct.owned_by(&victim.owner()), 0);
    assert!(open(&mut ct, proto::ICMP, &icmp(8), victim, x, 0).is_ok());
}

#[test]
fn a_full_table_evicts_the_heaviest_owner_first() {
    let mut ct = Conntrack::new(20, 15, 7);
    let (x, y, idle) = (end(1, 1), end(2, 1), end(3, 1));
    // x and y fill the table, each under its share, with established connections.
    for p in 0..12 {
        establish(&mut ct, Endpoint { port: p, ..x }, B, 0);
    }
    for p in 0..8 {
        establish(&mut ct, Endpoint { port: p, ..y }, B, 0);
    }
    assert_eq!(ct.len(), 20);
    // The idle instance can open: x, the heaviest, gives up its oldest.
    assert!(open(&mut ct, proto::UDP, &UDP, idle, B, 1).is_ok());
    assert_eq!((ct.owned_by(&x.owner()), ct.owned_by(&y.owner())), (11, 8));
    // x itself cannot evict y's entries: x may only give up its own unprotected ones.
    assert_eq!(
        open(&mut ct, proto::UDP, &UDP, Endpoint { port: 99, ..x }, B, 1),
        Err(DropReason::ConntrackFull)
    );
    assert_eq!(ct.stats().refused_full, 1);
    // y, lighter than x, takes from x until it is the heavier, then gives up its own.
    for p in 10..13 {
        assert!(open(&mut ct, proto::UDP, &UDP, Endpoint { port: p, ..y }, B, 1).is_ok());
    }
    assert_eq!((ct.owned_by(&x.owner()), ct.owned_by(&y.owner())), (9, 10));
    assert_eq!(ct.stats().evicted, 1 + 2 + 1);
}

#[test]
fn a_flooding_owner_evicts_only_its_own_unprotected_entries() {
    let mut ct = Conntrack::new(1000, 10, 7);
    let victim = end(7, 1);
    let victim_conn = open(&mut ct, proto::TCP, &tcp(0x02), victim, B, 0).unwrap();
    for p in 0..500 {
        let _ = open(
            &mut ct,
            proto::TCP,
            &tcp(0x02),
            Endpoint { port: p, ..A },
            B,
            1,
        );
    }
    assert_eq!(ct.owned_by(&A.owner()), 10);
    assert!(ct.get(victim_conn).is_some());
    assert_eq!(ct.stats().evicted, 490);
    // The same flood against a full table: it evicts its own, never the victim's.
    let mut ct = Conntrack::new(16, 100, 7);
    let victim_conn = open(&mut ct, proto::TCP, &tcp(0x02), victim, B, 0).unwrap();
    for p in 0..500 {
        let _ = open(
            &mut ct,
            proto::TCP,
            &tcp(0x02),
            Endpoint { port: p, ..A },
            B,
            1,
        );
    }
    assert!(ct.get(victim_conn).is_some());
    assert_eq!(ct.owned_by(&A.owner()), 15);
}

#[test]
fn lowered_limits_apply_to_new_connections() {
    let mut ct = Conntrack::new(100, 100, 7);
    for p in 0..5 {
        open(&mut ct, proto::UDP, &UDP, Endpoint { port: p, ..A }, B, 0).unwrap();
    }
    ct.set_limits(100, 3);
    assert_eq!(ct.limits(), (100, 3));
    open(&mut ct, proto::UDP, &UDP, Endpoint { port: 9, ..A }, B, 0).unwrap();
    assert_eq!(
        ct.owned_by(&A.owner()),
        5,
        "one evicted to make room for one"
    );
}

#[test]
fn sweep_expires_and_accounting_follows() {
    let mut ct = Conntrack::new(100, 100, 7);
    open(&mut ct, proto::UDP, &UDP, A, B, 0).unwrap();
    open(&mut ct, proto::ICMP, &icmp(8), A, B, 20).unwrap();
    assert_eq!(ct.sweep(t(40)), 1);
    assert_eq!(ct.owned_by(&A.owner()), 1);
    assert_eq!(ct.sweep(t(60)), 1);
    assert_eq!(ct.owned_by(&A.owner()), 0);
    assert!(ct.is_empty());
}

#[test]
fn syn_after_time_wait_reopens() {
    let mut ct = Conntrack::new(100, 100, 7);
    let r = establish(&mut ct, A, B, 0);
    for (src, f) in [(A, 0x11), (B, 0x11), (A, 0x10)] {
        ct.track(r, &src, &tcp(f), t(0));
    }
    assert_eq!(ct.track(r, &A, &tcp(0x02), t(1)), Track::Reopen);
    assert!(ct.get(r).is_none());
    assert!(ct.is_empty());
}

/// `account` counts packets and bytes by direction on a live entry; a handle to an entry
/// that went (and whose slot was reused) counts nothing; the times left and the age follow
/// the clock.
#[test]
fn entries_count_packets_and_bytes_each_way() {
    let mut ct = Conntrack::new(16, 16, 0);
    let r = open(&mut ct, proto::UDP, &UDP, A, B, 0).unwrap();
    ct.account(r, Direction::Original, 100);
    ct.account(r, Direction::Original, 60);
    ct.account(r, Direction::Reply, 1500);
    let c = ct.get(r).unwrap();
    assert_eq!((c.packets, c.bytes), ([2, 1], [160, 1500]));
    assert_eq!((c.opener, c.peer()), (A, B));
    assert_eq!(c.age_ms(t(10)), 10_000);
    assert_eq!(c.left_ms(t(10)), (UDP_TIMEOUT - 10) * 1000);
    assert_eq!(c.left_ms(t(UDP_TIMEOUT + 5)), 0);
    assert_eq!(ct.iter_refs().map(|(x, _)| x).collect::<Vec<_>>(), [r]);
    assert_eq!(ct.remove_if(|_| true), 1);
    let again = open(&mut ct, proto::UDP, &UDP, A, B, 1).unwrap();
    ct.account(r, Direction::Original, 9);
    let c = ct.get(again).unwrap();
    assert_eq!(
        (c.packets, c.bytes),
        ([0, 0], [0, 0]),
        "a stale handle counts nothing"
    );
}
