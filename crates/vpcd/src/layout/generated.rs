//! Generated regions, for the share tests and the scale simulation (`examples/store-sim.rs`):
//! tenants with a VPC each (overlapping CIDRs), two subnets, an ACL, two security groups
//! naming each other, a few basic-network instances, some peerings and interconnects, and a
//! few Elastic IPs, spread over the hosts.

use std::fmt::Write as _;

/// The shape of a generated region.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Instances in all (about: whole tenants are made).
    pub instances: usize,
    /// Hosts.
    pub hosts: usize,
    /// Instances per VPC.
    pub per_vpc: usize,
    /// Basic-network instances per tenant.
    pub per_basic: usize,
}

impl Shape {
    /// `instances` over `hosts`, in VPCs of 50 and 5 basic instances per tenant.
    pub fn new(instances: usize, hosts: usize) -> Shape {
        Shape {
            instances,
            hosts: hosts.max(1),
            per_vpc: 50,
            per_basic: 5,
        }
    }

    /// The number of tenants.
    pub fn tenants(&self) -> usize {
        (self.instances / (self.per_vpc + self.per_basic)).max(1)
    }
}

/// The topology text of a region of this shape. Tenant `k` has `vpc-k` (10.(k mod 128).0.0/16,
/// so tenants overlap), peered with `vpc-(k+1)` when `k` is a multiple of 10, and
/// interconnected with its first basic instance when `k` is a multiple of 7; a tenant's
/// instances run on a window of 10 hosts ([`place`]); the first VPC instance of each of the
/// first 200 tenants has an Elastic IP.
pub fn region(s: &Shape) -> String {
    let mut out = String::with_capacity(s.instances * 200 + 1024);
    out.push_str(
        "# A generated region (vpcd::layout::generated).\n[underlay]\ntransport = \"gre\"\n\n",
    );
    for h in 0..s.hosts {
        let (a, b) = (h / 250, h % 250 + 1);
        let _ = write!(
            out,
            "[[host]]\nname = \"h{h}\"\naddress = \"198.18.{a}.{b}\"\n\n"
        );
    }
    out.push_str("[basic]\ncidr = \"10.128.0.0/9\"\n\n");
    out.push_str("[internet]\ncidr = \"203.0.113.0/24\"\ngateway = \"h0\"\n\n");
    let mut eips = 0;
    for k in 0..s.tenants() {
        tenant(&mut out, s, k, &mut eips);
    }
    out
}

fn tenant(out: &mut String, s: &Shape, k: usize, eips: &mut usize) {
    network(out, k);
    instances(out, s, k, eips);
    links(out, s, k);
}

/// Tenant `k`'s VPC, subnets, ACL and security groups.
fn network(out: &mut String, k: usize) {
    let net = k % 128;
    let _ = write!(
        out,
        "[[vpc]]\nname = \"vpc-{k}\"\ntenant = \"t{k}\"\ncidr = \"10.{net}.0.0/16\"\n\n\
         [[subnet]]\nname = \"web-{k}\"\nvpc = \"vpc-{k}\"\ncidr = \"10.{net}.1.0/24\"\nacl = \"acl-{k}\"\n\n\
         [[subnet]]\nname = \"db-{k}\"\nvpc = \"vpc-{k}\"\ncidr = \"10.{net}.2.0/24\"\n\n\
         [[acl]]\nname = \"acl-{k}\"\nvpc = \"vpc-{k}\"\n\
         ingress = [\n  {{ action = \"drop\", protocol = \"tcp\", port = \"23\", cidr = \"0.0.0.0/0\" }},\n  \
         {{ action = \"accept\", protocol = \"all\", cidr = \"0.0.0.0/0\" }},\n]\n\
         egress = [ {{ action = \"accept\", protocol = \"all\", cidr = \"0.0.0.0/0\" }} ]\n\n\
         [[security_group]]\nname = \"sg-web-{k}\"\n\
         ingress = [\n  {{ action = \"accept\", protocol = \"tcp\", port = \"80\", source = \"0.0.0.0/0\" }},\n  \
         {{ action = \"accept\", protocol = \"icmp\", source = \"sg:sg-db-{k}\" }},\n]\n\
         egress = [ {{ action = \"accept\", protocol = \"all\", destination = \"0.0.0.0/0\" }} ]\n\n\
         [[security_group]]\nname = \"sg-db-{k}\"\n\
         ingress = [ {{ action = \"accept\", protocol = \"tcp\", port = \"5432\", source = \"sg:sg-web-{k}\" }} ]\n\
         egress = [ {{ action = \"accept\", protocol = \"all\", destination = \"0.0.0.0/0\" }} ]\n\n"
    );
}

/// Tenant `k`'s instances: in its VPC, then in the basic network.
fn instances(out: &mut String, s: &Shape, k: usize, eips: &mut usize) {
    let net = k % 128;
    for j in 0..s.per_vpc {
        let (subnet, sg, third) = if j % 2 == 0 {
            ("web", "web", 1)
        } else {
            ("db", "db", 2)
        };
        let eip = if *eips < 200 && j == 0 {
            *eips += 1;
            format!("eip = \"203.0.113.{}\"\n", *eips + 20)
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "[[instance]]\nname = \"i{k}-{j}\"\nhost = \"h{}\"\nsubnet = \"{subnet}-{k}\"\n\
             ip = \"10.{net}.{third}.{}\"\n{eip}security_groups = [\"sg-{sg}-{k}\"]\n\n",
            place(s, k, j),
            j / 2 + 10
        );
    }
    for j in 0..s.per_basic {
        let _ = write!(
            out,
            "[[instance]]\nname = \"b{k}-{j}\"\nhost = \"h{}\"\nnetwork = \"basic\"\ntenant = \"t{k}\"\n\
             security_groups = [\"sg-web-{k}\"]\n\n",
            place(s, k, s.per_vpc + j)
        );
    }
}

/// Tenant `k`'s peering (with the next tenant) and interconnect, for some tenants.
fn links(out: &mut String, s: &Shape, k: usize) {
    if k.is_multiple_of(10) && (k + 1) < s.tenants() {
        let _ = write!(
            out,
            "[[peering]]\nname = \"peer-{k}\"\nvpcs = [\"vpc-{k}\", \"vpc-{}\"]\n\n",
            k + 1
        );
    }
    if k.is_multiple_of(7) && s.per_basic > 0 {
        let _ = write!(
            out,
            "[[interconnect]]\ninstance = \"b{k}-0\"\nvpc = \"vpc-{k}\"\n\n"
        );
    }
}

/// The host of instance `j` of tenant `k`: tenants fill windows of 10 consecutive hosts
/// (tenant `k`'s starts at host `10k mod hosts`), as a scheduler packs a tenant onto few
/// hosts; each host so serves about `10 × tenants / hosts` tenants, whatever the region's size.
pub fn place(s: &Shape, k: usize, j: usize) -> usize {
    let window = s.hosts.min(10);
    (k * 10 + j % window) % s.hosts
}
