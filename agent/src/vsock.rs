//! `vsock-listen` (qemu-ga's `-m vsock-listen -p CID:PORT`): an AF_VSOCK listener and its
//! streams as tokio readers/writers, over the kernel's socket calls through `nix`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use anyhow::{Context as _, Result};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, VsockAddr, bind, listen, socket,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Parses qemu-ga's `CID:PORT` (CID `-1` or `any` for every CID).
pub fn parse_addr(path: &str) -> Result<VsockAddr> {
    let (cid, port) = path
        .split_once(':')
        .with_context(|| format!("vsock-listen path {path:?}: expected CID:PORT, e.g. 3:1234"))?;
    let cid = match cid {
        "-1" | "any" => u32::MAX,
        c => c
            .parse()
            .with_context(|| format!("vsock-listen path {path:?}: CID {c:?} is not a number"))?,
    };
    let port = port
        .parse()
        .with_context(|| format!("vsock-listen path {path:?}: port {port:?} is not a number"))?;
    Ok(VsockAddr::new(cid, port))
}

/// The host's address as a guest sees it.
const VMADDR_CID_HOST: u32 = 2;

/// Only the host is served: a guest-local process (`vsock_loopback`, CID 1) or another VM
/// reaching this port could otherwise run commands as root through `guest-exec`.
fn peer_is_host(cid: u32) -> bool {
    cid == VMADDR_CID_HOST
}

pub struct VsockListener(AsyncFd<OwnedFd>);

impl VsockListener {
    pub fn bind(addr: &VsockAddr) -> Result<VsockListener> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("cannot create an AF_VSOCK socket (is the vsock transport loaded?)")?;
        bind(fd.as_raw_fd(), addr).with_context(|| format!("cannot bind vsock {addr}"))?;
        listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN))
            .with_context(|| format!("cannot listen on vsock {addr}"))?;
        // The OwnedFd moves into the AsyncFd and lives exactly as long as its registration,
        // which is all `AsyncFd::register` would make us promise with `unsafe`.
        #[allow(deprecated)]
        Ok(VsockListener(AsyncFd::new(fd)?))
    }

    pub async fn accept(&self) -> io::Result<VsockStream> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| {
                rustix::net::accept_with(
                    fd,
                    rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
                )
                .map_err(io::Error::from)
            }) {
                Ok(Ok(fd)) => {
                    let peer = nix::sys::socket::getpeername::<VsockAddr>(fd.as_raw_fd());
                    match peer {
                        Ok(peer) if peer_is_host(peer.cid()) => {}
                        // Dropped: the connection closes, the listener goes on.
                        Ok(peer) => {
                            tracing::warn!(
                                "vsock: refused a connection from CID {} port {}: only the host (CID {VMADDR_CID_HOST}) is served",
                                peer.cid(),
                                peer.port()
                            );
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(
                                "vsock: refused a connection whose peer is unknown: {e}"
                            );
                            continue;
                        }
                    }
                    #[allow(deprecated)] // as in `bind`: the fd moves into the AsyncFd
                    return Ok(VsockStream(AsyncFd::new(fd)?));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

pub struct VsockStream(AsyncFd<OwnedFd>);

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.as_raw_fd(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
