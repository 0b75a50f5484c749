//! A connection-table flood evicts without allocating: the table counts its owners in a heap
//! and links their entries in lists (docs/semantics.md 2.7, "Limits"), so that a SYN flood,
//! exactly when eviction runs, costs no memory management. Measured with dhat's counting
//! allocator around the flood.

use std::net::Ipv4Addr;

use vpcd_core::Timestamp;
use vpcd_core::policy::conntrack::{ConnKey, Conntrack, Endpoint, Open, Zone};
use vpcd_core::wire::ipv4::{L4, TcpFlags, proto};

#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

fn end(host: u8, port: u16) -> Endpoint {
    Endpoint {
        zone: Zone(7),
        addr: Ipv4Addr::new(10, 0, 0, host),
        port,
    }
}

fn syn(ct: &mut Conntrack, src: Endpoint, dst: Endpoint, at: u64) -> bool {
    let l4 = L4::Tcp {
        sport: src.port,
        dport: dst.port,
        flags: TcpFlags(TcpFlags::SYN),
    };
    let key = ConnKey::of(dst.owner(), proto::TCP, &l4, src, dst).unwrap();
    ct.open(key, src, src.owner(), Open::New, Timestamp::from_secs(at))
        .is_ok()
}

#[test]
fn a_syn_flood_against_a_full_table_allocates_nothing() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let mut ct = Conntrack::new(4096, 1024, 1);
    let server = end(1, 80);
    // The table fills: 4 owners of 1,024 entries each.
    for owner in 2..6u8 {
        for p in 0..1024 {
            assert!(syn(&mut ct, end(owner, p), server, 0));
        }
    }
    assert_eq!(ct.len(), 4096);
    // A fifth owner floods: it takes from the heaviest until it is one, then evicts its own.
    for p in 0..2048 {
        syn(&mut ct, end(9, p), server, 1);
    }
    let before = dhat::HeapStats::get().total_blocks;
    let evicted = ct.stats().evicted;
    for p in 2048..60_000u16 {
        syn(&mut ct, end(9, p), server, 2);
    }
    let allocations = dhat::HeapStats::get().total_blocks - before;
    let evictions = ct.stats().evicted - evicted;
    assert!(evictions >= 57_000, "{evictions} evictions");
    assert_eq!(
        allocations, 0,
        "{allocations} allocations for {evictions} evictions"
    );
    assert_eq!(ct.len(), 4096);
}
