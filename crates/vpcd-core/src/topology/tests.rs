//! Validation tests, written as tables: a small valid topology ([`BASE`]), and for each case an
//! edit of it and the one error that edit must produce (line, column, item, message).

use std::net::Ipv4Addr;
use std::sync::Arc;

use super::*;
use crate::policy::route::NextHop;
use crate::policy::rules::{Action, Outcome, Peer, PortRange, Protocol, RuleOrigin, Subject};
use crate::wire::ipv4::proto;

const FILE: &str = "lab.toml";

/// The valid base topology. Line numbers the cases refer to are in the left margin of this
/// comment; appended snippets start at line `END + 1`.
///
/// ```text
///  1 [[host]] h1 192.0.2.1 r1        11 [[vpc]] va 10.0.0.0/16 key 100
///  6 [[host]] h2 192.0.2.2 r1        17 [[vpc]] vb 10.1.0.0/16 region r1
/// 23 [[subnet]] sa (va, rta, acla)   30 [[subnet]] sb (vb)
/// 35 [[route_table]] rta, route on 39
/// 42 [[acl]] acla, ingress rule on 46, egress on 48
/// 50 [[security_group]] sg-web, ingress rules on 53 and 54, egress on 56
/// 58 [[instance]] web-1 (h1, sa)     66 [[instance]] web-2 (h2, sb)
/// ```
const BASE: &str = r#"[[host]]
name = "h1"
address = "192.0.2.1"
region = "r1"

[[host]]
name = "h2"
address = "192.0.2.2"
region = "r1"

[[vpc]]
name = "va"
tenant = "alice"
cidr = "10.0.0.0/16"
key = 100

[[vpc]]
name = "vb"
tenant = "bob"
cidr = "10.1.0.0/16"
region = "r1"

[[subnet]]
name = "sa"
vpc = "va"
cidr = "10.0.1.0/24"
route_table = "rta"
acl = "acla"

[[subnet]]
name = "sb"
vpc = "vb"
cidr = "10.1.1.0/24"

[[route_table]]
name = "rta"
vpc = "va"
routes = [
  { destination = "0.0.0.0/0", next_hop = "instance:web-1" },
]

[[acl]]
name = "acla"
vpc = "va"
ingress = [
  { action = "accept", protocol = "tcp", port = 22, cidr = "10.0.0.0/8" },
]
egress = [{ action = "accept", protocol = "all", cidr = "0.0.0.0/0" }]

[[security_group]]
name = "sg-web"
ingress = [
  { action = "accept", protocol = "tcp", port = "80,443", source = "0.0.0.0/0" },
  { action = "accept", protocol = "icmp", source = "sg:sg-web" },
]
egress = [{ action = "accept", protocol = "all", destination = "0.0.0.0/0" }]

[[instance]]
name = "web-1"
host = "h1"
subnet = "sa"
ip = "10.0.1.10"
security_groups = ["sg-web"]
netns = "ns-web-1"

[[instance]]
name = "web-2"
host = "h2"
subnet = "sb"
ip = "10.1.1.10"
security_groups = ["sg-web"]
"#;

/// Lines in [`BASE`].
const END: usize = 71;

/// A third VPC, for appending (4 lines).
const VC: &str = r#"[[vpc]]
name = "vc"
tenant = "carol"
cidr = "10.2.0.0/16"
"#;

