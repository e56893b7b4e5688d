//! LAN discovery's runtime: the UDP sockets around [`teia_core::lan::Lan`].
//!
//! Two sockets: one bound to the discovery port with `SO_REUSEADDR` and `SO_REUSEPORT`
//! (so every node of a machine hears the broadcasts), and one on a port of its own, from
//! which the node sends, and to which answers come back unicast (a unicast datagram to the
//! shared port would reach only one of the machine's nodes).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Instant;

use teia_core::lan::{Lan, LanAction, LanError, MAX_DATAGRAM};
use tokio::net::UdpSocket;

/// Where LAN discovery listens and broadcasts.
#[derive(Debug, Clone)]
pub struct LanSettings {
    /// The UDP port (every node of the LAN uses the same).
    pub port: u16,
    /// Addresses broadcasts go to (`127.255.255.255` keeps them on one machine); empty:
    /// `255.255.255.255` and the broadcast address of every IPv4 interface but loopback
    /// (so a host with no default route, or with several networks, reaches all of them).
    pub broadcast: Vec<IpAddr>,
}

/// Where a broadcast goes now: the given addresses, or those of the interfaces.
pub fn targets(settings: &LanSettings) -> Vec<IpAddr> {
    if !settings.broadcast.is_empty() {
        return settings.broadcast.clone();
    }
    let mut targets = vec![IpAddr::V4(Ipv4Addr::BROADCAST)];
    for interface in if_addrs::get_if_addrs().unwrap_or_default() {
        if let if_addrs::IfAddr::V4(v4) = &interface.addr {
            // An address set without a broadcast (`ip addr add A/24`) is reported with
            // itself as its broadcast: its network's is used.
            let broadcast = v4
                .broadcast
                .filter(|b| *b != v4.ip && !b.is_unspecified())
                .or_else(|| network_broadcast(v4.ip, v4.netmask));
            if let (false, Some(broadcast)) = (interface.is_loopback(), broadcast) {
                let target = IpAddr::V4(broadcast);
                if !targets.contains(&target) {
                    targets.push(target);
                }
            }
        }
    }
    targets
}

/// The networks of this machine's interfaces, loopback included: each address with its
/// prefix length (none when the interfaces cannot be read).
pub fn interface_networks() -> Vec<(IpAddr, u8)> {
    if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|interface| match interface.addr {
            if_addrs::IfAddr::V4(v4) => (IpAddr::V4(v4.ip), v4.prefixlen),
            if_addrs::IfAddr::V6(v6) => (IpAddr::V6(v6.ip), v6.prefixlen),
        })
        .collect()
}

/// The broadcast address of `ip`'s network (none for a /31 or /32, which have none).
fn network_broadcast(ip: Ipv4Addr, netmask: Ipv4Addr) -> Option<Ipv4Addr> {
    let mask = u32::from(netmask);
    (mask < 0xFFFF_FFFE).then(|| Ipv4Addr::from(u32::from(ip) | !mask))
}

