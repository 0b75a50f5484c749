//! The typed ids of the compiled topology: dense indexes into its vectors, one type per kind
//! of thing, so that a VPC id cannot stand for a subnet's. A leaf module: it uses nothing of
//! the crate, and the topology, the policy and the pipeline all use it (the topology
//! re-exports the ids: `topology::VpcId` is `ids::VpcId`).

macro_rules! ids {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u32);
        impl $name {
            /// The id as an index into its vector.
            #[inline]
            pub const fn index(self) -> usize { self.0 as usize }
        }
    )*};
}

ids! {
    /// Index of a host in `Topology::hosts`.
    HostId;
    /// Index of a VPC in `Topology::vpcs`.
    VpcId;
    /// Index of a subnet in `Topology::subnets`.
    SubnetId;
    /// Index of a route table in `Topology::route_tables`.
    RouteTableId;
    /// Index of a network ACL in `Topology::acls`.
    AclId;
    /// Index of a security group in `Topology::security_groups`.
    SgId;
    /// Index of an instance in `Topology::instances`; also the port the pipeline delivers to.
    InstanceId;
    /// Index of a peering in `Topology::peerings`.
    PeeringId;
    /// Index of a load balancer in `Topology::load_balancers`.
    LbId;
}
