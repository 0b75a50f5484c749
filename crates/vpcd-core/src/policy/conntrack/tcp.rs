//! TCP connection tracking: nf_conntrack's state table (`tcp_conntracks` in
//! `net/netfilter/nf_conntrack_proto_tcp.c`), with the rules the kernel applies around it,
//! without sequence-window tracking (docs/semantics.md, 2.7).

use super::Direction;
use crate::wire::ipv4::TcpFlags;

/// TCP states, as nf_conntrack names them (NONE is "no entry").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    /// A SYN seen.
    SynSent,
    /// A SYN/ACK seen.
    SynRecv,
    /// An ACK after the SYN/ACK (or a picked-up connection).
    Established,
    /// A FIN seen.
    FinWait,
    /// An ACK after the FIN.
    CloseWait,
    /// FINs seen both ways.
    LastAck,
    /// The last ACK seen.
    TimeWait,
    /// Reset.
    Close,
    /// A SYN from the reply direction in SYN_SENT: simultaneous open.
    SynSent2,
}

impl TcpState {
    /// nf_conntrack's default timeout for the state, in seconds.
    pub const fn timeout_secs(self) -> u64 {
        match self {
            TcpState::SynSent | TcpState::SynSent2 => 120,
            TcpState::SynRecv => 60,
            TcpState::Established => 432_000,
            TcpState::FinWait => 120,
            TcpState::CloseWait => 60,
            TcpState::LastAck => 30,
            TcpState::TimeWait => 120,
            TcpState::Close => 10,
        }
    }

    /// The state's name, as `conntrack -L` prints it.
    pub const fn name(self) -> &'static str {
        match self {
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::SynSent2 => "SYN_SENT2",
        }
    }

    const fn column(self) -> usize {
        self as usize
    }
}

/// The timeout of a picked-up connection that has seen no reply (nf_conntrack's
/// TCP_CONNTRACK_UNACK), seconds.
pub const UNACKNOWLEDGED_TIMEOUT: u64 = 300;

/// nf_conntrack's valid flag combinations (`tcp_valid_flags`), with PSH, ECE and CWR set
/// aside: SYN, SYN+URG, SYN+ACK, RST, RST+ACK, FIN+ACK, FIN+ACK+URG, ACK, ACK+URG.
/// Anything else (SYN+FIN, SYN+RST, a FIN without ACK, no flag at all, ...) is invalid in
/// every state.
pub fn valid_flags(flags: TcpFlags) -> bool {
    const URG: u8 = 0x20;
    let f = flags.0 & (TcpFlags::FIN | TcpFlags::SYN | TcpFlags::RST | TcpFlags::ACK | URG);
    matches!(
        f,
        0x02 | 0x22 | 0x12 | 0x04 | 0x14 | 0x11 | 0x31 | 0x10 | 0x30
    )
}

/// The row of the table a packet uses (`get_conntrack_index`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// SYN without ACK.
    Syn,
    /// SYN with ACK.
    SynAck,
    /// FIN.
    Fin,
    /// ACK (without SYN, FIN or RST).
    Ack,
    /// RST.
    Rst,
    /// No flag the table knows.
    None,
}

impl Class {
    /// The class of a packet's flags: RST first, then SYN(+ACK), FIN, ACK.
    pub fn of(flags: TcpFlags) -> Class {
        if flags.has(TcpFlags::RST) {
            Class::Rst
        } else if flags.has(TcpFlags::SYN) {
            if flags.has(TcpFlags::ACK) {
                Class::SynAck
            } else {
                Class::Syn
            }
        } else if flags.has(TcpFlags::FIN) {
            Class::Fin
        } else if flags.has(TcpFlags::ACK) {
            Class::Ack
        } else {
            Class::None
        }
    }
}

/// A cell of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell {
    To(TcpState),
    /// sIG: the packet passes and changes nothing.
    Ignore,
    /// sIV.
    Invalid,
}

use Cell::{Ignore as IG, Invalid as IV};
use TcpState::*;

