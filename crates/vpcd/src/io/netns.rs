//! Network namespaces and the kernel's network configuration, through system calls and
//! netlink rather than `ip` processes.
//!
//! Namespaces are made as `ip netns add` makes them: a file under [`NETNS_DIR`] with the
//! namespace's `/proc/.../ns/net` bind-mounted on it, so that `ip netns` (and `ip netns exec`)
//! see ours and we see theirs. A thread of its own `unshare`s into the new namespace, so no
//! other thread of this process ever changes namespace, and nothing forks.
//!
//! Links, addresses and routes are configured with route netlink, through
//! [rtnetlink](https://docs.rs/rtnetlink): it builds and parses the messages (veth pairs with
//! each end in a namespace of its own, bridges, masters, addresses, routes) and reports the
//! kernel's errno, which [`Netlink`] turns into a sentence naming the namespace, the object
//! and what is wrong (`namespace vpcd-lab-host-a: link ul0: no such device`). rtnetlink rather
//! than netlink-packet-route with a bare netlink-sys socket: the builders are the part one
//! would otherwise write by hand, and it runs on tokio, which the daemon already has. Its
//! API is asynchronous; [`Netlink`] hides that behind a small synchronous one, each
//! connection driven by a current-thread runtime of its own. A netlink socket stays in the
//! namespace it was opened in, whichever thread uses it later: [`Netlink::open_in`] opens it
//! with the current thread in the namespace asked for, then returns the thread where it was.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The path of a named namespace.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// True when `ip netns` knows the namespace.
pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// While alive, the current thread is in another network namespace; dropping it returns the
/// thread to the namespace it came from. setns(2) moves only the calling thread.
pub struct NetnsGuard {
    home: File,
}

impl NetnsGuard {
    /// Moves the current thread into namespace `name`.
    pub fn enter(name: &str) -> io::Result<NetnsGuard> {
        let home = File::open("/proc/thread-self/ns/net")?;
        let target = File::open(path(name))
            .map_err(|e| io::Error::new(e.kind(), format!("network namespace {name}: {e}")))?;
        setns(&target, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        Ok(NetnsGuard { home })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.home, CloneFlags::CLONE_NEWNET) {
            // A thread stranded in another namespace would create devices in the wrong place.
            panic!("cannot return to the original network namespace: {e}");
        }
    }
}

/// Moves the current thread into namespace `name` for good (a daemon started for a lab
/// host, before it spawns any thread: threads inherit it).
pub fn enter_for_good(name: &str) -> io::Result<()> {
    let target = File::open(path(name))
        .map_err(|e| io::Error::new(e.kind(), format!("network namespace {name}: {e}")))?;
    setns(&target, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Runs `f` with the current thread in namespace `name` (or where it is, for `None`).
pub fn within<T>(name: Option<&str>, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let _guard = match name {
        Some(n) => Some(NetnsGuard::enter(n)?),
        None => None,
    };
    f()
}

/// The identity of the current thread's network namespace (`net:[inode]`).
pub fn current_id() -> io::Result<String> {
    Ok(std::fs::read_link("/proc/thread-self/ns/net")?
        .to_string_lossy()
        .into_owned())
}

/// An error of an operation on `what`, from an errno: `what: no such device`.
fn errno_error(what: &str, errno: Errno) -> io::Error {
    io::Error::new(
        io::Error::from(errno).kind(),
        format!("{what}: {}", errno_words(errno)),
    )
}

/// An errno as the end of a sentence.
fn errno_words(errno: Errno) -> String {
    match errno {
        Errno::ENODEV => "no such device".to_string(),
        Errno::EEXIST => "already exists".to_string(),
        Errno::EPERM | Errno::EACCES => "not permitted (vpcd needs root)".to_string(),
        Errno::EADDRNOTAVAIL => "no such address".to_string(),
        Errno::ESRCH => "no such route".to_string(),
        e => {
            let d = e.desc();
            let mut c = d.chars();
            match c.next() {
                Some(f) => f.to_lowercase().chain(c).collect(),
                None => format!("{e}"),
            }
        }
    }
}

fn checked_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("network namespace name \"{name}\": not a file name"),
        ));
    }
    Ok(())
}