/// A change to [`BASE`].
enum Edit {
    /// Adds text at the end: its first line is `END + 1` (after earlier appends, later).
    Append(&'static str),
    /// Replaces the only occurrence of the first string with the second.
    Replace(&'static str, &'static str),
}
use Edit::{Append, Replace};

fn apply(edits: &[Edit]) -> String {
    let mut text = BASE.to_string();
    for e in edits {
        match e {
            Append(s) => text.push_str(s),
            Replace(old, new) => {
                assert_eq!(text.matches(old).count(), 1, "{old:?} must occur once");
                text = text.replacen(old, new, 1);
            }
        }
    }
    text
}

fn parse(text: &str) -> Result<Topology, Vec<TopologyError>> {
    Topology::parse(text, FILE).map_err(|e| match e {
        LoadError::Invalid(errors) => errors,
        LoadError::Io { .. } => unreachable!("parse does no I/O"),
    })
}

fn render(errors: &[TopologyError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}\n"))
        .collect::<String>()
}

#[track_caller]
fn valid(text: &str) -> Topology {
    match parse(text) {
        Ok(t) => t,
        Err(e) => panic!("expected a valid topology, got:\n{}", render(&e)),
    }
}

#[track_caller]
fn invalid(text: &str) -> Vec<TopologyError> {
    match parse(text) {
        Ok(_) => panic!("expected errors, the topology is valid:\n{text}"),
        Err(e) => {
            assert!(!e.is_empty(), "an invalid topology reports its errors");
            e
        }
    }
}

/// One case: the edits, then the single error they must produce.
struct Case {
    edits: &'static [Edit],
    line: usize,
    /// 0: not checked.
    column: usize,
    /// A fragment of the item; empty means the item must be empty (syntax errors).
    item: &'static str,
    /// A fragment of the message.
    message: &'static str,
}

const fn case(
    edits: &'static [Edit],
    (line, column): (usize, usize),
    item: &'static str,
    message: &'static str,
) -> Case {
    Case {
        edits,
        line,
        column,
        item,
        message,
    }
}

/// Runs every case and reports all that fail at once.
#[track_caller]
fn check(cases: &[Case]) {
    let mut failures = String::new();
    for (n, c) in cases.iter().enumerate() {
        let want = format!("{}:{} {:?} {:?}", c.line, c.column, c.item, c.message);
        let errors = match parse(&apply(c.edits)) {
            Ok(_) => {
                failures.push_str(&format!("case {n} ({want}): the topology is valid\n"));
                continue;
            }
            Err(e) => e,
        };
        let matches = |e: &TopologyError| {
            e.file == FILE
                && e.line == c.line
                && (c.column == 0 || e.column == c.column)
                && if c.item.is_empty() {
                    e.item.is_empty()
                } else {
                    e.item.contains(c.item)
                }
                && e.message.contains(c.message)
        };
        if errors.len() != 1 || !matches(&errors[0]) {
            failures.push_str(&format!("case {n} ({want}) got:\n{}", render(&errors)));
        }
    }
    assert!(failures.is_empty(), "\n{failures}");
}

#[test]
fn base_is_valid_and_has_the_documented_length() {
    assert_eq!(BASE.lines().count(), END);
    assert!(BASE.ends_with('\n'));
    let t = valid(BASE);
    assert_eq!(t.file, FILE);
    assert_eq!((t.hosts.len(), t.vpcs.len(), t.subnets.len()), (2, 2, 2));
    // One written table plus one implicit default table per VPC.
    assert_eq!(t.route_tables.len(), 3);
    assert_eq!((t.acls.len(), t.security_groups.len()), (1, 1));
    assert_eq!(
        (t.instances.len(), t.peerings.len(), t.expects.len()),
        (2, 0, 0)
    );
}

#[test]
fn empty_file_is_an_empty_topology() {
    let t = valid("");
    assert!(t.hosts.is_empty() && t.vpcs.is_empty() && t.instances.is_empty());
    assert_eq!(t.underlay.transport, Transport::Gre);
}

#[test]
fn toml_syntax_and_serde_errors_carry_the_span() {
    check(&[
        // An unquoted CIDR is read as a number and fails where it stops being one.
        case(
            &[Replace(r#"cidr = "10.1.0.0/16""#, "cidr = 10.1.0.0/16")],
            (20, 12),
            "",
            "invalid float",
        ),
        case(
            &[Replace(r#"cidr = "10.1.0.0/16""#, r#"cidr = "10.1.0.0/16"#)],
            (20, 20),
            "",
            "invalid basic string",
        ),
        // toml places an unclosed array where the line ends.
        case(&[Append("x = [1,\n")], (END + 1, 8), "", "unclosed array"),
        // A misspelt key.
        case(
            &[Replace(r#"tenant = "bob""#, r#"tennant = "bob""#)],
            (19, 1),
            "",
            "unknown field `tennant`",
        ),
        case(
            &[Append("[[vpcs]]\n")],
            (END + 1, 3),
            "",
            "unknown field `vpcs`",
        ),
        // A key appended after the last [[instance]] belongs to it.
        case(
            &[Append("colour = 1\n")],
            (END + 1, 1),
            "",
            "unknown field `colour`",
        ),
        case(
            &[Append("[[host]]\nname = \"h3\"\n")],
            (END + 1, 1),
            "",
            "missing field `address`",
        ),
        case(
            &[Replace("key = 100", r#"key = "100""#)],
            (15, 7),
            "",
            "invalid type",
        ),
        case(
            &[Append("[underlay]\nmtu = 1500\n[underlay]\nmtu = 1400\n")],
            (END + 3, 2),
            "",
            "duplicate key",
        ),
        case(
            &[Replace(
                r#"{ destination = "0.0.0.0/0", next_hop = "instance:web-1" }"#,
                r#"{ destination = "0.0.0.0/0" }"#,
            )],
            (39, 3),
            "",
            "missing field `next_hop`",
        ),
        // A port that is neither an integer nor a string says what a port looks like.
        case(
            &[Replace("port = 22,", "port = 1.5,")],
            (46, 49),
            "",
            "expected a port: an integer, or a string like \"80,443\"",
        ),
        case(
            &[Replace("port = 22,", "port = [80, 443],")],
            (46, 49),
            "",
            "expected a port",
        ),
        case(
            &[Append(
                "[[expect]]\nfrom = \"web-1\"\nto = \"web-2\"\nprotocol = \"tcp\"\nport = \"80\"\nreach = true\n",
            )],
            (END + 5, 8),
            "",
            "invalid type: string \"80\"",
        ),
    ]);
}

#[test]
fn unknown_references_of_every_kind() {
    check(&[
        case(
            &[Replace(r#"vpc = "vb""#, r#"vpc = "vx""#)],
            (32, 7),
            r#"subnet "sb""#,
            r#"unknown vpc "vx""#,
        ),
        case(
            &[Replace(r#"route_table = "rta""#, r#"route_table = "rtx""#)],
            (27, 15),
            r#"subnet "sa""#,
            r#"unknown route_table "rtx""#,
        ),
        case(
            &[Replace(r#"acl = "acla""#, r#"acl = "aclx""#)],
            (28, 7),
            r#"subnet "sa""#,
            r#"unknown acl "aclx""#,
        ),
        case(
            &[Replace(
                "name = \"rta\"\nvpc = \"va\"",
                "name = \"rta\"\nvpc = \"vx\"",
            )],
            (37, 7),
            r#"route_table "rta""#,
            r#"unknown vpc "vx""#,
        ),
        case(
            &[Replace(
                "name = \"acla\"\nvpc = \"va\"",
                "name = \"acla\"\nvpc = \"vx\"",
            )],
            (44, 7),
            r#"acl "acla""#,
            r#"unknown vpc "vx""#,
        ),
        case(
            &[Replace(r#"host = "h1""#, r#"host = "h9""#)],
            (60, 8),
            r#"instance "web-1""#,
            r#"unknown host "h9""#,
        ),
        case(
            &[Replace(r#"subnet = "sa""#, r#"subnet = "sx""#)],
            (61, 10),
            r#"instance "web-1""#,
            r#"unknown subnet "sx""#,
        ),
        case(
            &[Replace(
                "security_groups = [\"sg-web\"]\nnetns",
                "security_groups = [\"sg-web\", \"sg-x\"]\nnetns",
            )],
            (63, 30),
            r#"instance "web-1""#,
            r#"unknown security_group "sg-x""#,
        ),
        case(
            &[Replace(r#""sg:sg-web""#, r#""sg:sg-x""#)],
            (54, 52),
            r#"security_group "sg-web" ingress rule 2"#,
            r#"unknown security_group "sg-x""#,
        ),
        case(
            &[Replace(
                r#"destination = "0.0.0.0/0" }"#,
                r#"destination = "sg:nope" }"#,
            )],
            (56, 64),
            r#"security_group "sg-web" egress rule 1"#,
            r#"unknown security_group "nope""#,
        ),
        case(
            &[Replace(r#""instance:web-1""#, r#""instance:web-9""#)],
            (39, 43),
            r#"route_table "rta" route 1"#,
            r#"unknown instance "web-9""#,
        ),
        case(
            &[Replace(r#""instance:web-1""#, r#""peering:px""#)],
            (39, 43),
            r#"route_table "rta" route 1"#,
            r#"unknown peering "px""#,
        ),
        case(
            &[Replace(r#""instance:web-1""#, r#""gateway""#)],
            (39, 43),
            r#"route_table "rta" route 1"#,
            r#"next_hop "gateway" is not one of drop, internet, instance:NAME, peering:NAME"#,
        ),
        case(
            &[Append(
                "[[expect]]\nfrom = \"nobody\"\nto = \"web-2\"\nprotocol = \"icmp\"\nreach = true\n",
            )],
            (END + 2, 8),
            "expect #1 (nobody -> web-2)",
            r#"unknown instance "nobody""#,
        ),
        case(
            &[Append(
                "[[peering]]\nname = \"p1\"\nvpcs = [\"va\", \"vz\"]\n",
            )],
            (END + 3, 15),
            r#"peering "p1""#,
            r#"unknown vpc "vz""#,
        ),
        // ACL peers are CIDRs only.
        case(
            &[Replace(r#"cidr = "10.0.0.0/8""#, r#"cidr = "sg:sg-web""#)],
            (46, 60),
            r#"acl "acla" ingress rule 1"#,
            "network ACL rules take a CIDR; sg: peers belong to security groups",
        ),
    ]);
}

#[test]
fn duplicate_names_of_every_kind() {
    check(&[
        case(
            &[Append("[[host]]\nname = \"h1\"\naddress = \"192.0.2.9\"\n")],
            (END + 2, 8),
            r#"host "h1""#,
            r#"duplicate host name "h1""#,
        ),
        case(
            &[Append(
                "[[vpc]]\nname = \"va\"\ntenant = \"t\"\ncidr = \"10.2.0.0/16\"\n",
            )],
            (END + 2, 8),
            r#"vpc "va""#,
            r#"duplicate vpc name "va""#,
        ),
        case(
            &[Append(
                "[[subnet]]\nname = \"sa\"\nvpc = \"vb\"\ncidr = \"10.1.2.0/24\"\n",
            )],
            (END + 2, 8),
            r#"subnet "sa""#,
            r#"duplicate subnet name "sa""#,
        ),
        case(
            &[Append("[[route_table]]\nname = \"rta\"\nvpc = \"vb\"\n")],
            (END + 2, 8),
            r#"route_table "rta""#,
            r#"duplicate route_table name "rta""#,
        ),
        case(
            &[Append("[[acl]]\nname = \"acla\"\nvpc = \"vb\"\n")],
            (END + 2, 8),
            r#"acl "acla""#,
            r#"duplicate acl name "acla""#,
        ),
        case(
            &[Append("[[security_group]]\nname = \"sg-web\"\n")],
            (END + 2, 8),
            r#"security_group "sg-web""#,
            r#"duplicate security_group name "sg-web""#,
        ),
        case(
            &[Append(
                "[[instance]]\nname = \"web-1\"\nhost = \"h2\"\nsubnet = \"sb\"\nip = \"10.1.1.11\"\nsecurity_groups = [\"sg-web\"]\n",
            )],
            (END + 2, 8),
            r#"instance "web-1""#,
            r#"duplicate instance name "web-1""#,
        ),
        case(
            &[
                Append(VC),
                Append("[[peering]]\nname = \"p\"\nvpcs = [\"va\", \"vb\"]\n"),
                Append("[[peering]]\nname = \"p\"\nvpcs = [\"va\", \"vc\"]\n"),
            ],
            (END + 9, 8),
            r#"peering "p""#,
            r#"duplicate peering name "p""#,
        ),
        case(
            &[Append("[[host]]\nname = \"\"\naddress = \"192.0.2.9\"\n")],
            (END + 2, 8),
            "host #3",
            "name is empty",
        ),
        case(
            &[Replace(r#"tenant = "bob""#, r#"tenant = " ""#)],
            (19, 10),
            r#"vpc "vb""#,
            "tenant is empty",
        ),
    ]);
}

#[test]
fn a_duplicate_does_not_steal_the_references_to_the_first() {
    // The second "va" is 10.2.0.0/16: were "va" to mean it, subnet "sa" (10.0.1.0/24) would
    // lie outside its VPC and rta's route would be refused.
    let errors = invalid(&apply(&[Append(
        "[[vpc]]\nname = \"va\"\ntenant = \"t\"\ncidr = \"10.2.0.0/16\"\n",
    )]));
    assert_eq!(errors.len(), 1, "{}", render(&errors));
}

#[test]
fn duplicate_keys_addresses_and_namespaces() {
    check(&[
        case(
            &[Append(
                "[[vpc]]\nname = \"vc\"\ntenant = \"carol\"\ncidr = \"10.2.0.0/16\"\nkey = 100\n",
            )],
            (END + 5, 7),
            r#"vpc "vc""#,
            r#"key 100 is already vpc "va"'s"#,
        ),
        case(
            &[Replace("key = 100", "key = -1")],
            (15, 7),
            r#"vpc "va""#,
            "key -1 is out of range 0..=4294967295",
        ),
        case(
            &[Replace("key = 100", "key = 4294967296")],
            (15, 7),
            r#"vpc "va""#,
            "key 4294967296 is out of range",
        ),
        case(
            &[Append(
                "[[instance]]\nname = \"web-3\"\nhost = \"h2\"\nsubnet = \"sa\"\nip = \"10.0.1.10\"\nsecurity_groups = [\"sg-web\"]\n",
            )],
            (END + 5, 6),
            r#"instance "web-3""#,
            r#"ip 10.0.1.10 is already instance "web-1"'s in this VPC"#,
        ),
        case(
            &[Append("[[host]]\nname = \"h3\"\naddress = \"192.0.2.1\"\n")],
            (END + 3, 11),
            r#"host "h3""#,
            r#"address 192.0.2.1 is already host "h1"'s"#,
        ),
        case(
            &[Append(
                "[[instance]]\nname = \"web-3\"\nhost = \"h2\"\nsubnet = \"sa\"\nip = \"10.0.1.11\"\nsecurity_groups = [\"sg-web\"]\nnetns = \"ns-web-1\"\n",
            )],
            (END + 7, 9),
            r#"instance "web-3""#,
            r#"netns "ns-web-1" is already instance "web-1"'s"#,
        ),
        case(
            &[Replace(r#"netns = "ns-web-1""#, r#"netns = "a/b""#)],
            (64, 9),
            r#"instance "web-1""#,
            r#"netns "a/b" is not a valid namespace name"#,
        ),
        case(
            &[Replace(r#"netns = "ns-web-1""#, r#"netns = """#)],
            (64, 9),
            r#"instance "web-1""#,
            r#"netns "" is not a valid namespace name"#,
        ),
    ]);
}

#[test]
fn the_same_address_in_two_vpcs_is_fine() {
    // vb takes va's CIDR, sb sa's, and web-2 web-1's address: they differ only by VPC.
    let t = valid(&apply(&[
        Replace(r#"cidr = "10.1.0.0/16""#, r#"cidr = "10.0.0.0/16""#),
        Replace(r#"cidr = "10.1.1.0/24""#, r#"cidr = "10.0.1.0/24""#),
        Replace(r#"ip = "10.1.1.10""#, r#"ip = "10.0.1.10""#),
    ]));
    let (va, vb) = (VpcId(0), VpcId(1));
    let ip = Ipv4Addr::new(10, 0, 1, 10);
    assert_eq!(t.instance_at(va, ip), t.instance_named("web-1"));
    assert_eq!(t.instance_at(vb, ip), t.instance_named("web-2"));
    assert_ne!(t.instance_at(va, ip), t.instance_at(vb, ip));
}

#[test]
fn host_addresses() {
    for (address, message) in [
        ("192.0.2", r#"address "192.0.2" is not an IPv4 address"#),
        ("host-a", r#"address "host-a" is not an IPv4 address"#),
        ("0.0.0.0", "address 0.0.0.0 cannot be a host's"),
        (
            "255.255.255.255",
            "address 255.255.255.255 cannot be a host's",
        ),
        ("239.1.2.3", "address 239.1.2.3 cannot be a host's"),
    ] {
        let text = BASE.replace(
            r#"address = "192.0.2.1""#,
            &format!(r#"address = "{address}""#),
        );
        let errors = invalid(&text);
        assert_eq!(errors.len(), 1, "{}", render(&errors));
        let e = &errors[0];
        assert_eq!((e.line, e.column), (3, 11), "{e}");
        assert_eq!(e.item, r#"host "h1""#);
        assert!(e.message.contains(message), "{e}");
    }
}

#[test]
fn subnets() {
    check(&[
        case(
            &[Replace(
                r#"cidr = "10.1.1.0/24""#,
                r#"cidr = "10.2.1.0/24""#,
            )],
            (33, 8),
            r#"subnet "sb""#,
            r#"cidr 10.2.1.0/24 lies outside vpc "vb" (10.1.0.0/16)"#,
        ),
        // Larger than its VPC.
        case(
            &[Replace(
                r#"cidr = "10.1.1.0/24""#,
                r#"cidr = "10.0.0.0/15""#,
            )],
            (33, 8),
            r#"subnet "sb""#,
            r#"cidr 10.0.0.0/15 lies outside vpc "vb""#,
        ),
        case(
            &[Append(
                "[[subnet]]\nname = \"sa2\"\nvpc = \"va\"\ncidr = \"10.0.1.128/25\"\n",
            )],
            (END + 4, 8),
            r#"subnet "sa2""#,
            r#"cidr 10.0.1.128/25 overlaps subnet "sa" (10.0.1.0/24)"#,
        ),
        // Containing a sibling is overlapping too.
        case(
            &[Append(
                "[[subnet]]\nname = \"sa2\"\nvpc = \"va\"\ncidr = \"10.0.0.0/20\"\n",
            )],
            (END + 4, 8),
            r#"subnet "sa2""#,
            r#"cidr 10.0.0.0/20 overlaps subnet "sa" (10.0.1.0/24)"#,
        ),
        case(
            &[Append(
                "[[subnet]]\nname = \"sa2\"\nvpc = \"va\"\ncidr = \"10.0.2.0/29\"\n",
            )],
            (END + 4, 8),
            r#"subnet "sa2""#,
            "cidr 10.0.2.0/29 is smaller than /28, the smallest subnet",
        ),
        case(
            &[Replace(
                r#"cidr = "10.1.1.0/24""#,
                r#"cidr = "10.1.1.5/24""#,
            )],
            (33, 8),
            r#"subnet "sb""#,
            r#"cidr "10.1.1.5/24" has host bits set: did you mean 10.1.1.0/24?"#,
        ),
        case(
            &[Replace(r#"cidr = "10.1.1.0/24""#, r#"cidr = "10.1.1.0""#)],
            (33, 8),
            r#"subnet "sb""#,
            r#"cidr "10.1.1.0" is not a CIDR, like 10.0.0.0/16"#,
        ),
    ]);
    // Siblings side by side, a /28, and the same CIDR in another VPC are all fine.
    let t = valid(&apply(&[Append(
        r#"[[subnet]]
name = "sa2"
vpc = "va"
cidr = "10.0.2.0/24"

[[subnet]]
name = "sa3"
vpc = "va"
cidr = "10.0.0.240/28"

[[subnet]]
name = "sb2"
vpc = "vb"
cidr = "10.1.2.0/24"
"#,
    )]));
    assert_eq!(t.subnets.len(), 5);
}

#[test]
fn instance_addresses() {
    check(&[
        case(
            &[Replace(r#"ip = "10.0.1.10""#, r#"ip = "10.0.2.10""#)],
            (62, 6),
            r#"instance "web-1""#,
            r#"ip 10.0.2.10 lies outside subnet "sa" (10.0.1.0/24)"#,
        ),
        case(
            &[Replace(r#"ip = "10.0.1.10""#, r#"ip = "10.0.1.0""#)],
            (62, 6),
            r#"instance "web-1""#,
            r#"ip 10.0.1.0 is reserved in subnet "sa": the network address"#,
        ),
        case(
            &[Replace(r#"ip = "10.0.1.10""#, r#"ip = "10.0.1.1""#)],
            (62, 6),
            r#"instance "web-1""#,
            r#"ip 10.0.1.1 is reserved in subnet "sa": the gateway address"#,
        ),
        case(
            &[Replace(r#"ip = "10.0.1.10""#, r#"ip = "10.0.1.255""#)],
            (62, 6),
            r#"instance "web-1""#,
            r#"ip 10.0.1.255 is reserved in subnet "sa": the broadcast address"#,
        ),
        case(
            &[Replace(r#"ip = "10.0.1.10""#, r#"ip = "10.0.1.300""#)],
            (62, 6),
            r#"instance "web-1""#,
            r#"ip "10.0.1.300" is not an IPv4 address"#,
        ),
        case(
            &[Replace(r#"ip = "10.0.1.10""#, r#"ip = "10.0.1.10/24""#)],
            (62, 6),
            r#"instance "web-1""#,
            r#"ip "10.0.1.10/24" is not an IPv4 address"#,
        ),
    ]);
    // The first address after the reserved two, and the last before the broadcast, are usable.
    for ip in ["10.0.1.2", "10.0.1.254"] {
        valid(&BASE.replace("10.0.1.10", ip));
    }
}

#[test]
fn vpc_cidrs() {
    let at = (20, 8);
    let vb = r#"vpc "vb""#;
    check(&[
        case(
            &[Replace(r#""10.1.0.0/16""#, r#""8.8.0.0/16""#)],
            at,
            vb,
            "cidr 8.8.0.0/16 is not private: a VPC takes 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16",
        ),
        case(
            &[Replace(r#""10.1.0.0/16""#, r#""192.0.2.0/24""#)],
            at,
            vb,
            "cidr 192.0.2.0/24 is not private",
        ),
        case(
            &[Replace(r#""10.1.0.0/16""#, r#""100.64.0.0/16""#)],
            at,
            vb,
            "cidr 100.64.0.0/16 is not private",
        ),
        case(
            &[Replace(r#""10.1.0.0/16""#, r#""10.0.0.0/8""#)],
            at,
            vb,
            "cidr 10.0.0.0/8 is too large: within 10.0.0.0/8 a VPC is at most /12",
        ),
        case(
            &[Replace(r#""10.1.0.0/16""#, r#""10.0.0.0/11""#)],
            at,
            vb,
            "cidr 10.0.0.0/11 is too large",
        ),
        // 172.16.0.0/11 is not a network address: the host bits are reported first.
        case(
            &[Replace(r#""10.1.0.0/16""#, r#""172.16.0.0/11""#)],
            at,
            vb,
            r#"cidr "172.16.0.0/11" has host bits set: did you mean 172.0.0.0/11?"#,
        ),
        // ... and the /11 it suggests reaches outside 172.16.0.0/12.
        case(
            &[Replace(r#""10.1.0.0/16""#, r#""172.0.0.0/11""#)],
            at,
            vb,
            "cidr 172.0.0.0/11 is not private",
        ),
        case(
            &[Replace(r#""10.1.0.0/16""#, r#""192.168.0.0/15""#)],
            at,
            vb,
            "cidr 192.168.0.0/15 is too large: within 192.168.0.0/16 a VPC is at most /16",
        ),
        case(
            &[Replace(r#""10.1.0.0/16""#, r#""10.1.0.0/29""#)],
            at,
            vb,
            "cidr 10.1.0.0/29 is too small: a VPC is at least /28",
        ),
        case(
            &[Replace(r#""10.1.0.0/16""#, r#""10.1.0.1/16""#)],
            at,
            vb,
            r#"cidr "10.1.0.1/16" has host bits set: did you mean 10.1.0.0/16?"#,
        ),
        case(
            &[Replace(r#""10.1.0.0/16""#, r#""10.1.0.0""#)],
            at,
            vb,
            r#"cidr "10.1.0.0" is not a CIDR"#,
        ),
    ]);
}

#[test]
fn vpc_cidr_boundaries_are_accepted() {
    let mut text = BASE.to_string();
    for (n, cidr) in [
        "10.16.0.0/12",
        "10.255.255.240/28",
        "172.16.0.0/12",
        "172.31.255.240/28",
        "192.168.0.0/16",
        "192.168.255.240/28",
    ]
    .iter()
    .enumerate()
    {
        text.push_str(&format!(
            "[[vpc]]\nname = \"v{n}\"\ntenant = \"t\"\ncidr = \"{cidr}\"\n"
        ));
    }
    assert_eq!(valid(&text).vpcs.len(), 8);
}

#[test]
fn routes() {
    let item = r#"route_table "rta" route 1"#;
    check(&[
        case(
            &[Replace(
                r#""0.0.0.0/0", next_hop"#,
                r#""10.0.5.0/24", next_hop"#,
            )],
            (39, 19),
            item,
            "destination 10.0.5.0/24 lies inside the VPC's CIDR 10.0.0.0/16: the local route always wins",
        ),
        case(
            &[Replace(
                r#""0.0.0.0/0", next_hop"#,
                r#""10.0.0.0/16", next_hop"#,
            )],
            (39, 19),
            item,
            "destination 10.0.0.0/16 lies inside the VPC's CIDR 10.0.0.0/16",
        ),
        case(
            &[Replace(
                r#""0.0.0.0/0", next_hop"#,
                r#""10.5.0.1/16", next_hop"#,
            )],
            (39, 19),
            item,
            r#"destination "10.5.0.1/16" has host bits set"#,
        ),
        case(
            &[Replace(
                "  { destination = \"0.0.0.0/0\", next_hop = \"instance:web-1\" },\n",
                "  { destination = \"0.0.0.0/0\", next_hop = \"instance:web-1\" },\n  { destination = \"0.0.0.0/0\", next_hop = \"drop\" },\n",
            )],
            (40, 19),
            r#"route_table "rta" route 2"#,
            "destination 0.0.0.0/0 is already route 1's",
        ),
        case(
            &[Replace(r#""instance:web-1""#, r#""instance:web-2""#)],
            (39, 43),
            item,
            r#"next hop instance "web-2" is in another VPC ("vb")"#,
        ),
        case(
            &[
                Replace(r#""instance:web-1""#, r#""peering:pbc""#),
                Append(VC),
                Append("[[peering]]\nname = \"pbc\"\nvpcs = [\"vb\", \"vc\"]\n"),
            ],
            (39, 43),
            item,
            r#"peering "pbc" does not join this route table's VPC"#,
        ),
    ]);
}

#[test]
fn routes_that_contain_the_vpc_or_cross_a_peering_are_fine() {
    let t = valid(&apply(&[
        Replace(
            "  { destination = \"0.0.0.0/0\", next_hop = \"instance:web-1\" },\n",
            r#"  { destination = "0.0.0.0/0", next_hop = "internet" },
  { destination = "10.0.0.0/8", next_hop = "instance:web-1" },
  { destination = "10.1.0.0/16", next_hop = "peering:pab" },
  { destination = "10.1.9.0/24", next_hop = "drop" },
"#,
        ),
        Append("[[peering]]\nname = \"pab\"\nvpcs = [\"va\", \"vb\"]\n"),
    ]));
    let rta = &t.route_tables[0];
    assert_eq!(rta.name, "rta");
    assert!(!rta.implicit);
    let hop = |a: [u8; 4]| rta.routes.lookup(a.into()).map(|(_, r)| r.next_hop);
    let web1 = t.instance_named("web-1").unwrap();
    assert_eq!(hop([10, 1, 9, 9]), Some(NextHop::Drop));
    assert_eq!(hop([10, 1, 2, 3]), Some(NextHop::Peering(PeeringId(0))));
    assert_eq!(hop([10, 7, 0, 1]), Some(NextHop::Instance(web1)));
    assert_eq!(hop([8, 8, 8, 8]), Some(NextHop::Internet));
    assert_eq!(t.peerings[0].vpcs, [VpcId(0), VpcId(1)]);
}

#[test]
fn rule_fields() {
    let acl = r#"acl "acla" ingress rule 1"#;
    check(&[
        case(
            &[Replace("port = 22,", r#"port = "2000-1000","#)],
            (46, 49),
            acl,
            "port range 2000-1000 is out of order",
        ),
        case(
            &[Replace("port = 22,", "port = 0,")],
            (46, 49),
            acl,
            r#"port "0" is not a port (1-65535), a range a-b, or a list a,b"#,
        ),
        case(
            &[Replace("port = 22,", "port = 70000,")],
            (46, 49),
            acl,
            r#"port "70000" is not a port"#,
        ),
        case(
            &[Replace("port = 22,", "port = -22,")],
            (46, 49),
            acl,
            r#"port "-22" is not a port"#,
        ),
        case(
            &[Replace("port = 22,", r#"port = "ssh","#)],
            (46, 49),
            acl,
            r#"port "ssh" is not a port"#,
        ),
        case(
            &[Replace("port = 22,", r#"port = "80,","#)],
            (46, 49),
            acl,
            r#"port "" is not a port"#,
        ),
        case(
            &[Replace("port = 22,", r#"port = "1-2-3","#)],
            (46, 49),
            acl,
            r#"port "1-2-3" is not a port"#,
        ),
        case(
            &[Replace("port = 22,", r#"port = "0-80","#)],
            (46, 49),
            acl,
            r#"port "0-80" is not a port"#,
        ),
        case(
            &[Replace(
                r#"protocol = "tcp", port = 22,"#,
                r#"protocol = "all", port = 22,"#,
            )],
            (46, 49),
            acl,
            r#"port must be "all" (or absent) when the protocol is all"#,
        ),
        case(
            &[Replace(
                r#"protocol = "tcp", port = 22,"#,
                r#"protocol = "icmp", port = 22,"#,
            )],
            (46, 50),
            acl,
            r#"port must be "all" (or absent) when the protocol is icmp"#,
        ),
        case(
            &[Replace(
                r#"protocol = "tcp", port = 22,"#,
                r#"protocol = "icmpv6","#,
            )],
            (46, 35),
            acl,
            "icmpv6 needs IPv6, which vpcd does not carry yet",
        ),
        case(
            &[Replace(
                r#"protocol = "tcp", port = 22,"#,
                r#"protocol = "sctp","#,
            )],
            (46, 35),
            acl,
            r#"protocol "sctp" is not one of all, tcp, udp, icmp"#,
        ),
        case(
            &[Replace(
                r#"action = "accept", protocol = "tcp", port = 22"#,
                r#"action = "allow", protocol = "tcp", port = 22"#,
            )],
            (46, 14),
            acl,
            r#"action "allow" is neither "accept" nor "drop""#,
        ),
        case(
            &[Replace(r#"cidr = "10.0.0.0/8""#, r#"cidr = "10.0.0.0/33""#)],
            (46, 60),
            acl,
            r#"peer "10.0.0.0/33" is not a CIDR or an address, like 10.0.0.0/16"#,
        ),
        case(
            &[Replace(r#"cidr = "10.0.0.0/8""#, r#"cidr = "10.0.0.1/8""#)],
            (46, 60),
            acl,
            r#"peer "10.0.0.1/8" has host bits set: did you mean 10.0.0.0/8?"#,
        ),
        // The same checks in a security group, on its own item.
        case(
            &[Replace(r#"port = "80,443""#, r#"port = "80,0""#)],
            (53, 49),
            r#"security_group "sg-web" ingress rule 1"#,
            r#"port "0" is not a port"#,
        ),
        case(
            &[Replace(
                r#"protocol = "icmp", source"#,
                r#"protocol = "gre", source"#,
            )],
            (54, 35),
            r#"security_group "sg-web" ingress rule 2"#,
            r#"protocol "gre" is not one of all, tcp, udp, icmp"#,
        ),
        case(
            &[Replace(
                r#"protocol = "all", destination"#,
                r#"protocol = "all", port = 53, destination"#,
            )],
            (56, 57),
            r#"security_group "sg-web" egress rule 1"#,
            "when the protocol is all",
        ),
    ]);
}

#[test]
fn port_forms() {
    let r = |first, last| PortRange { first, last };
    for (port, want) in [
        ("port = 22,", vec![r(22, 22)]),
        ("port = \"22\",", vec![r(22, 22)]),
        ("port = \"80,443\",", vec![r(80, 80), r(443, 443)]),
        ("port = \" 80 , 443 \",", vec![r(80, 80), r(443, 443)]),
        ("port = \"1000-2000\",", vec![r(1000, 2000)]),
        ("port = \"22,1000-2000\",", vec![r(22, 22), r(1000, 2000)]),
        ("port = \"1-65535\",", vec![r(1, 65535)]),
        ("port = \"7-7\",", vec![r(7, 7)]),
        ("port = \"all\",", vec![]),
        ("port = \"ALL\",", vec![]),
        ("", vec![]),
    ] {
        let t = valid(&BASE.replace("port = 22,", port));
        assert_eq!(t.acls[0].ingress[0].ports, want, "{port}");
        assert_eq!(t.acls[0].ingress[0].protocol, Protocol::Tcp);
    }
    // "all" is the one port that protocols without ports take.
    for protocol in ["all", "icmp", "ICMP"] {
        let t = valid(&BASE.replace(
            r#"protocol = "tcp", port = 22,"#,
            &format!(r#"protocol = "{protocol}", port = "all","#),
        ));
        assert!(t.acls[0].ingress[0].ports.is_empty());
    }
    // Words are case-insensitive.
    let t = valid(&BASE.replace(
        r#"action = "accept", protocol = "tcp""#,
        r#"action = "DROP", protocol = "Udp""#,
    ));
    let rule = &t.acls[0].ingress[0];
    assert_eq!((rule.action, rule.protocol), (Action::Drop, Protocol::Udp));
    // A bare address as a peer is a /32.
    let t = valid(&BASE.replace(r#"cidr = "10.0.0.0/8""#, r#"cidr = "10.9.8.7""#));
    assert_eq!(
        t.acls[0].ingress[0].peer,
        Peer::Cidr("10.9.8.7/32".parse().unwrap())
    );
}

#[test]
fn peerings() {
    check(&[
        case(
            &[
                Append("[[vpc]]\nname = \"vc\"\ntenant = \"carol\"\ncidr = \"10.0.0.0/12\"\n"),
                Append("[[peering]]\nname = \"p1\"\nvpcs = [\"va\", \"vc\"]\n"),
            ],
            (END + 7, 8),
            r#"peering "p1""#,
            r#"vpc "va" (10.0.0.0/16) and vpc "vc" (10.0.0.0/12) overlap: peered CIDRs must not"#,
        ),
        case(
            &[Append(
                "[[peering]]\nname = \"p1\"\nvpcs = [\"va\", \"va\"]\n",
            )],
            (END + 3, 8),
            r#"peering "p1""#,
            "a VPC cannot peer with itself",
        ),
        case(
            &[Append("[[peering]]\nname = \"p1\"\nvpcs = [\"va\"]\n")],
            (END + 3, 8),
            r#"peering "p1""#,
            "vpcs names 1 VPCs; a peering joins exactly two",
        ),
        case(
            &[Append("[[peering]]\nname = \"p1\"\nvpcs = []\n")],
            (END + 3, 8),
            r#"peering "p1""#,
            "vpcs names 0 VPCs",
        ),
        case(
            &[
                Append(VC),
                Append("[[peering]]\nname = \"p1\"\nvpcs = [\"va\", \"vb\", \"vc\"]\n"),
            ],
            (END + 7, 8),
            r#"peering "p1""#,
            "vpcs names 3 VPCs",
        ),
        // The same pair, either way round.
        case(
            &[
                Append("[[peering]]\nname = \"p1\"\nvpcs = [\"va\", \"vb\"]\n"),
                Append("[[peering]]\nname = \"p2\"\nvpcs = [\"vb\", \"va\"]\n"),
            ],
            (END + 6, 8),
            r#"peering "p2""#,
            r#"these VPCs are already peered by "p1""#,
        ),
    ]);
}

#[test]
fn tables_and_acls_belong_to_their_vpc() {
    check(&[
        case(
            &[Replace(
                r#"cidr = "10.1.1.0/24""#,
                "cidr = \"10.1.1.0/24\"\nroute_table = \"rta\"",
            )],
            (34, 15),
            r#"subnet "sb""#,
            r#"route_table "rta" belongs to another VPC"#,
        ),
        case(
            &[Replace(
                r#"cidr = "10.1.1.0/24""#,
                "cidr = \"10.1.1.0/24\"\nacl = \"acla\"",
            )],
            (34, 7),
            r#"subnet "sb""#,
            r#"acl "acla" belongs to another VPC"#,
        ),
    ]);
}

#[test]
fn instance_security_groups() {
    let web1 = r#"instance "web-1""#;
    check(&[
        // Without the key, the error is on the [[instance]] header.
        case(
            &[Replace("security_groups = [\"sg-web\"]\nnetns", "netns")],
            (58, 1),
            web1,
            "an instance needs at least one security group (the cloud always binds one)",
        ),
        case(
            &[Replace(
                "security_groups = [\"sg-web\"]\nnetns",
                "security_groups = []\nnetns",
            )],
            (63, 19),
            web1,
            "an instance needs at least one security group",
        ),
        case(
            &[Replace(
                "security_groups = [\"sg-web\"]\nnetns",
                "security_groups = [\"sg-web\", \"sg-web\"]\nnetns",
            )],
            (63, 30),
            web1,
            r#"security_group "sg-web" is listed twice"#,
        ),
        case(
            &[
                Replace(
                    "security_groups = [\"sg-web\"]\nnetns",
                    "security_groups = [\"sg-web\", \"sg-2\"]\nnetns",
                ),
                Append("[limits]\nsecurity_groups_per_instance = 1\n"),
                Append("[[security_group]]\nname = \"sg-2\"\n"),
            ],
            (63, 19),
            web1,
            "2 security groups exceed the limit of 1 per instance",
        ),
    ]);
}

/// `n` security groups `g0`.. and web-1 bound to all of them.
fn with_groups(n: usize, limits: &str) -> String {
    let names: Vec<String> = (0..n).map(|i| format!("\"g{i}\"")).collect();
    let mut text = BASE.replace(
        "security_groups = [\"sg-web\"]\nnetns",
        &format!("security_groups = [{}]\nnetns", names.join(", ")),
    );
    for i in 0..n {
        text.push_str(&format!("[[security_group]]\nname = \"g{i}\"\n"));
    }
    text.push_str(limits);
    text
}

#[test]
fn limits_can_be_raised() {
    // Five groups per instance by default.
    valid(&with_groups(5, ""));
    let e = invalid(&with_groups(6, ""));
    assert_eq!(e.len(), 1, "{}", render(&e));
    assert_eq!(e[0].line, 63);
    assert!(
        e[0].message
            .contains("6 security groups exceed the limit of 5 per instance")
    );
    let t = valid(&with_groups(
        6,
        "[limits]\nsecurity_groups_per_instance = 6\n",
    ));
    assert_eq!(t.limits.security_groups_per_instance, 6);
    assert_eq!(t.instances[0].security_groups.len(), 6);

    // Rules per ACL and direction: 20.
    let acl = |n: usize, dir: &str| {
        let rule = r#"{ action = "accept", protocol = "all", cidr = "0.0.0.0/0" }"#;
        format!(
            "[[acl]]\nname = \"big\"\nvpc = \"vb\"\n{dir} = [{}]\n",
            vec![rule; n].join(", ")
        )
    };
    valid(&format!("{BASE}{}", acl(20, "ingress")));
    for dir in ["ingress", "egress"] {
        let e = invalid(&format!("{BASE}{}", acl(21, dir)));
        assert_eq!(e.len(), 1, "{}", render(&e));
        assert_eq!((e[0].line, e[0].column), (END + 2, 8));
        assert_eq!(e[0].item, r#"acl "big""#);
        assert!(
            e[0].message.contains(&format!(
                "21 {dir} rules exceed the limit of 20 (raise [limits] rules_per_acl)"
            )),
            "{}",
            e[0]
        );
        valid(&format!(
            "{BASE}{}[limits]\nrules_per_acl = 21\n",
            acl(21, dir)
        ));
    }

    // Rules per security group and direction: 100.
    let sg = |n: usize, dir: &str, peer: &str| {
        let rule = format!(r#"{{ action = "accept", protocol = "all", {peer} = "0.0.0.0/0" }}"#);
        format!(
            "[[security_group]]\nname = \"big\"\n{dir} = [{}]\n",
            vec![rule; n].join(", ")
        )
    };
    for (dir, peer) in [("ingress", "source"), ("egress", "destination")] {
        valid(&format!("{BASE}{}", sg(100, dir, peer)));
        let e = invalid(&format!("{BASE}{}", sg(101, dir, peer)));
        assert_eq!(e.len(), 1, "{}", render(&e));
        assert_eq!(
            (e[0].line, e[0].item.as_str()),
            (END + 2, r#"security_group "big""#)
        );
        assert!(
            e[0].message.contains(&format!(
                "101 {dir} rules exceed the limit of 100 (raise [limits] rules_per_security_group)"
            )),
            "{}",
            e[0]
        );
        valid(&format!(
            "{BASE}{}[limits]\nrules_per_security_group = 101\n",
            sg(101, dir, peer)
        ));
    }

    // Routes per table: 50.
    let table = |n: usize| {
        let routes: Vec<String> = (0..n)
            .map(|i| format!(r#"{{ destination = "172.16.{i}.0/24", next_hop = "drop" }}"#))
            .collect();
        format!(
            "[[route_table]]\nname = \"big\"\nvpc = \"vb\"\nroutes = [{}]\n",
            routes.join(", ")
        )
    };
    valid(&format!("{BASE}{}", table(50)));
    let e = invalid(&format!("{BASE}{}", table(51)));
    assert_eq!(e.len(), 1, "{}", render(&e));
    assert_eq!(
        (e[0].line, e[0].item.as_str()),
        (END + 2, r#"route_table "big""#)
    );
    assert!(
        e[0].message
            .contains("51 routes exceed the limit of 50 (raise [limits] routes_per_table)")
    );
    valid(&format!(
        "{BASE}{}[limits]\nroutes_per_table = 51\n",
        table(51)
    ));

    // Route tables per VPC: 10 written ones (va has rta already).
    let tables = |n: usize| {
        (0..n)
            .map(|i| format!("[[route_table]]\nname = \"t{i}\"\nvpc = \"va\"\n"))
            .collect::<String>()
    };
    valid(&format!("{BASE}{}", tables(9)));
    let e = invalid(&format!("{BASE}{}", tables(10)));
    assert_eq!(e.len(), 1, "{}", render(&e));
    // The eleventh table of va: t9, on the name line of the tenth appended table.
    assert_eq!(
        (e[0].line, e[0].item.as_str()),
        (END + 9 * 3 + 2, r#"route_table "t9""#)
    );
    assert!(
        e[0].message
            .contains(r#"vpc "va" has more than 10 route tables"#)
    );
    valid(&format!(
        "{BASE}{}[limits]\nroute_tables_per_vpc = 11\n",
        tables(10)
    ));
}

#[test]
fn limits_out_of_range() {
    check(&[
        case(
            &[Append("[limits]\nrules_per_acl = 0\n")],
            (END + 2, 17),
            "[limits]",
            "rules_per_acl 0 is out of range 1..=1000000",
        ),
        case(
            &[Append("[limits]\nroutes_per_table = 1000001\n")],
            (END + 2, 20),
            "[limits]",
            "routes_per_table 1000001 is out of range 1..=1000000",
        ),
    ]);
    let e = invalid(&apply(&[Append(
        "[limits]\nsecurity_groups_per_instance = 0\nroute_tables_per_vpc = -1\n",
    )]));
    assert_eq!(
        e.iter().map(|e| e.line).collect::<Vec<_>>(),
        [END + 2, END + 3],
        "{}",
        render(&e)
    );
}

const WEB3: &str = r#"[[instance]]
name = "web-3"
host = "h1"
subnet = "sa"
ip = "10.0.1.11"
security_groups = ["sg-web"]
"#;

#[test]
fn instances() {
    check(&[
        case(
            &[Append(
                "[[instance]]\nname = \"abcdefghijklmnop\"\nhost = \"h1\"\nsubnet = \"sa\"\nip = \"10.0.1.11\"\nsecurity_groups = [\"sg-web\"]\n",
            )],
            (END + 2, 8),
            r#"instance "abcdefghijklmnop""#,
            "name must be 1-15 characters of a-z A-Z 0-9 . _ - (it names the TUN device)",
        ),
        case(
            &[Append(
                "[[instance]]\nname = \"web/3\"\nhost = \"h1\"\nsubnet = \"sa\"\nip = \"10.0.1.11\"\nsecurity_groups = [\"sg-web\"]\n",
            )],
            (END + 2, 8),
            r#"instance "web/3""#,
            "name must be 1-15 characters",
        ),
        case(
            &[Append(
                "[[instance]]\nname = \"web 3\"\nhost = \"h1\"\nsubnet = \"sa\"\nip = \"10.0.1.11\"\nsecurity_groups = [\"sg-web\"]\n",
            )],
            (END + 2, 8),
            r#"instance "web 3""#,
            "name must be 1-15 characters",
        ),
        case(
            &[Append(
                "[[instance]]\nname = \"web-3\"\nhost = \"h1\"\nsubnet = \"sa\"\nsecurity_groups = [\"sg-web\"]\n",
            )],
            (END + 1, 1),
            r#"instance "web-3""#,
            "a VPC instance needs an ip",
        ),
        case(
            &[Append(
                "[[instance]]\nname = \"web-3\"\nhost = \"h1\"\nip = \"10.0.1.11\"\nsecurity_groups = [\"sg-web\"]\n",
            )],
            (END + 1, 1),
            r#"instance "web-3""#,
            "a VPC instance needs a subnet",
        ),
        case(
            &[Append(WEB3), Append("network = \"vpc6\"\n")],
            (END + 7, 11),
            r#"instance "web-3""#,
            r#"network "vpc6" is neither "vpc" nor "basic""#,
        ),
        case(
            &[Append(WEB3), Append("tenant = \"alice\"\n")],
            (END + 7, 10),
            r#"instance "web-3""#,
            "a VPC instance takes its tenant from its VPC: remove tenant",
        ),
    ]);
    // 15 characters and network = "vpc" are fine.
    let t = valid(&apply(&[
        Append(WEB3),
        Append("network = \"vpc\"\n"),
        Append(
            "[[instance]]\nname = \"abcdefghijklmno\"\nhost = \"h1\"\nsubnet = \"sa\"\nip = \"10.0.1.12\"\nsecurity_groups = [\"sg-web\"]\n",
        ),
    ]));
    assert!(t.instance_named("abcdefghijklmno").is_some());
}

#[test]
fn regions() {
    check(&[
        case(
            &[
                Append(VC),
                Append("region = \"r2\"\n"),
                Append("[[subnet]]\nname = \"sc\"\nvpc = \"vc\"\ncidr = \"10.2.1.0/24\"\n"),
                Append(
                    "[[instance]]\nname = \"web-3\"\nhost = \"h1\"\nsubnet = \"sc\"\nip = \"10.2.1.10\"\nsecurity_groups = [\"sg-web\"]\n",
                ),
            ],
            (END + 12, 8),
            r#"instance "web-3""#,
            r#"host "h1" is in region "r1", vpc "vc" in "r2""#,
        ),
        // A host without a region is in "default".
        case(
            &[
                Append("[[host]]\nname = \"h3\"\naddress = \"192.0.2.3\"\n"),
                Append(
                    "[[instance]]\nname = \"web-3\"\nhost = \"h3\"\nsubnet = \"sb\"\nip = \"10.1.1.11\"\nsecurity_groups = [\"sg-web\"]\n",
                ),
            ],
            (END + 6, 8),
            r#"instance "web-3""#,
            r#"host "h3" is in region "default", vpc "vb" in "r1""#,
        ),
    ]);
    // A VPC without a region takes instances from any host.
    let t = valid(&apply(&[
        Append("[[host]]\nname = \"h3\"\naddress = \"192.0.2.3\"\nregion = \"elsewhere\"\n"),
        Append(
            "[[instance]]\nname = \"web-3\"\nhost = \"h3\"\nsubnet = \"sa\"\nip = \"10.0.1.11\"\nsecurity_groups = [\"sg-web\"]\n",
        ),
    ]));
    assert_eq!(t.host(t.host_named("h3").unwrap()).region, "elsewhere");
    assert_eq!(t.host(t.host_named("h1").unwrap()).region, "r1");
    assert_eq!(t.vpc(VpcId(0)).region, None);
    assert_eq!(t.vpc(VpcId(1)).region.as_deref(), Some("r1"));
}

/// An `[[expect]]` from web-1 to web-2 (lines END + 1 to END + 4), then `extra` (protocol
/// on END + 5, port on END + 6).
const fn expect(extra: &'static str) -> [Edit; 2] {
    [
        Append("[[expect]]\nfrom = \"web-1\"\nto = \"web-2\"\nreach = true\n"),
        Append(extra),
    ]
}

#[test]
fn expectations() {
    const TCP: [Edit; 2] = expect("protocol = \"tcp\"\n");
    const UDP: [Edit; 2] = expect("protocol = \"udp\"\n");
    const ICMP_PORT: [Edit; 2] = expect("protocol = \"icmp\"\nport = 80\n");
    const PORT_0: [Edit; 2] = expect("protocol = \"tcp\"\nport = 0\n");
    const PORT_65536: [Edit; 2] = expect("protocol = \"udp\"\nport = 65536\n");
    const ALL: [Edit; 2] = expect("protocol = \"all\"\n");
    let item = "expect #1 (web-1 -> web-2)";
    check(&[
        case(&TCP, (END + 5, 12), item, "tcp needs a port"),
        case(&UDP, (END + 5, 12), item, "udp needs a port"),
        case(&ICMP_PORT, (END + 6, 8), item, "icmp takes no port"),
        case(
            &PORT_0,
            (END + 6, 8),
            item,
            "port 0 is out of range 1..=65535",
        ),
        case(
            &PORT_65536,
            (END + 6, 8),
            item,
            "port 65536 is out of range",
        ),
        case(
            &ALL,
            (END + 5, 12),
            item,
            r#"protocol "all" is not one of icmp, tcp, udp"#,
        ),
        case(
            &[Append(
                "[[expect]]\nfrom = \"web-1\"\nto = \"nobody\"\nprotocol = \"icmp\"\nreach = true\n",
            )],
            (END + 3, 6),
            "expect #1 (web-1 -> nobody)",
            r#"to "nobody" is neither an instance nor an address"#,
        ),
        case(
            &[Append(
                "[[expect]]\nfrom = \"web-1\"\nto = \"10.1.1\"\nprotocol = \"icmp\"\nreach = true\n",
            )],
            (END + 3, 6),
            "expect #1 (web-1 -> 10.1.1)",
            r#"to "10.1.1" is neither an instance nor an address"#,
        ),
    ]);

    // Valid ones: an instance, an address, each protocol; the line is the [[expect]] header's.
    let t = valid(&apply(&[
        Append(
            "[[expect]]\nfrom = \"web-1\"\nto = \"web-2\"\nprotocol = \"TCP\"\nport = 443\nreach = true\n",
        ),
        Append(
            "[[expect]]\nfrom = \"web-2\"\nto = \"203.0.113.7\"\nprotocol = \"icmp\"\nreach = false\n",
        ),
    ]));
    let (web1, web2) = (
        t.instance_named("web-1").unwrap(),
        t.instance_named("web-2").unwrap(),
    );
    let e = &t.expects[0];
    assert_eq!(
        (e.from, &e.to),
        (ExpectSource::Instance(web1), &ExpectTarget::Instance(web2))
    );
    assert_eq!(
        (e.protocol, e.port, e.reach, e.line),
        (Protocol::Tcp, Some(443), true, END + 1)
    );
    let e = &t.expects[1];
    assert_eq!(e.to, ExpectTarget::Address(Ipv4Addr::new(203, 0, 113, 7)));
    assert_eq!(
        (e.protocol, e.port, e.reach, e.line),
        (Protocol::Icmp, None, false, END + 7)
    );
}

#[test]
fn underlay() {
    check(&[
        case(
            &[Append("[underlay]\ntransport = \"vxlan\"\n")],
            (END + 2, 13),
            "[underlay]",
            r#"transport "vxlan" is neither "gre" nor "gre-udp""#,
        ),
        // The smallest MTU leaves 576 bytes to the instance.
        case(
            &[Append("[underlay]\nmtu = 603\n")],
            (END + 2, 7),
            "[underlay]",
            "mtu 603 is out of range 604..=65535",
        ),
        case(
            &[Append("[underlay]\ntransport = \"gre-udp\"\nmtu = 611\n")],
            (END + 3, 7),
            "[underlay]",
            "mtu 611 is out of range 612..=65535",
        ),
        case(
            &[Append("[underlay]\nchecksum = true\nmtu = 607\n")],
            (END + 3, 7),
            "[underlay]",
            "mtu 607 is out of range 608..=65535",
        ),
        case(
            &[Append("[underlay]\nmtu = 65536\n")],
            (END + 2, 7),
            "[underlay]",
            "mtu 65536 is out of range",
        ),
        // The instances' MTU fits the underlay's, their overhead added.
        case(
            &[Append("[underlay]\nmtu = 9000\ninstance_mtu = 8973\n")],
            (END + 3, 16),
            "[underlay]",
            "instance_mtu 8973 is out of range 576..=8972",
        ),
        case(
            &[Append("[underlay]\ninstance_mtu = 575\n")],
            (END + 2, 16),
            "[underlay]",
            "instance_mtu 575 is out of range 576..=1472",
        ),
    ]);
    let u = |extra: &str| valid(&format!("{BASE}{extra}")).underlay;
    let d = u("");
    assert_eq!(
        (d.transport, d.mtu, d.checksum),
        (Transport::Gre, 1500, false)
    );
    assert_eq!(d.instance_mtu(), 1472);
    assert_eq!(u("[underlay]\n"), d);
    assert_eq!(u("[underlay]\ntransport = \"gre\"\nmtu = 1500\n"), d);
    for (extra, transport, mtu, instance_mtu) in [
        ("transport = \"gre-udp\"\n", Transport::GreUdp, 1500, 1464),
        ("checksum = true\n", Transport::Gre, 1500, 1468),
        (
            "transport = \"gre-udp\"\nchecksum = true\n",
            Transport::GreUdp,
            1500,
            1460,
        ),
        ("mtu = 9000\n", Transport::Gre, 9000, 1472),
        (
            "mtu = 9000\ninstance_mtu = 8972\n",
            Transport::Gre,
            9000,
            8972,
        ),
        (
            "mtu = 1400\ninstance_mtu = 576\n",
            Transport::Gre,
            1400,
            576,
        ),
        ("mtu = 604\n", Transport::Gre, 604, 576),
        (
            "transport = \"gre-udp\"\nmtu = 612\n",
            Transport::GreUdp,
            612,
            576,
        ),
        ("mtu = 65535\n", Transport::Gre, 65535, 1472),
        (
            "transport = \"gre-udp\"\nmtu = 9000\n",
            Transport::GreUdp,
            9000,
            1464,
        ),
    ] {
        let got = u(&format!("[underlay]\n{extra}"));
        assert_eq!(
            (got.transport, got.mtu, got.instance_mtu()),
            (transport, mtu, instance_mtu),
            "{extra}"
        );
    }
    assert_eq!(Transport::GreUdp.word(), "gre-udp");
}

#[test]
fn conntrack() {
    check(&[
        case(
            &[Append("[conntrack]\nmax_entries = 15\n")],
            (END + 2, 15),
            "[conntrack]",
            "max_entries 15 is out of range 16..=67108863",
        ),
        case(
            &[Append("[conntrack]\nmax_entries = 67108864\n")],
            (END + 2, 15),
            "[conntrack]",
            "max_entries 67108864 is out of range",
        ),
        case(
            &[Append("[conntrack]\nmax_per_instance = 0\n")],
            (END + 2, 20),
            "[conntrack]",
            "max_per_instance 0 is out of range 1..=67108863",
        ),
        case(
            &[Append("[conntrack]\nflow_cache = 15\n")],
            (END + 2, 14),
            "[conntrack]",
            "flow_cache 15 is out of range 16..=16777215",
        ),
        case(
            &[Append("[conntrack]\nflow_cache = 16777216\n")],
            (END + 2, 14),
            "[conntrack]",
            "flow_cache 16777216 is out of range",
        ),
    ]);
    // Every bad value is reported.
    let e = invalid(&format!(
        "{BASE}[conntrack]\nmax_entries = 0\nmax_per_instance = 0\nflow_cache = 0\n"
    ));
    assert_eq!(
        e.iter().map(|e| e.line).collect::<Vec<_>>(),
        [END + 2, END + 3, END + 4],
        "{}",
        render(&e)
    );

    let c = |extra: &str| valid(&format!("{BASE}[conntrack]\n{extra}")).conntrack;
    let d = valid(BASE).conntrack;
    assert_eq!(
        (d.max_entries, d.max_per_instance, d.flow_cache),
        (262_144, 65_536, 65_536)
    );
    assert_eq!(c(""), d);
    // The flow cache is rounded up to a power of two.
    for (given, slots) in [
        (16, 16),
        (17, 32),
        (1000, 1024),
        (65_536, 65_536),
        ((1 << 24) - 1, 1 << 24),
    ] {
        assert_eq!(
            c(&format!("flow_cache = {given}\n")).flow_cache,
            slots,
            "{given}"
        );
    }
    // The per-instance cap never exceeds the table.
    assert_eq!(c("max_entries = 100\n").max_per_instance, 100);
    let t = c("max_entries = 16\nmax_per_instance = 1\n");
    assert_eq!((t.max_entries, t.max_per_instance), (16, 1));
    let t = c("max_entries = 67108863\nmax_per_instance = 67108863\n");
    assert_eq!(
        (t.max_entries, t.max_per_instance),
        (67_108_863, 67_108_863)
    );
}

#[test]
fn every_error_is_reported_in_file_order() {
    let errors = invalid(&apply(&[
        // Checked last (instances), on line 60.
        Replace(r#"host = "h1""#, r#"host = "h9""#),
        // Checked second (VPCs), on line 19.
        Replace(r#"tenant = "bob""#, r#"tenant = """#),
        // Checked with the ACLs, on line 46.
        Replace("port = 22,", "port = 0,"),
        // Checked first (hosts), at the end of the file.
        Append("[[host]]\nname = \"h3\"\naddress = \"192.0.2.1\"\n"),
        // Expectations, after everything.
        Append("[[expect]]\nfrom = \"web-1\"\nto = \"web-2\"\nprotocol = \"tcp\"\nreach = true\n"),
    ]));
    let got: Vec<(usize, &str)> = errors
        .iter()
        .map(|e| (e.line, e.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (19, "tenant is empty"),
            (
                46,
                r#"port "0" is not a port (1-65535), a range a-b, or a list a,b"#
            ),
            (60, r#"unknown host "h9""#),
            (END + 3, r#"address 192.0.2.1 is already host "h1"'s"#),
            (END + 7, "tcp needs a port"),
        ],
        "{}",
        render(&errors)
    );
}

#[test]
fn one_item_reports_all_its_problems() {
    // Both references of a subnet.
    let e = invalid(&apply(&[
        Replace(r#"route_table = "rta""#, r#"route_table = "rtx""#),
        Replace(r#"acl = "acla""#, r#"acl = "aclx""#),
    ]));
    assert_eq!(
        e.iter().map(|e| (e.line, e.column)).collect::<Vec<_>>(),
        [(27, 15), (28, 7)],
        "{}",
        render(&e)
    );
    // A subnet bound to another VPC's table and ACL.
    let e = invalid(&apply(&[Replace(
        r#"cidr = "10.1.1.0/24""#,
        "cidr = \"10.1.1.0/24\"\nroute_table = \"rta\"\nacl = \"acla\"",
    )]));
    assert_eq!(
        e.iter().map(|e| e.line).collect::<Vec<_>>(),
        [34, 35],
        "{}",
        render(&e)
    );
    // An instance without a subnet, an ip or security groups.
    let e = invalid(&format!(
        "{BASE}[[instance]]\nname = \"web-3\"\nhost = \"h1\"\n"
    ));
    let messages: Vec<&str> = e.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(e.len(), 3, "{}", render(&e));
    assert!(messages.iter().any(|m| m.contains("needs a subnet")));
    assert!(messages.iter().any(|m| m.contains("needs an ip")));
    assert!(
        messages
            .iter()
            .any(|m| m.contains("at least one security group"))
    );
    assert!(e.iter().all(|e| e.line == END + 1));
    // A rule with a bad action, port and peer.
    let e = invalid(&BASE.replace(
        r#"{ action = "accept", protocol = "tcp", port = "80,443", source = "0.0.0.0/0" }"#,
        r#"{ action = "permit", protocol = "tcp", port = "99999", source = "sg:nope" }"#,
    ));
    assert_eq!(
        e.iter().map(|e| (e.line, e.column)).collect::<Vec<_>>(),
        [(53, 14), (53, 49), (53, 67)],
        "{}",
        render(&e)
    );
}

#[test]
fn errors_display_with_file_line_column_and_item() {
    let err = Topology::parse(&BASE.replace(r#"host = "h1""#, r#"host = "h9""#), FILE).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"lab.toml:60:8: instance "web-1": unknown host "h9""#
    );
    assert_eq!(err.errors().len(), 1);
    let syntax = TopologyError {
        file: "f".into(),
        line: 0,
        column: 0,
        item: String::new(),
        message: "m".into(),
    };
    assert_eq!(syntax.to_string(), "f: m");
    let two = LoadError::Invalid(vec![syntax.clone(), syntax]);
    assert_eq!(two.to_string(), "f: m\nf: m");
}

fn keys(t: &Topology) -> Vec<(String, u32)> {
    let mut k: Vec<(String, u32)> = t.vpcs.iter().map(|v| (v.name.clone(), v.key)).collect();
    k.sort();
    k
}

#[test]
fn auto_keys_are_deterministic_and_stable() {
    let a = valid(BASE);
    let b = valid(BASE);
    assert_eq!(keys(&a), keys(&b));
    let (va, vb) = (&a.vpcs[0], &a.vpcs[1]);
    assert_eq!((va.key, va.key_assigned), (100, false));
    assert!(vb.key_assigned);
    assert!(
        vb.key >= 0x0100_0000,
        "assigned keys stay clear of small ones: {}",
        vb.key
    );

    // Adding a VPC, before or after the others, does not renumber them.
    let before = valid(&BASE.replace(
        "[[vpc]]\nname = \"va\"",
        &format!("{VC}\n[[vpc]]\nname = \"va\""),
    ));
    let after = valid(&format!("{BASE}{VC}"));
    for t in [&before, &after] {
        let k = keys(t);
        assert!(
            k.contains(&("va".into(), 100)) && k.contains(&("vb".into(), vb.key)),
            "{k:?}"
        );
        let vc = k.iter().find(|(n, _)| n == "vc").unwrap().1;
        assert!(vc != 100 && vc != vb.key);
    }
    assert_eq!(keys(&before), keys(&after));
}

/// Two VPC names whose derived keys are equal (FNV-1a, 24 bits).
fn colliding_names() -> (String, String) {
    let fnv = |s: &str| {
        s.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        }) & 0x00ff_ffff
    };
    let mut seen = std::collections::HashMap::new();
    (0..)
        .find_map(|i| {
            let name = format!("v{i}");
            seen.insert(fnv(&name), name.clone())
                .map(|other| (other, name))
        })
        .unwrap()
}

#[test]
fn an_explicit_key_equal_to_a_derived_one_is_an_error_naming_both() {
    let vb_key = valid(BASE).vpcs[1].key;
    // vc claims vb's derived key: an error at vc's key, naming vb; vb never moves.
    let e = invalid(&format!("{BASE}{VC}key = {vb_key}\n"));
    assert_eq!(e.len(), 1, "{}", render(&e));
    assert_eq!((e[0].line, e[0].column), (END + 5, 7));
    assert_eq!(e[0].item, "the key of vpc \"vc\"");
    assert_eq!(
        e[0].message,
        format!(
            "key {vb_key} is also the key vpc \"vb\" derives from its name: choose another key"
        )
    );
    // Written before vb in the file: the same error, still at the written key.
    let first = BASE.replace(
        "[[vpc]]\nname = \"vb\"",
        &format!("{VC}key = {vb_key}\n\n[[vpc]]\nname = \"vb\""),
    );
    let e = invalid(&first);
    assert_eq!(e.len(), 1, "{}", render(&e));
    assert_eq!(e[0].item, "the key of vpc \"vc\"");
    assert!(
        e[0].message.contains("vpc \"vb\" derives"),
        "{}",
        render(&e)
    );
}

#[test]
fn two_names_deriving_one_key_are_an_error_naming_both() {
    let (a, b) = colliding_names();
    let mut text = String::new();
    for name in [&a, &b] {
        text.push_str(&format!(
            "[[vpc]]\nname = \"{name}\"\ntenant = \"t\"\ncidr = \"10.0.0.0/16\"\n"
        ));
    }
    let e = invalid(&text);
    assert_eq!(e.len(), 1, "{}", render(&e));
    assert_eq!(e[0].line, 6, "{}", render(&e));
    assert!(
        e[0].message.contains(&format!("vpc \"{a}\"")),
        "{}",
        render(&e)
    );
    assert!(
        e[0].message.contains(&format!("vpc \"{b}\"")),
        "{}",
        render(&e)
    );
    assert!(e[0].message.contains("give the VPC a key of its own"));
    // Either one with a key of its own is valid, and the other keeps its derived key.
    let fixed = format!("{text}key = 5\n");
    let t = valid(&fixed);
    assert_eq!(t.vpcs[1].key, 5);
    assert_eq!(
        t.vpcs[0].key,
        valid(
            &text
                .split("[[vpc]]")
                .nth(1)
                .map(|v| format!("[[vpc]]{v}"))
                .unwrap()
        )
        .vpcs[0]
            .key
    );
}

#[test]
fn every_channel_has_a_key_of_its_own_derived_from_its_names() {
    let text = format!(
        "{BASE}{CLASSIC}[[peering]]\nname = \"p\"\nvpcs = [\"va\", \"vb\"]\n[[interconnect]]\ninstance = \"classic-1\"\nvpc = \"va\"\n"
    );
    let t = valid(&text);
    let mut keys: Vec<(u32, String)> = t.channels().map(|(k, c)| (k, t.channel_name(c))).collect();
    keys.sort();
    let names: Vec<&str> = keys.iter().map(|(_, n)| n.as_str()).collect();
    let mut want = vec![
        "vpc:va",
        "vpc:vb",
        "peering:p>va",
        "peering:p>vb",
        "interconnect:va>vpc",
        "interconnect:va>basic",
        "internet:va>in",
        "internet:va>out",
        "internet:vb>in",
        "internet:vb>out",
        "internet:basic>in",
        "internet:basic>out",
    ];
    want.sort();
    let mut got = names.clone();
    got.sort();
    assert_eq!(got, want);
    for (k, c) in t.channels() {
        assert_eq!(t.channel(k), Some(c));
        assert_eq!(t.key_of(c), Some(k));
    }
    // Each key depends on its own names only: another VPC, peering or instance changes none.
    let more = format!("{text}{VC}[[peering]]\nname = \"q\"\nvpcs = [\"va\", \"vc\"]\n");
    let t2 = valid(&more);
    for (k, name) in &keys {
        assert_eq!(
            t2.channel(*k).map(|c| t2.channel_name(c)).as_deref(),
            Some(name.as_str())
        );
    }
    assert_eq!(
        t.peerings[0].keys,
        [
            t.key_of(Channel::Peering {
                peering: PeeringId(0),
                to: VpcId(0)
            })
            .unwrap(),
            t.key_of(Channel::Peering {
                peering: PeeringId(0),
                to: VpcId(1)
            })
            .unwrap()
        ]
    );
}

#[test]
fn compiled_lookups() {
    let t = valid(&format!("{BASE}{}", WEB3.replace("10.0.1.11", "10.0.1.20")));
    let (h1, h2) = (t.host_named("h1").unwrap(), t.host_named("h2").unwrap());
    assert_eq!(t.host_by_address(Ipv4Addr::new(192, 0, 2, 1)), Some(h1));
    assert_eq!(t.host_by_address(Ipv4Addr::new(192, 0, 2, 2)), Some(h2));
    assert_eq!(t.host_by_address(Ipv4Addr::new(192, 0, 2, 3)), None);
    assert_eq!(t.host(h2).address, Ipv4Addr::new(192, 0, 2, 2));

    let (va, vb) = (VpcId(0), VpcId(1));
    assert_eq!(t.vpc_by_key(100), Some(va));
    assert_eq!(t.vpc_by_key(t.vpc(vb).key), Some(vb));
    assert_eq!(t.vpc_by_key(101), None);

    let web1 = t.instance_named("web-1").unwrap();
    let web2 = t.instance_named("web-2").unwrap();
    let web3 = t.instance_named("web-3").unwrap();
    assert_eq!(t.instance_at(va, Ipv4Addr::new(10, 0, 1, 10)), Some(web1));
    assert_eq!(t.instance_at(va, Ipv4Addr::new(10, 0, 1, 20)), Some(web3));
    assert_eq!(t.instance_at(vb, Ipv4Addr::new(10, 1, 1, 10)), Some(web2));
    assert_eq!(t.instance_at(vb, Ipv4Addr::new(10, 0, 1, 10)), None);
    assert_eq!(t.instance_named("web-9"), None);
    assert_eq!(t.instances_on(h1).collect::<Vec<_>>(), [web1, web3]);
    assert_eq!(t.instances_on(h2).collect::<Vec<_>>(), [web2]);

    let i1 = t.instance(web1);
    assert_eq!(
        i1.network,
        Network::Vpc {
            vpc: va,
            subnet: SubnetId(0)
        }
    );
    assert_eq!(
        (i1.vpc(), i1.subnet(), i1.host),
        (Some(va), Some(SubnetId(0)), h1)
    );
    assert_eq!(i1.netns.as_deref(), Some("ns-web-1"));
    assert_eq!(t.instance(web2).netns, None);
    assert_eq!(i1.security_groups, [SgId(0)]);

    // Subnets: gateways, and the tables they use.
    let (sa, sb) = (t.subnet(SubnetId(0)), t.subnet(SubnetId(1)));
    assert_eq!(sa.gateway, Ipv4Addr::new(10, 0, 1, 1));
    assert_eq!(sb.gateway, Ipv4Addr::new(10, 1, 1, 1));
    assert_eq!((sa.vpc, sb.vpc), (va, vb));
    assert_eq!(sa.acl, Some(AclId(0)));
    assert_eq!(sb.acl, None);
    assert_eq!(t.route_tables[sa.route_table.index()].name, "rta");
    let default = &t.route_tables[sb.route_table.index()];
    assert_eq!(sb.route_table, t.vpc(vb).default_route_table);
    assert!(default.implicit);
    assert_eq!((default.name.as_str(), default.vpc), ("vb/default", vb));
    assert!(default.routes.as_slice().is_empty());
    let va_default = &t.route_tables[t.vpc(va).default_route_table.index()];
    assert_eq!(
        (va_default.name.as_str(), va_default.vpc),
        ("va/default", va)
    );
    assert_ne!(t.vpc(va).default_route_table, sa.route_table);

    // Rules keep their lines.
    assert_eq!(t.acls[0].ingress[0].line, 46);
    assert_eq!(t.acls[0].egress[0].line, 48);
    assert_eq!(t.security_groups[0].ingress[1].line, 54);
    assert_eq!(t.security_groups[0].ingress[1].peer, Peer::Group(SgId(0)));
    assert_eq!(t.acls[0].ingress_list.len(), 1);
}

#[test]
fn sg_peers_resolve_to_members_in_the_same_vpc() {
    // web-1 and web-3 in va, web-2 in vb: all three in sg-web.
    let t = valid(&format!("{BASE}{}", WEB3.replace("10.0.1.11", "10.0.1.20")));
    let inst = |n: &str| t.instance(t.instance_named(n).unwrap());
    let (web1, web2, web3) = (inst("web-1"), inst("web-2"), inst("web-3"));
    let icmp = |a: [u8; 4]| Subject {
        peer: a.into(),
        protocol: proto::ICMP,
        dport: None,
    };
    let tcp = |a: [u8; 4], port| Subject {
        peer: a.into(),
        protocol: proto::TCP,
        dport: Some(port),
    };
    let rule = |rule| {
        Outcome::Accepted(RuleOrigin {
            owner: SgId(0),
            rule,
        })
    };

    // Pings from members of the same VPC only: web-2 has the group but not the VPC.
    for (from, outcome) in [
        ([10, 0, 1, 10], rule(1)),
        ([10, 0, 1, 20], rule(1)),
        ([10, 1, 1, 10], Outcome::NoMatch),
        ([10, 0, 1, 30], Outcome::NoMatch),
    ] {
        assert_eq!(
            web1.ingress_rules.evaluate(&icmp(from)),
            outcome,
            "{from:?}"
        );
    }
    for (from, outcome) in [
        ([10, 1, 1, 10], rule(1)),
        ([10, 0, 1, 10], Outcome::NoMatch),
        ([10, 0, 1, 20], Outcome::NoMatch),
    ] {
        assert_eq!(
            web2.ingress_rules.evaluate(&icmp(from)),
            outcome,
            "{from:?}"
        );
    }
    // The port rule: 80 and 443 from anywhere, nothing else.
    assert_eq!(
        web1.ingress_rules.evaluate(&tcp([8, 8, 8, 8], 443)),
        rule(0)
    );
    assert_eq!(web1.ingress_rules.evaluate(&tcp([8, 8, 8, 8], 80)), rule(0));
    assert_eq!(
        web1.ingress_rules.evaluate(&tcp([8, 8, 8, 8], 22)),
        Outcome::NoMatch
    );
    assert_eq!(
        web1.egress_rules.evaluate(&tcp([8, 8, 8, 8], 22)),
        Outcome::Accepted(RuleOrigin {
            owner: SgId(0),
            rule: 0
        })
    );
    // Instances with the same groups in the same VPC share their lists; across VPCs they
    // cannot.
    assert!(Arc::ptr_eq(&web1.ingress_rules, &web3.ingress_rules));
    assert!(Arc::ptr_eq(&web1.egress_rules, &web3.egress_rules));
    assert!(!Arc::ptr_eq(&web1.ingress_rules, &web2.ingress_rules));
}

#[test]
fn the_shipped_example_is_valid() {
    let t = Topology::parse(
        include_str!("../../../../examples/two-tenants.toml"),
        "examples/two-tenants.toml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.hosts.len(), 2);
    assert_eq!(
        t.vpcs
            .iter()
            .map(|v| (v.name.as_str(), v.key))
            .collect::<Vec<_>>(),
        [("vpc-alice", 1001), ("vpc-bob", 2002)]
    );
    assert_eq!(t.instances.len(), 4);
    assert_eq!(t.expects.len(), 4);
    assert_eq!(t.underlay.instance_mtu(), 1472);
    // The same address in both tenants, told apart by VPC.
    let ip = Ipv4Addr::new(10, 0, 1, 10);
    assert_eq!(
        t.instance_at(t.vpc_by_key(1001).unwrap(), ip),
        t.instance_named("alice-web")
    );
    assert_eq!(
        t.instance_at(t.vpc_by_key(2002).unwrap(), ip),
        t.instance_named("bob-web")
    );
}

#[test]
fn columns_count_characters_and_crlf_files_are_fine() {
    // Four two-byte characters before the port: the column is the one an editor shows.
    check(&[case(
        &[Replace(
            r#"{ action = "accept", protocol = "tcp", port = "80,443""#,
            r#"{ description = "ünïcödé", action = "accept", protocol = "tcp", port = "80,0""#,
        )],
        (53, 74),
        r#"security_group "sg-web" ingress rule 1"#,
        r#"port "0" is not a port"#,
    )]);
    // Windows line endings change neither lines nor columns.
    let crlf = BASE.replace('\n', "\r\n");
    valid(&crlf);
    let e = invalid(&crlf.replace(r#"host = "h1""#, r#"host = "h9""#));
    assert_eq!((e[0].line, e[0].column), (60, 8), "{}", render(&e));
}

/// The basic network, the internet and interconnects, appended to [`BASE`]: the pool and the
/// internet (lines END+1 to END+6), a basic instance of alice's (END+7 to END+12).
const CLASSIC: &str = r#"[basic]
cidr = "10.128.0.0/16"
[internet]
cidr = "203.0.113.0/24"
gateway = "h1"
netns = "inet"
[[instance]]
name = "classic-1"
host = "h1"
network = "basic"
tenant = "alice"
security_groups = ["sg-web"]
"#;

#[test]
fn basic_network_internet_and_interconnects() {
    let e = END + 12;
    check(&[
        case(
            &[Append(CLASSIC), Append("ip = \"10.128.0.9\"\n")],
            (e + 1, 6),
            r#"instance "classic-1""#,
            "allocated by the provider",
        ),
        case(
            &[Append(CLASSIC), Append("subnet = \"sa\"\n")],
            (e + 1, 10),
            r#"instance "classic-1""#,
            "takes no subnet",
        ),
        case(
            &[
                Append(CLASSIC),
                Append(
                    "[[instance]]\nname = \"c2\"\nhost = \"h1\"\nnetwork = \"basic\"\nsecurity_groups = [\"sg-web\"]\n",
                ),
            ],
            (e + 1, 1),
            r#"instance "c2""#,
            "names its tenant",
        ),
        case(
            &[Append(
                "[[instance]]\nname = \"c2\"\nhost = \"h1\"\nnetwork = \"basic\"\ntenant = \"alice\"\nsecurity_groups = [\"sg-web\"]\n",
            )],
            (END + 4, 11),
            r#"instance "c2""#,
            "needs a [basic] section",
        ),
        case(
            &[
                Append(CLASSIC),
                Replace("cidr = \"10.128.0.0/16\"", "cidr = \"100.64.0.0/16\""),
            ],
            (END + 2, 8),
            "[basic]",
            "private range",
        ),
        case(
            &[Append(CLASSIC), Append("eip = \"198.51.100.1\"\n")],
            (e + 1, 7),
            r#"instance "classic-1""#,
            "outside [internet] cidr",
        ),
        case(
            &[Append(CLASSIC), Append("eip = \"203.0.113.1\"\n")],
            (e + 1, 7),
            r#"instance "classic-1""#,
            "the internet's own address",
        ),
        case(
            &[Append(CLASSIC), Append("eip = \"203.0.113.255\"\n")],
            (e + 1, 7),
            r#"instance "classic-1""#,
            "broadcast",
        ),
        case(
            &[
                Append(CLASSIC),
                Append("eip = \"203.0.113.7\"\n"),
                Replace(
                    "netns = \"ns-web-1\"",
                    "netns = \"ns-web-1\"\neip = \"203.0.113.7\"",
                ),
            ],
            (e + 2, 7),
            r#"instance "classic-1""#,
            r#"already bound to instance "web-1""#,
        ),
        case(
            &[Replace(
                "netns = \"ns-web-1\"",
                "netns = \"ns-web-1\"\neip = \"203.0.113.7\"",
            )],
            (65, 7),
            r#"instance "web-1""#,
            "needs an [internet] section",
        ),
        case(
            &[
                Append(CLASSIC),
                Replace("cidr = \"203.0.113.0/24\"", "cidr = \"10.200.0.0/16\""),
            ],
            (END + 4, 8),
            "[internet]",
            "is private",
        ),
        case(
            &[
                Append(CLASSIC),
                Replace("gateway = \"h1\"", "gateway = \"h9\""),
            ],
            (END + 5, 11),
            "[internet]",
            r#"unknown host "h9""#,
        ),
        case(
            &[
                Append(CLASSIC),
                Replace("netns = \"inet\"", "netns = \"ns-web-1\""),
            ],
            (64, 9),
            r#"instance "web-1""#,
            "is already [internet]'s",
        ),
        // Interconnects.
        case(
            &[
                Append(CLASSIC),
                Append("[[interconnect]]\ninstance = \"web-1\"\nvpc = \"va\"\n"),
            ],
            (e + 2, 12),
            "interconnect (web-1 -> va)",
            "is not in the basic network",
        ),
        case(
            &[
                Append(CLASSIC),
                Append("[[interconnect]]\ninstance = \"classic-1\"\nvpc = \"vb\"\n"),
            ],
            (e + 3, 7),
            "interconnect (classic-1 -> vb)",
            "one tenant",
        ),
        case(
            &[
                Append(CLASSIC),
                Append(
                    "[[vpc]]\nname = \"va3\"\ntenant = \"alice\"\ncidr = \"10.3.0.0/16\"\nregion = \"r2\"\n",
                ),
                Append("[[interconnect]]\ninstance = \"classic-1\"\nvpc = \"va3\"\n"),
            ],
            (e + 8, 7),
            "interconnect (classic-1 -> va3)",
            "one region",
        ),
        case(
            &[
                Append(CLASSIC),
                Append("[[interconnect]]\ninstance = \"classic-1\"\nvpc = \"va\"\n"),
                Replace("cidr = \"10.128.0.0/16\"", "cidr = \"10.0.0.0/12\""),
            ],
            (e + 3, 7),
            "interconnect (classic-1 -> va)",
            "overlaps the basic pool",
        ),
        case(
            &[
                Append(CLASSIC),
                Append("[[interconnect]]\ninstance = \"classic-1\"\nvpc = \"va\"\n"),
                Append("[[vpc]]\nname = \"va2\"\ntenant = \"alice\"\ncidr = \"10.2.0.0/16\"\n"),
                Append("[[interconnect]]\ninstance = \"classic-1\"\nvpc = \"va2\"\n"),
            ],
            (e + 8, 1),
            "interconnect (classic-1 -> va2)",
            r#"already linked to vpc "va""#,
        ),
        case(
            &[Append(
                "[[expect]]\nfrom = \"internet\"\nto = \"web-1\"\nprotocol = \"icmp\"\nreach = true\n",
            )],
            (END + 2, 8),
            "expect #1",
            r#"unknown instance "internet""#,
        ),
    ]);

    // Valid: addresses come from the pool, deterministically, never reserved ones.
    let text = apply(&[
        Append(CLASSIC),
        Append("eip = \"203.0.113.10\"\n"),
        Append(
            "[[instance]]\nname = \"classic-2\"\nhost = \"h2\"\nnetwork = \"basic\"\ntenant = \"bob\"\nsecurity_groups = [\"sg-web\"]\n",
        ),
        Append("[[interconnect]]\ninstance = \"classic-1\"\nvpc = \"va\"\n"),
        Append(
            "[[expect]]\nfrom = \"internet\"\nto = \"203.0.113.10\"\nprotocol = \"icmp\"\nreach = true\n",
        ),
    ]);
    let t = valid(&text);
    let again = valid(&text);
    let pool: ipnet::Ipv4Net = "10.128.0.0/16".parse().unwrap();
    let c1 = t.instance_named("classic-1").unwrap();
    let c2 = t.instance_named("classic-2").unwrap();
    for id in [c1, c2] {
        let ip = t.instance(id).ip;
        assert!(pool.contains(&ip));
        assert!(
            ip != pool.network() && ip != Ipv4Addr::new(10, 128, 0, 1) && ip != pool.broadcast()
        );
        assert_eq!(again.instance(id).ip, ip, "deterministic");
        assert!(t.instance(id).is_basic());
        assert_eq!(t.instance(id).prefix, 16);
        assert_eq!(t.instance_in(Space::Basic, ip), Some(id));
    }
    assert_ne!(t.instance(c1).ip, t.instance(c2).ip);
    assert_eq!(t.eip_owner(Ipv4Addr::new(203, 0, 113, 10)), Some(c1));
    assert_eq!(t.linked_vpc(c1), Some(VpcId(0)));
    assert_eq!(t.linked_vpc(c2), None);
    let inet = t.internet.as_ref().unwrap();
    assert_eq!(
        (inet.client, inet.gateway, inet.netns.as_deref()),
        (Ipv4Addr::new(203, 0, 113, 1), HostId(0), Some("inet"))
    );
    assert_eq!(t.expects[0].from, ExpectSource::Internet);
    // Adding an instance does not move the others (unless it collides).
    let more = format!(
        "{text}[[instance]]\nname = \"classic-3\"\nhost = \"h2\"\nnetwork = \"basic\"\ntenant = \"bob\"\nsecurity_groups = [\"sg-web\"]\n"
    );
    let t3 = valid(&more);
    assert_eq!(t3.instance(c1).ip, t.instance(c1).ip);
    assert_eq!(t3.instance(c2).ip, t.instance(c2).ip);
    // sg: peers of a basic instance are the basic members of the group.
    let web1 = t.instance_named("web-1").unwrap();
    let icmp = |peer| Subject {
        peer,
        protocol: proto::ICMP,
        dport: None,
    };
    let c2_ip = t.instance(c2).ip;
    assert!(matches!(
        t.instance(c1).ingress_rules.evaluate(&icmp(c2_ip)),
        Outcome::Accepted(_)
    ));
    assert_eq!(
        t.instance(web1).ingress_rules.evaluate(&icmp(c2_ip)),
        Outcome::NoMatch
    );
}

/// A small pool (13 usable addresses) and basic instances whose names probe into neighbouring
/// slots: without a record, the second one's address depends on the first one's presence.
fn small_pool(names: &[&str], migrated: Option<&str>) -> String {
    let mut text = format!(
        "{BASE}[basic]\ncidr = \"10.128.0.0/28\"\n[[subnet]]\nname = \"sa2\"\nvpc = \"va\"\ncidr = \"10.0.2.0/24\"\n"
    );
    for n in names {
        if Some(*n) == migrated {
            text.push_str(&format!(
                "[[instance]]\nname = \"{n}\"\nhost = \"h1\"\nsubnet = \"sa2\"\nip = \"10.0.2.9\"\nsecurity_groups = [\"sg-web\"]\n"
            ));
        } else {
            text.push_str(&format!(
                "[[instance]]\nname = \"{n}\"\nhost = \"h1\"\nnetwork = \"basic\"\ntenant = \"alice\"\nsecurity_groups = [\"sg-web\"]\n"
            ));
        }
    }
    text
}

/// Two names that hash to the same slot of a 13-address pool.
fn same_slot() -> (String, String) {
    let slot = |s: &str| {
        s.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        }) % 13
    };
    let mut seen = std::collections::HashMap::new();
    (0..)
        .find_map(|i| {
            let n = format!("c{i}");
            seen.insert(slot(&n), n.clone()).map(|o| (o, n))
        })
        .unwrap()
}

fn locked(text: &str, lock: &Allocations) -> Result<Topology, Vec<TopologyError>> {
    Topology::parse_locked(text, FILE, lock).map_err(|e| e.errors().to_vec())
}

fn ip_of(t: &Topology, name: &str) -> Ipv4Addr {
    t.instance(t.instance_named(name).unwrap()).ip
}

#[test]
fn a_basic_address_never_moves_once_the_lock_records_it() {
    let (a, b) = same_slot();
    let both = valid(&small_pool(&[&a, &b], None));
    assert_eq!(both.unlocked.len(), 2, "{:?}", both.unlocked);
    let lock = both.allocations.clone();
    // Without a record, b's address depends on a: alone it takes a's slot.
    let alone = valid(&small_pool(&[&b], None));
    assert_ne!(ip_of(&alone, &b), ip_of(&both, &b));
    // With the lock, b keeps its address when a leaves, migrates, or comes back in another order.
    for text in [
        small_pool(&[&b], None),
        small_pool(&[&a, &b], Some(&a)),
        small_pool(&[&b, &a], None),
    ] {
        let t = locked(&text, &lock).unwrap();
        assert_eq!(ip_of(&t, &b), ip_of(&both, &b));
    }
    let t = locked(&small_pool(&[&b, &a], None), &lock).unwrap();
    assert!(t.unlocked.is_empty(), "{:?}", t.unlocked);
    assert_eq!(ip_of(&t, &a), ip_of(&both, &a));
    // A newcomer never takes an address the lock holds, even one of an instance that left.
    let t = locked(&small_pool(&[&b, "newcomer"], None), &lock).unwrap();
    let n = ip_of(&t, "newcomer");
    assert!(n != ip_of(&both, &a) && n != ip_of(&both, &b));
    assert_eq!(
        t.unlocked,
        vec![format!("basic instance newcomer: address {n}")]
    );
    // The lock round-trips through its file and compiles to the same addresses.
    let reread = Allocations::parse(&lock.render(FILE), "lab.lock").unwrap();
    assert_eq!(reread, lock);
}

#[test]
fn migration_is_recorded_and_one_way() {
    let (a, b) = same_slot();
    let lock = valid(&small_pool(&[&a, &b], None)).allocations;
    let moved = locked(&small_pool(&[&a, &b], Some(&a)), &lock).unwrap();
    assert_eq!(ip_of(&moved, &a), Ipv4Addr::new(10, 0, 2, 9));
    assert_eq!(
        moved.unlocked,
        vec![format!(
            "instance {a}: moved from the basic network into a VPC (one-way)"
        )]
    );
    assert!(moved.allocations.basic[&a].migrated);
    // Back into the basic network: refused, at the instance's network key.
    let e = locked(&small_pool(&[&a, &b], None), &moved.allocations).unwrap_err();
    assert_eq!(e.len(), 1, "{}", render(&e));
    assert!(
        e[0].message.contains("migration is one-way"),
        "{}",
        render(&e)
    );
    assert_eq!(e[0].item, format!("instance \"{a}\""));
    // Its old address stays reserved: nobody else gets it.
    let t = locked(
        &small_pool(&[&b, "x1", "x2", "x3"], Some(&a)),
        &moved.allocations,
    )
    .unwrap();
    for n in ["x1", "x2", "x3"] {
        assert_ne!(ip_of(&t, n), ip_of(&valid(&small_pool(&[&a], None)), &a));
    }
}

#[test]
fn a_lock_the_pool_cannot_honour_is_an_error() {
    let (a, _) = same_slot();
    let lock = valid(&small_pool(&[&a], None)).allocations;
    let text = small_pool(&[&a], None).replace("10.128.0.0/28", "10.129.0.0/28");
    let e = locked(&text, &lock).unwrap_err();
    assert!(
        e[0].message
            .contains("the pool cannot change under allocated addresses"),
        "{}",
        render(&e)
    );
    // A full pool names the entries of instances that left.
    let many: Vec<String> = (0..13).map(|i| format!("n{i}")).collect();
    let names: Vec<&str> = many.iter().map(String::as_str).collect();
    let lock = valid(&small_pool(&names, None)).allocations;
    let e = locked(
        &small_pool(&[&names[..12], &["late"]].concat(), None),
        &lock,
    )
    .unwrap_err();
    assert!(
        e[0].message.contains(
            "is full: 13 addresses are allocated (1 of them to instances no longer in this file"
        ),
        "{}",
        render(&e)
    );
}

#[test]
fn appliances_and_subnet_routes() {
    let fw = "[[subnet]]\nname = \"sa2\"\nvpc = \"va\"\ncidr = \"10.0.2.0/24\"\n[[instance]]\nname = \"fw\"\nhost = \"h1\"\nsubnet = \"sa2\"\nip = \"10.0.2.10\"\nsecurity_groups = [\"sg-web\"]\nsource_check = false\n";
    let t = valid(&format!("{BASE}{fw}"));
    let id = t.instance_named("fw").unwrap();
    assert!(!t.instance(id).source_check);
    assert!(t.instance(t.instance_named("web-1").unwrap()).source_check);
    assert!(
        t.key_of(Channel::Appliance(id))
            .is_some_and(|k| k >> 24 == 5)
    );
    // A route for a subnet's exact CIDR to an appliance is valid ...
    let route = |dest: &str, hop: &str| {
        format!("{BASE}{fw}").replace(
            "{ destination = \"0.0.0.0/0\", next_hop = \"instance:web-1\" },",
            &format!("{{ destination = \"{dest}\", next_hop = \"{hop}\" }},"),
        )
    };
    let t = valid(&route("10.0.2.0/24", "instance:fw"));
    let rt = &t.route_tables[t.subnet(SubnetId(0)).route_table.index()];
    assert_eq!(rt.routes.as_slice()[0].next_hop, NextHop::Instance(id));
    // ... to anything else, or for another block inside the VPC, it is not.
    let e = invalid(&route("10.0.2.0/24", "drop"));
    assert!(
        e[0].message
            .contains("leads to an appliance (instance:NAME) only"),
        "{}",
        render(&e)
    );
    let e = invalid(&route("10.0.2.0/25", "instance:fw"));
    assert!(
        e[0].message.contains("the local route always wins"),
        "{}",
        render(&e)
    );
    // The basic network has no routes to forward through an appliance.
    let e = invalid(&format!("{BASE}{CLASSIC}source_check = false\n"));
    assert!(
        e[0].message
            .contains("source_check = false is for appliances in a VPC"),
        "{}",
        render(&e)
    );
}