const SS: Cell = Cell::To(SynSent);
const SR: Cell = Cell::To(SynRecv);
const ES: Cell = Cell::To(Established);
const FW: Cell = Cell::To(FinWait);
const CW: Cell = Cell::To(CloseWait);
const LA: Cell = Cell::To(LastAck);
const TW: Cell = Cell::To(TimeWait);
const CL: Cell = Cell::To(Close);
const S2: Cell = Cell::To(SynSent2);

/// `tcp_conntracks[dir][class][state]`, the NONE column left out (an entry always has a
/// state; what may open one is [`opens`]'s). Columns: sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL,
/// sS2.
const TABLE: [[[Cell; 9]; 6]; 2] = [
    // ORIGINAL
    [
        /* syn    */ [SS, IG, IG, IG, IG, IG, SS, SS, S2],
        /* synack */ [IV, SR, IV, IV, IV, IV, IV, IV, SR],
        /* fin    */ [IV, FW, FW, LA, LA, LA, TW, CL, IV],
        /* ack    */ [IV, ES, ES, CW, CW, TW, TW, CL, IV],
        /* rst    */ [CL, CL, CL, CL, CL, CL, CL, CL, CL],
        /* none   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV],
    ],
    // REPLY
    [
        /* syn    */ [S2, IV, IV, IV, IV, IV, SS, IV, S2],
        /* synack */ [SR, IG, IG, IG, IG, IG, IG, IG, SR],
        /* fin    */ [IV, FW, FW, LA, LA, LA, TW, CL, IV],
        /* ack    */ [IG, SR, ES, CW, CW, TW, TW, CL, IG],
        /* rst    */ [CL, CL, CL, CL, CL, CL, CL, CL, CL],
        /* none   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV],
    ],
];

/// What a packet without an entry does (the NONE column): a SYN opens in SYN_SENT, an ACK is
/// picked up in ESTABLISHED (loose pickup), anything else opens nothing.
pub fn opens(flags: TcpFlags) -> Option<TcpState> {
    match Class::of(flags) {
        Class::Syn => Some(SynSent),
        Class::Ack => Some(Established),
        _ => None,
    }
}

/// One connection's TCP tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tcp {
    /// The state.
    pub state: TcpState,
    /// A packet from the reply direction has been seen (IPS_SEEN_REPLY).
    pub seen_reply: bool,
    /// IPS_ASSURED.
    pub assured: bool,
    /// A FIN was seen (IP_CT_TCP_FLAG_CLOSE_INIT).
    fin_seen: bool,
    /// The connection went through SYN_SENT2.
    simultaneous: bool,
    /// The last packet accepted (changing the state or ignored): its direction and class.
    last: Option<(Direction, Class)>,
    /// A client SYN was ignored in LAST_ACK: the server's next ACK may be the RFC 5961
    /// challenge ACK answering it, not the last ACK (IP_CT_EXP_CHALLENGE_ACK).
    challenge: bool,
}

/// What a packet does to a tracked TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Accepted; the entry's time is refreshed and it lives `timeout` seconds more.
    Update {
        /// Seconds until the entry expires.
        timeout: u64,
    },
    /// Accepted; the entry's time is not refreshed (an ignored packet, a retransmitted SYN).
    Unrefreshed,
    /// Accepted, and the entry ends now (a RST before any reply).
    End,
    /// A SYN that reopens a closed connection: the entry ends and the packet is new.
    Reopen,
    /// Invalid in this state.
    Invalid,
}

impl Tcp {
    /// A connection opened by a packet in state `state` (SYN_SENT, or ESTABLISHED for a
    /// pickup), from `dir` (the reply direction for a pickup the other end opened).
    pub fn new(state: TcpState, dir: Direction) -> (Tcp, u64) {
        let t = Tcp {
            state,
            seen_reply: dir == Direction::Reply,
            assured: false,
            fin_seen: false,
            simultaneous: false,
            last: None,
            challenge: false,
        };
        let timeout = match state {
            Established => UNACKNOWLEDGED_TIMEOUT,
            s => s.timeout_secs(),
        };
        (t, timeout)
    }

    /// Protected from early eviction: assured and ESTABLISHED (closing states may be dropped
    /// early, `tcp_can_early_drop`).
    pub fn protected(&self) -> bool {
        self.assured && self.state == Established
    }

    /// Applies a packet with valid `flags` from `dir` (`nf_conntrack_tcp_packet`).
    pub fn step(&mut self, dir: Direction, flags: TcpFlags) -> Step {
        let class = Class::of(flags);
        let old = self.state;
        let mut new = match TABLE[dir as usize][class as usize][old.column()] {
            Cell::Invalid => return Step::Invalid,
            Cell::Ignore => return self.ignore(dir, class),
            Cell::To(s) => s,
        };
        if new == SynSent && matches!(old, TimeWait | Close) {
            // RFC 1122 4.2.2.13: a SYN may reopen a closed connection; the kernel does when
            // the connection was closing, or aborted from this very direction.
            if self.fin_seen || self.last == Some((dir, Class::Rst)) {
                return Step::Reopen;
            }
            return self.ignore(dir, class);
        }
        if new == TimeWait && old == LastAck && self.challenged(dir, class) {
            // RFC 5961: the answer to a SYN the table ignored is no last ACK.
            self.challenge = false;
            return Step::Unrefreshed;
        }
        if new == SynSent2 {
            self.simultaneous = true;
        }
        if new == SynRecv && dir == Direction::Reply && class == Class::Ack && self.simultaneous {
            new = Established;
        }
        self.state = new;
        self.last = Some((dir, class));
        if old != new && new == FinWait {
            self.fin_seen = true;
        }
        let step = self.refresh(old, new, class);
        if dir == Direction::Reply {
            self.seen_reply = true;
        }
        step
    }

    /// An ignored packet: accepted, the state unchanged; it is still the last packet, and a
    /// reply still counts as one (IPS_SEEN_REPLY is set for every accepted packet).
    fn ignore(&mut self, dir: Direction, class: Class) -> Step {
        self.challenge = class == Class::Syn && dir == Direction::Original && self.state == LastAck;
        self.last = Some((dir, class));
        self.seen_reply |= dir == Direction::Reply;
        Step::Unrefreshed
    }

    /// An ACK from the other end right after a client SYN ignored in LAST_ACK.
    fn challenged(&self, dir: Direction, class: Class) -> bool {
        self.challenge
            && class == Class::Ack
            && matches!(self.last, Some((d, Class::Syn)) if d != dir)
    }

    /// How a packet that moved the state from `old` to `new` refreshes the entry.
    fn refresh(&mut self, old: TcpState, new: TcpState, class: Class) -> Step {
        let timeout = if class == Class::Rst {
            Close.timeout_secs()
        } else {
            new.timeout_secs()
        };
        if self.seen_reply {
            if !self.assured && matches!(old, SynRecv | Established) && new == Established {
                self.assured = true;
            }
            return Step::Update { timeout };
        }
        if class == Class::Rst {
            // "If only reply is a RST, we can consider ourselves not to have an established
            // connection": the entry ends at once.
            Step::End
        } else if class == Class::Syn && old == SynSent {
            // A retransmitted SYN does not keep the entry alive.
            Step::Unrefreshed
        } else if new == Established {
            Step::Update {
                timeout: timeout.min(UNACKNOWLEDGED_TIMEOUT),
            }
        } else {
            Step::Update { timeout }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Direction::{Original as O, Reply as R};

    const SYN: u8 = 0x02;
    const SYNACK: u8 = 0x12;
    const ACK: u8 = 0x10;
    const FINACK: u8 = 0x11;
    const RST: u8 = 0x04;

    fn run(steps: &[(Direction, u8)]) -> (Tcp, Vec<Step>) {
        let (mut t, _) = Tcp::new(SynSent, O);
        let out = steps.iter().map(|&(d, f)| t.step(d, TcpFlags(f))).collect();
        (t, out)
    }

    #[test]
    fn the_valid_flags_are_the_kernels() {
        for ok in [
            0x02, 0x22, 0x12, 0x04, 0x14, 0x11, 0x31, 0x10, 0x30, 0x0a, 0x18, 0xd0,
        ] {
            assert!(valid_flags(TcpFlags(ok)), "{ok:#x}");
        }
        // SYN+FIN, SYN+RST, FIN alone, nothing, SYN+ACK+URG, RST+URG, FIN+RST+ACK.
        for bad in [0x03, 0x06, 0x01, 0x00, 0x08, 0x32, 0x24, 0x15] {
            assert!(!valid_flags(TcpFlags(bad)), "{bad:#x}");
        }
    }

    #[test]
    fn a_handshake_data_and_close_walk_the_table() {
        let (t, steps) = run(&[
            (R, SYNACK),
            (O, ACK),
            (R, ACK),
            (O, FINACK),
            (R, ACK),
            (R, FINACK),
            (O, ACK),
        ]);
        assert!(
            steps.iter().all(|s| matches!(s, Step::Update { .. })),
            "{steps:?}"
        );
        assert_eq!(t.state, TimeWait);
        assert!(t.assured);
        let (t, _) = run(&[(R, SYNACK), (O, ACK)]);
        assert_eq!(t.state, Established);
        assert!(t.protected(), "the ACK after the SYN/ACK assures");
    }

    #[test]
    fn a_simultaneous_open_passes_through_syn_sent2() {
        // A SYN each way, then SYN/ACKs: Linux moves to SYN_RECV and passes them.
        let (t, steps) = run(&[(R, SYN), (O, SYNACK)]);
        // The reply's SYN is the first reply: like a retransmitted SYN, it does not refresh.
        assert_eq!(steps, vec![Step::Unrefreshed, Step::Update { timeout: 60 }]);
        assert_eq!(t.state, SynRecv);
        let (t, _) = run(&[(R, SYN), (O, SYNACK), (R, ACK)]);
        assert_eq!(
            t.state, Established,
            "the reply's ACK establishes a simultaneous open"
        );
        let (t, _) = run(&[(R, SYN), (R, SYNACK)]);
        assert_eq!(t.state, SynRecv);
    }

    #[test]
    fn a_syn_answered_by_rst_ends_the_entry() {
        let (_, steps) = run(&[(R, RST)]);
        assert_eq!(steps, vec![Step::End]);
        let (_, steps) = run(&[(R, RST | ACK)]);
        assert_eq!(steps, vec![Step::End]);
        // After a reply, a RST moves to CLOSE (10 s) and the entry stays.
        let (t, steps) = run(&[(R, SYNACK), (O, RST)]);
        assert_eq!(steps[1], Step::Update { timeout: 10 });
        assert_eq!(t.state, Close);
    }

    #[test]
    fn retransmitted_syns_do_not_refresh_and_stray_packets_are_ignored() {
        let (_, steps) = run(&[(O, SYN)]);
        assert_eq!(steps, vec![Step::Unrefreshed]);
        // An ACK from the server before its SYN/ACK: ignored (challenge ACK).
        let (t, steps) = run(&[(R, ACK)]);
        assert_eq!((t.state, steps[0]), (SynSent, Step::Unrefreshed));
        // A SYN in ESTABLISHED passes unchanged; a SYN/ACK retransmit too.
        let (t, steps) = run(&[(R, SYNACK), (O, ACK), (O, SYN), (R, SYNACK)]);
        assert_eq!(
            (t.state, steps[2], steps[3]),
            (Established, Step::Unrefreshed, Step::Unrefreshed)
        );
        // The client cannot send a SYN/ACK or FIN before the server answered.
        assert_eq!(run(&[(O, SYNACK)]).1, vec![Step::Invalid]);
        assert_eq!(run(&[(O, FINACK)]).1, vec![Step::Invalid]);
        assert_eq!(run(&[(O, ACK)]).1, vec![Step::Invalid]);
    }

    #[test]
    fn syns_reopen_closed_connections_as_the_kernel_does() {
        let closed = [(R, SYNACK), (O, ACK), (O, FINACK), (R, FINACK), (O, ACK)];
        let (mut t, _) = run(&closed);
        assert_eq!(t.state, TimeWait);
        assert_eq!(t.step(O, TcpFlags(SYN)), Step::Reopen);
        let (mut t, _) = run(&closed);
        assert_eq!(
            t.step(R, TcpFlags(SYN)),
            Step::Reopen,
            "the server may switch roles"
        );
        // Reset by the client, then a SYN from the client: reopen.
        let (mut t, _) = run(&[(R, SYNACK), (O, ACK), (O, RST)]);
        assert_eq!(t.step(O, TcpFlags(SYN)), Step::Reopen);
        // Reset by the server, no FIN: the client's SYN is ignored; the server's is invalid.
        let (mut t, _) = run(&[(R, SYNACK), (O, ACK), (R, RST)]);
        assert_eq!(t.step(O, TcpFlags(SYN)), Step::Unrefreshed);
        assert_eq!(t.step(R, TcpFlags(SYN)), Step::Invalid);
        assert_eq!(t.state, Close);
    }

    #[test]
    fn a_challenge_ack_in_last_ack_is_no_last_ack() {
        // Found by tests/kernel_conntrack.rs against Linux: after both FINs, a client SYN is
        // ignored and the server's ACK answering it leaves LAST_ACK as it is.
        let closing = [(R, SYNACK), (O, ACK), (O, FINACK), (R, FINACK)];
        let (mut t, _) = run(&closing);
        assert_eq!(t.state, LastAck);
        assert_eq!(t.step(O, TcpFlags(SYN)), Step::Unrefreshed);
        assert_eq!(t.step(R, TcpFlags(ACK)), Step::Unrefreshed);
        assert_eq!(t.state, LastAck);
        // The client's own last ACK then ends it in TIME_WAIT.
        assert!(matches!(t.step(O, TcpFlags(ACK)), Step::Update { .. }));
        assert_eq!(t.state, TimeWait);
        // Without the ignored SYN, the server's ACK is the last ACK.
        let (mut t, _) = run(&closing);
        t.step(R, TcpFlags(ACK));
        assert_eq!(t.state, TimeWait);
    }

    #[test]
    fn a_picked_up_connection_is_unacknowledged_until_a_reply() {
        let (mut t, timeout) = Tcp::new(Established, O);
        assert_eq!(timeout, UNACKNOWLEDGED_TIMEOUT);
        assert_eq!(t.step(O, TcpFlags(ACK)), Step::Update { timeout: 300 });
        assert_eq!(t.step(R, TcpFlags(ACK)), Step::Update { timeout: 300 });
        assert!(!t.assured);
        assert_eq!(t.step(O, TcpFlags(ACK)), Step::Update { timeout: 432_000 });
        assert!(t.protected());
        // Picked up from the reply direction: the first packet counts as the reply.
        let (mut t, _) = Tcp::new(Established, R);
        assert_eq!(t.step(O, TcpFlags(ACK)), Step::Update { timeout: 432_000 });
        assert!(t.assured);
    }

    #[test]
    fn closing_states_are_not_protected() {
        let (t, _) = run(&[(R, SYNACK), (O, ACK), (O, FINACK)]);
        assert_eq!(t.state, FinWait);
        assert!(t.assured && !t.protected());
        assert_eq!(opens(TcpFlags(SYN)), Some(SynSent));
        assert_eq!(opens(TcpFlags(ACK | 0x08)), Some(Established));
        for f in [SYNACK, FINACK, RST, RST | ACK] {
            assert_eq!(opens(TcpFlags(f)), None, "{f:#x}");
        }
    }
}