/// Makes [`NETNS_DIR`] a shared mount point, as `ip netns add` does, so that the namespaces
/// mounted under it are seen from every mount namespace that shares it.
fn share_netns_dir() -> io::Result<()> {
    let dir = Path::new(NETNS_DIR);
    std::fs::create_dir_all(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("creating {NETNS_DIR}: {e}")))?;
    let share = || {
        mount(
            None::<&str>,
            dir,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match share() {
        Ok(()) => Ok(()),
        // Not a mount point yet: make it one (a bind mount on itself), then share it.
        Err(Errno::EINVAL) => {
            mount(
                Some(dir),
                dir,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| errno_error(&format!("making {NETNS_DIR} a mount point"), e))?;
            share().map_err(|e| errno_error(&format!("sharing {NETNS_DIR}"), e))
        }
        Err(e) => Err(errno_error(&format!("sharing {NETNS_DIR}"), e)),
    }
}

/// Creates network namespace `name` (`ip netns add NAME`); its loopback is down, as there.
pub fn add(name: &str) -> io::Result<()> {
    checked_name(name)?;
    share_netns_dir()?;
    let file = path(name);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&file)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => {
                io::Error::new(e.kind(), format!("network namespace {name} already exists"))
            }
            _ => io::Error::new(e.kind(), format!("creating {}: {e}", file.display())),
        })?;
    // unshare(2) moves the calling thread only: a thread of its own enters the new namespace,
    // pins it with the bind mount, and ends there.
    let target = file.clone();
    let made = std::thread::Builder::new()
        .name("vpcd-netns".to_string())
        .spawn(move || -> Result<(), (&'static str, Errno)> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| ("unshare", e))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| ("bind mount", e))
        })?
        .join()
        .unwrap_or(Err(("thread", Errno::EIO)));
    match made {
        Ok(()) => Ok(()),
        Err((step, e)) => {
            let _ = std::fs::remove_file(&file);
            Err(errno_error(
                &format!("creating network namespace {name} ({step})"),
                e,
            ))
        }
    }
}

/// Removes network namespace `name` (`ip netns del NAME`): it goes away with the last
/// process or device in it.
pub fn del(name: &str) -> io::Result<()> {
    checked_name(name)?;
    let file = path(name);
    // As ip does: an unmount that fails (nothing mounted) does not stop the removal.
    let _ = umount2(&file, MntFlags::MNT_DETACH);
    std::fs::remove_file(&file).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            io::Error::new(
                e.kind(),
                format!("network namespace {name}: no such namespace"),
            )
        } else {
            io::Error::new(e.kind(), format!("removing network namespace {name}: {e}"))
        }
    })
}

/// A route-netlink connection to one network namespace's configuration.
pub struct Netlink {
    /// `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    handle: rtnetlink::Handle,
    /// The namespace, for error messages (`None`: the one this was opened in).
    ns: Option<String>,
}

