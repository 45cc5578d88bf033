//! Two tiny read-only nf_tables requests over netlink, shared by the firewall and the NAT
//! adapters: the ruleset generation (to skip re-applying an unchanged ruleset) and a
//! generic request/answer (to read one table's state). Both act on the calling thread's
//! network namespace.

/// Sends one nf_tables request on a fresh socket (in the calling thread's namespace) and
/// returns the attributes of the answer, or the kernel's error.
pub fn request(
    msg: u16,
    reply: u16,
    family: u8,
    attrs: &[(u16, &[u8])],
) -> std::io::Result<Vec<(u16, Vec<u8>)>> {
    use nix::sys::socket::{
        recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
        SockProtocol, SockType,
    };
    use std::os::fd::AsRawFd;
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(1, 0),
    )?;
    // nlmsghdr (length, type, flags, sequence, port) + nfgenmsg (family, version, res_id)
    // + attributes (length, type, value padded to 4 bytes).
    let mut body = vec![family, 0, 0, 0];
    for (kind, value) in attrs {
        let len = 4 + value.len();
        body.extend((len as u16).to_ne_bytes());
        body.extend(kind.to_ne_bytes());
        body.extend_from_slice(value);
        body.resize(body.len() + (4 - len % 4) % 4, 0);
    }
    let mut req = Vec::with_capacity(16 + body.len());
    req.extend(((16 + body.len()) as u32).to_ne_bytes());
    req.extend(((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
    req.extend(NLM_F_REQUEST.to_ne_bytes());
    req.extend(1u32.to_ne_bytes());
    req.extend(0u32.to_ne_bytes());
    req.extend(body);
    sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut buf = vec![0u8; 16384];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    let m = &buf[..n];
    if m.len() < 16 {
        return Err(bad("short netlink reply"));
    }
    let u16_at = |i: usize| u16::from_ne_bytes([m[i], m[i + 1]]);
    let kind = u16_at(4);
    if kind == NLMSG_ERROR && m.len() >= 20 {
        let code = i32::from_ne_bytes([m[16], m[17], m[18], m[19]]);
        if code == 0 {
            return Err(bad("an acknowledgement instead of an answer"));
        }
        return Err(std::io::Error::from_raw_os_error(-code));
    }
    if kind != (NFNL_SUBSYS_NFTABLES << 8) | reply {
        return Err(bad("unexpected netlink reply"));
    }
    let len = (u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize).min(m.len());
    let mut out = Vec::new();
    let mut i = 20;
    while i + 4 <= len {
        let (alen, atype) = (u16_at(i) as usize, u16_at(i + 2) & 0x3fff);
        if alen < 4 || i + alen > len {
            break;
        }
        out.push((atype, m[i + 4..i + alen].to_vec()));
        i += (alen + 3) & !3;
    }
    Ok(out)
}

/// The nf_tables ruleset generation of the calling thread's network namespace: the kernel
/// bumps it on every committed transaction, by anyone (`NFT_MSG_GETGEN`; a few
/// microseconds, where `nft list tables` takes tens of milliseconds on a big ruleset).
pub fn ruleset_generation() -> std::io::Result<u32> {
    const NFT_MSG_NEWGEN: u16 = 15;
    const NFT_MSG_GETGEN: u16 = 16;
    const NFTA_GEN_ID: u16 = 1;
    request(NFT_MSG_GETGEN, NFT_MSG_NEWGEN, 0, &[])?
        .into_iter()
        .find(|(t, v)| *t == NFTA_GEN_ID && v.len() >= 4)
        .map(|(_, v)| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no generation id"))
}