/// This machine's IPv4 addresses, listed in the announcements (a receiver dials the source
/// of an announcement only if it is one of them): those of the interfaces but loopback
/// first, then loopback's (where nodes of one machine hear each other).
fn local_addresses() -> Vec<Ipv4Addr> {
    let mut addrs: Vec<(bool, Ipv4Addr)> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|interface| match interface.addr {
            if_addrs::IfAddr::V4(v4) => Some((v4.ip.is_loopback(), v4.ip)),
            if_addrs::IfAddr::V6(_) => None,
        })
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs.into_iter().map(|(_, ip)| ip).collect()
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Binds a UDP socket on `port` of every IPv4 address, able to broadcast; `shared` lets
/// other sockets (other nodes of this machine) bind the same port.
pub fn bind(port: u16, shared: bool) -> std::io::Result<UdpSocket> {
    use rustix::net::{sockopt, AddressFamily, SocketFlags, SocketType};
    // Close-on-exec, as every descriptor of the node: a task it starts must not inherit it.
    let fd = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    if shared {
        sockopt::set_socket_reuseaddr(&fd, true)?;
        sockopt::set_socket_reuseport(&fd, true)?;
    }
    sockopt::set_socket_broadcast(&fd, true)?;
    rustix::net::bind(&fd, &SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
    let socket = std::net::UdpSocket::from(fd);
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Runs discovery until the node stops: `found` gets each node of our namespace heard.
pub(crate) async fn run(
    mut lan: Lan,
    settings: LanSettings,
    found: impl Fn(String, SocketAddr) + Send + 'static,
) {
    let sockets = bind(settings.port, true).and_then(|shared| Ok((shared, bind(0, false)?)));
    let (shared, own) = match sockets {
        Ok(sockets) => sockets,
        Err(e) => {
            tracing::warn!(port = settings.port, error = %e, "no LAN discovery: cannot bind its UDP port");
            return;
        }
    };
    tracing::info!(port = settings.port, "LAN discovery on");
    lan.set_addresses(local_addresses());
    let mut actions = lan.start(Instant::now(), unix_millis());
    let mut shared_buffer = vec![0u8; MAX_DATAGRAM + 1];
    let mut own_buffer = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        for action in actions.drain(..) {
            match action {
                LanAction::Broadcast(bytes) => {
                    for ip in targets(&settings) {
                        let to = SocketAddr::new(ip, settings.port);
                        if let Err(e) = own.send_to(&bytes, to).await {
                            tracing::debug!(%to, error = %e, "LAN broadcast not sent");
                        }
                    }
                }
                LanAction::Send(to, bytes) => {
                    if let Err(e) = own.send_to(&bytes, to).await {
                        tracing::debug!(%to, error = %e, "LAN answer not sent");
                    }
                }
                LanAction::Found { peer_id, key, addr } => {
                    tracing::debug!(%peer_id, key = %key.fingerprint(), %addr, "found on the LAN");
                    found(peer_id, addr);
                }
            }
        }
        let due = lan
            .poll_timeout()
            .map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std);
        let received = tokio::select! {
            got = shared.recv_from(&mut shared_buffer) => got.map(|(n, from)| (n, from, true)),
            got = own.recv_from(&mut own_buffer) => got.map(|(n, from)| (n, from, false)),
            () = tokio::time::sleep_until(due) => {
                // Addresses change (DHCP, a cable plugged in): listed as they are now.
                lan.set_addresses(local_addresses());
                actions = lan.handle_timeout(Instant::now(), unix_millis());
                continue;
            }
        };
        let (len, from, on_shared) = match received {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!(error = %e, "LAN receive failed");
                continue;
            }
        };
        let buffer = if on_shared {
            &shared_buffer
        } else {
            &own_buffer
        };
        let bytes = buffer.get(..len).unwrap_or_default();
        match lan.handle_datagram(Instant::now(), unix_millis(), from, bytes) {
            Ok(more) => actions = more,
            // A flood is dropped unread, and unlogged.
            Err(LanError::Flooded) => {}
            Err(e) => tracing::debug!(%from, error = %e, "LAN datagram ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_broadcast_comes_from_the_mask() {
        let ip = Ipv4Addr::new(10, 99, 0, 1);
        assert_eq!(
            network_broadcast(ip, Ipv4Addr::new(255, 255, 255, 0)),
            Some(Ipv4Addr::new(10, 99, 0, 255))
        );
        assert_eq!(
            network_broadcast(ip, Ipv4Addr::new(255, 255, 240, 0)),
            Some(Ipv4Addr::new(10, 99, 15, 255))
        );
        assert_eq!(
            network_broadcast(ip, Ipv4Addr::new(255, 255, 255, 254)),
            None
        );
        assert_eq!(network_broadcast(ip, Ipv4Addr::BROADCAST), None);
    }
}