impl Netlink {
    /// Opens a connection to namespace `ns` (the current thread's for `None`).
    pub fn open_in(ns: Option<&str>) -> io::Result<Netlink> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let (conn, handle) = {
            let _guard = match ns {
                Some(n) => Some(NetnsGuard::enter(n)?),
                None => None,
            };
            // The socket registers with this runtime's reactor: create it inside.
            let _rt = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection()
                .map_err(|e| io::Error::new(e.kind(), format!("{}netlink: {e}", prefix(ns))))?;
            (conn, handle)
        };
        // It runs whenever a request is driven by `run`.
        rt.spawn(conn);
        Ok(Netlink {
            rt: Some(rt),
            handle,
            ns: ns.map(str::to_string),
        })
    }

    /// `namespace NS: ` or nothing.
    fn at(&self) -> String {
        prefix(self.ns.as_deref())
    }

    fn fail(&self, what: &str, e: rtnetlink::Error) -> io::Error {
        let what = format!("{}{what}", self.at());
        match e {
            rtnetlink::Error::NetlinkError(m) => match m.code {
                Some(c) => errno_error(&what, Errno::from_raw(-c.get())),
                None => io::Error::other(format!("{what}: unexpected acknowledgement")),
            },
            other => io::Error::other(format!("{what}: {other}")),
        }
    }

    /// Drives `f` to completion on this connection's runtime. Inside another runtime (the
    /// daemon's control loop) it cannot block this thread: a short-lived thread drives it.
    fn run<T: Send>(&self, f: impl Future<Output = T> + Send) -> T {
        let rt = self.rt.as_ref().expect("runtime present until drop");
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| rt.block_on(f))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        } else {
            rt.block_on(f)
        }
    }

    /// The index of link `name`.
    pub fn link_index(&self, name: &str) -> io::Result<u32> {
        let h = self.handle.clone();
        let got = self.run(async move {
            h.link()
                .get()
                .match_name(name.to_string())
                .execute()
                .try_next()
                .await
        });
        match got {
            Ok(Some(m)) => Ok(m.header.index),
            Ok(None) => Err(errno_error(
                &format!("{}link {name}", self.at()),
                Errno::ENODEV,
            )),
            Err(e) => Err(self.fail(&format!("link {name}"), e)),
        }
    }

    /// `ip link set NAME up`.
    pub fn link_up(&self, name: &str) -> io::Result<()> {
        let index = self.link_index(name)?;
        let h = self.handle.clone();
        self.run(async move {
            h.link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
        })
        .map_err(|e| self.fail(&format!("link {name}: setting it up"), e))
    }

    /// `ip link set NAME mtu MTU`.
    pub fn set_mtu(&self, name: &str, mtu: u16) -> io::Result<()> {
        let index = self.link_index(name)?;
        let h = self.handle.clone();
        self.run(async move {
            h.link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .mtu(u32::from(mtu))
                        .build(),
                )
                .execute()
                .await
        })
        .map_err(|e| self.fail(&format!("link {name}: mtu {mtu}"), e))
    }

    /// `ip addr add IP/PREFIX dev DEV`.
    pub fn add_address(&self, dev: &str, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let index = self.link_index(dev)?;
        let h = self.handle.clone();
        self.run(async move {
            h.address()
                .add(index, IpAddr::V4(ip), prefix)
                .execute()
                .await
        })
        .map_err(|e| self.fail(&format!("link {dev}: adding address {ip}/{prefix}"), e))
    }

    /// `ip addr flush dev DEV`: removes every address of the link (of every family).
    pub fn flush_addresses(&self, dev: &str) -> io::Result<()> {
        let index = self.link_index(dev)?;
        let h = self.handle.clone();
        self.run(async move {
            let addresses: Vec<_> = h
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect()
                .await?;
            for a in addresses {
                match h.address().del(a).execute().await {
                    // Gone meanwhile (a secondary address goes with its primary).
                    Err(rtnetlink::Error::NetlinkError(m))
                        if m.code.map(|c| -c.get()) == Some(Errno::EADDRNOTAVAIL as i32) => {}
                    r => r?,
                }
            }
            Ok(())
        })
        .map_err(|e| self.fail(&format!("link {dev}: flushing its addresses"), e))
    }

    /// `ip route replace default dev DEV`.
    pub fn replace_default_route(&self, dev: &str) -> io::Result<()> {
        let index = self.link_index(dev)?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .output_interface(index)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Boot)
            .build();
        let h = self.handle.clone();
        self.run(async move { h.route().add(route).replace().execute().await })
            .map_err(|e| self.fail(&format!("link {dev}: default route"), e))
    }

    /// `ip route add DEST/PREFIX dev DEV`.
    pub fn add_route(&self, dest: Ipv4Addr, prefix: u8, dev: &str) -> io::Result<()> {
        let index = self.link_index(dev)?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dest, prefix)
            .output_interface(index)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Boot)
            .build();
        let h = self.handle.clone();
        self.run(async move { h.route().add(route).execute().await })
            .map_err(|e| self.fail(&format!("link {dev}: route to {dest}/{prefix}"), e))
    }

    /// `ip link add NAME type bridge` (down, as there).
    pub fn add_bridge(&self, name: &str) -> io::Result<()> {
        let msg = LinkMessageBuilder::<LinkBridge>::new(name).build();
        let h = self.handle.clone();
        self.run(async move { h.link().add(msg).execute().await })
            .map_err(|e| self.fail(&format!("bridge {name}"), e))
    }

    /// `ip link add A netns A_NS type veth peer name B netns B_NS`: a veth pair whose ends
    /// are created in the namespaces given (this connection's for `None`).
    pub fn add_veth_pair(
        &self,
        a: &str,
        a_ns: Option<&str>,
        b: &str,
        b_ns: Option<&str>,
    ) -> io::Result<()> {
        let open = |ns: &str| {
            File::open(path(ns))
                .map_err(|e| io::Error::new(e.kind(), format!("network namespace {ns}: {e}")))
        };
        let a_file = a_ns.map(open).transpose()?;
        let b_file = b_ns.map(open).transpose()?;
        let mut peer = LinkUnspec::new_with_name(b);
        if let Some(f) = &b_file {
            peer = peer.setns_by_fd(f.as_raw_fd());
        }
        let mut pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(a.to_string())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())));
        if let Some(f) = &a_file {
            pair = pair.setns_by_fd(f.as_raw_fd());
        }
        let msg = pair.build();
        let h = self.handle.clone();
        let r = self.run(async move { h.link().add(msg).execute().await });
        // The descriptors are read by the kernel during the request: keep them open till then.
        drop((a_file, b_file));
        let place = |n: &str, ns: Option<&str>| match ns {
            Some(ns) => format!("{n} (in {ns})"),
            None => n.to_string(),
        };
        r.map_err(|e| {
            self.fail(
                &format!("veth pair {} - {}", place(a, a_ns), place(b, b_ns)),
                e,
            )
        })
    }

    /// `ip link set DEV master MASTER`.
    pub fn set_master(&self, dev: &str, master: &str) -> io::Result<()> {
        let index = self.link_index(dev)?;
        let master_index = self.link_index(master)?;
        let h = self.handle.clone();
        self.run(async move {
            h.link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .controller(master_index)
                        .build(),
                )
                .execute()
                .await
        })
        .map_err(|e| self.fail(&format!("link {dev}: master {master}"), e))
    }

    /// The IPv4 addresses configured on any link of this namespace.
    pub fn ipv4_addresses(&self) -> io::Result<Vec<Ipv4Addr>> {
        use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
        let h = self.handle.clone();
        let all: Vec<AddressMessage> = self
            .run(async move { h.address().get().execute().try_collect().await })
            .map_err(|e| self.fail("listing addresses", e))?;
        Ok(all
            .iter()
            .flat_map(|m| m.attributes.iter())
            .filter_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            })
            .collect())
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is refused inside another runtime (the daemon's
        // control loop): there the connection task is simply abandoned.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn prefix(ns: Option<&str>) -> String {
    ns.map(|n| format!("namespace {n}: ")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root, and namespaces can be made here.
    fn can_run(test: &str) -> bool {
        let root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let l = s.lines().find_map(|l| l.strip_prefix("Uid:"))?.to_string();
                l.split_whitespace().nth(1).map(|e| e == "0")
            })
            .unwrap_or(false);
        if !root {
            eprintln!("\n!!!!!!!! SKIPPED `{test}`: needs root !!!!!!!!\n");
        }
        root
    }

    /// Removes the namespaces it names when dropped (also when the test fails).
    struct Spaces(Vec<String>);

    impl Spaces {
        fn new(names: &[&str]) -> Spaces {
            let s = Spaces(names.iter().map(|n| n.to_string()).collect());
            for n in &s.0 {
                if exists(n) {
                    let _ = del(n);
                }
            }
            s
        }
    }

    impl Drop for Spaces {
        fn drop(&mut self) {
            for n in &self.0 {
                if exists(n) {
                    let _ = del(n);
                }
            }
        }
    }

    fn ns_id(name: &str) -> String {
        std::fs::metadata(path(name))
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino().to_string()
            })
            .unwrap_or_default()
    }

    /// `add` makes a namespace of its own (not this one), which `ip netns` would list;
    /// `del` removes it; errors say what is wrong.
    #[test]
    fn namespaces_are_added_and_removed() {
        if !can_run("namespaces_are_added_and_removed") {
            return;
        }
        let _s = Spaces::new(&["vpcd-ut-nsa"]);
        add("vpcd-ut-nsa").unwrap();
        assert!(exists("vpcd-ut-nsa"));
        let here = current_id().unwrap();
        let there = within(Some("vpcd-ut-nsa"), current_id).unwrap();
        assert_ne!(here, there, "the new namespace is another one");
        assert!(there.contains(&ns_id("vpcd-ut-nsa")), "{there}");
        assert_eq!(current_id().unwrap(), here, "this thread never moved");
        let again = add("vpcd-ut-nsa").unwrap_err().to_string();
        assert_eq!(again, "network namespace vpcd-ut-nsa already exists");
        del("vpcd-ut-nsa").unwrap();
        assert!(!exists("vpcd-ut-nsa"));
        let gone = del("vpcd-ut-nsa").unwrap_err().to_string();
        assert_eq!(gone, "network namespace vpcd-ut-nsa: no such namespace");
        assert!(add("a/b").is_err());
    }

    /// The lab's wiring through netlink: a bridge, a veth pair with each end in another
    /// namespace, a master, addresses, routes; then readdressing; errors name the namespace
    /// and the link.
    #[test]
    fn links_addresses_and_routes() {
        if !can_run("links_addresses_and_routes") {
            return;
        }
        let _s = Spaces::new(&["vpcd-ut-ul", "vpcd-ut-h1"]);
        add("vpcd-ut-ul").unwrap();
        add("vpcd-ut-h1").unwrap();
        let ul = Netlink::open_in(Some("vpcd-ut-ul")).unwrap();
        let h1 = Netlink::open_in(Some("vpcd-ut-h1")).unwrap();
        ul.link_up("lo").unwrap();
        h1.link_up("lo").unwrap();
        ul.add_bridge("br0").unwrap();
        ul.link_up("br0").unwrap();
        ul.add_veth_pair("ul0", Some("vpcd-ut-h1"), "p0", Some("vpcd-ut-ul"))
            .unwrap();
        ul.set_master("p0", "br0").unwrap();
        ul.link_up("p0").unwrap();
        h1.add_address("ul0", Ipv4Addr::new(192, 0, 2, 1), 32)
            .unwrap();
        h1.link_up("ul0").unwrap();
        h1.add_route(Ipv4Addr::new(192, 0, 2, 2), 32, "ul0")
            .unwrap();
        assert!(
            ul.link_index("ul0").is_err(),
            "ul0 is in the host's namespace"
        );
        assert_eq!(
            h1.ipv4_addresses().unwrap(),
            vec![Ipv4Addr::LOCALHOST, Ipv4Addr::new(192, 0, 2, 1)]
        );
        let e = h1.link_up("nope0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "namespace vpcd-ut-h1: link nope0: no such device"
        );
        let e = h1
            .add_address("ul0", Ipv4Addr::new(192, 0, 2, 1), 32)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "namespace vpcd-ut-h1: link ul0: adding address 192.0.2.1/32: already exists"
        );
        let e = h1
            .add_route(Ipv4Addr::new(192, 0, 2, 2), 32, "ul0")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "namespace vpcd-ut-h1: link ul0: route to 192.0.2.2/32: already exists"
        );
        // What `ip` reads back (when it is here) is what `ip route add ... dev ul0` makes.
        let routes = || {
            std::process::Command::new("ip")
                .args(["-n", "vpcd-ut-h1", "-4", "route", "show"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .ok()
        };
        if let Some(text) = routes() {
            assert!(text.contains("192.0.2.2 dev ul0 scope link"), "{text}");
        }
        // Readdressing, as the daemon does on a reload.
        h1.flush_addresses("ul0").unwrap();
        assert_eq!(h1.ipv4_addresses().unwrap(), vec![Ipv4Addr::LOCALHOST]);
        h1.add_address("ul0", Ipv4Addr::new(192, 0, 2, 9), 24)
            .unwrap();
        h1.replace_default_route("ul0").unwrap();
        h1.replace_default_route("ul0").unwrap();
        assert_eq!(
            h1.ipv4_addresses().unwrap(),
            vec![Ipv4Addr::LOCALHOST, Ipv4Addr::new(192, 0, 2, 9)]
        );
        if let Some(text) = routes() {
            assert!(text.contains("default dev ul0 scope link"), "{text}");
        }
        // A connection works from inside another runtime (the daemon's control loop).
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(h1.link_index("ul0").is_ok());
            drop(Netlink::open_in(Some("vpcd-ut-ul")).unwrap());
        });
    }
}
