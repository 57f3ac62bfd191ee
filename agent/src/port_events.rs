//! Waiting for a virtio-serial port to change, without reading it over and over.
//!
//! While no host is connected, a virtio-serial port reads 0 and polls as hung up, so to
//! `poll(2)` and to the runtime (which keeps a hang-up as final) it is ready all the
//! time. Waiting for a host by reading again every 100 ms, as qemu-ga does, costs ten
//! wake-ups a second per port for as long as no host is there, and up to 100 ms before
//! each new connection is answered: Proxmox VE connects once per call.
//!
//! The kernel wakes a port's wait queue when the host connects or leaves
//! (`VIRTIO_CONSOLE_PORT_OPEN`), when bytes arrive and when the port goes away. An epoll
//! set of the agent's own, with the port in it edge-triggered, reports each such wake-up
//! once: drained, it stays quiet until the next one. The runtime watches the set's
//! descriptor, which is readable while the set has something to report.
//!
//! The port is in the set only while the agent waits for a host. Polling a
//! virtio-serial port takes bytes that have arrived off the device's queue, and the
//! device then raises no interrupt for them, so no other waiter on the port is woken.
//! With the port in the set during a session, the runtime's check of the set could take
//! a request's bytes that way, and the agent's wait for bytes on the port itself would
//! not end until the host left.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use rustix::event::Timespec;
use rustix::event::epoll::{self, CreateFlags, Event, EventData, EventFlags};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The changes of one port while the agent waits for a host, as an epoll set watched by
/// the runtime.
pub struct PortEvents {
    set: AsyncFd<OwnedFd>,
    /// The set's own descriptor of the port, open for as long as the set: the caller may
    /// close and replace its own at will.
    port: OwnedFd,
    /// The port is in the set.
    watching: bool,
}

impl PortEvents {
    /// An empty set for `port`: nothing is watched before [`PortEvents::watch`].
    pub fn new(port: impl AsFd) -> io::Result<PortEvents> {
        let set = epoll::create(CreateFlags::CLOEXEC)?;
        // The set's descriptor moves into the AsyncFd and stays open for its whole life;
        // the replacement (`register_with_interest`) is `unsafe` only to promise that.
        #[allow(deprecated)]
        let set = AsyncFd::with_interest(set, Interest::READABLE)?;
        Ok(PortEvents {
            set,
            port: port.as_fd().try_clone_to_owned()?,
            watching: false,
        })
    }

    /// Watches the port from now on and forgets what it reported so far (a port with no
    /// host reports hang-up as soon as it is added): a read of the port after this sees
    /// every change before it, and [`PortEvents::changed`] waits for the next.
    pub fn watch(&mut self) -> io::Result<()> {
        if !self.watching {
            epoll::add(
                self.set.get_ref(),
                &self.port,
                EventData::new_u64(0),
                EventFlags::IN | EventFlags::OUT | EventFlags::RDHUP | EventFlags::ET,
            )?;
            self.watching = true;
        }
        self.drain().map(drop)
    }

    /// Stops watching the port (a host is there): nothing but the agent's own reads and
    /// waits looks at it during a session.
    pub fn unwatch(&mut self) -> io::Result<()> {
        if self.watching {
            epoll::delete(self.set.get_ref(), &self.port)?;
            self.watching = false;
            self.drain()?;
        }
        Ok(())
    }

    /// The port is in the set.
    pub fn is_watching(&self) -> bool {
        self.watching
    }

    /// Takes in what the set reports; whether it reported anything.
    fn drain(&self) -> io::Result<bool> {
        let mut seen = false;
        loop {
            let mut events = [MaybeUninit::<Event>::uninit(); 8];
            let (ready, _) = epoll::wait(self.set.get_ref(), &mut events, Some(&NOW))?;
            seen |= !ready.is_empty();
            if ready.len() < events.len() {
                return Ok(seen);
            }
        }
    }

    /// Waits until the watched port changes after the last [`PortEvents::watch`] (or the
    /// last return of this), and takes that change in.
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut guard = self.set.readable().await?;
            let seen = self.drain()?;
            guard.clear_ready();
            if seen {
                return Ok(());
            }
        }
    }
}

/// New entries in a directory, for the wait for a port's node: udev makes
/// `/dev/virtio-ports/NAME` when the host attaches a port, by creating it or by renaming
/// it into place. The runtime watches an inotify descriptor that reports both.
pub struct NodeWatch {
    inotify: AsyncFd<OwnedFd>,
    /// The watched directory's device and inode: udev removes `/dev/virtio-ports` with
    /// its last node and makes it again with the next, and a watch stays on the removed
    /// one.
    dir: (u64, u64),
}

impl NodeWatch {
    /// Watches `dir`, which must exist, from now on.
    pub fn new(dir: &std::path::Path) -> io::Result<NodeWatch> {
        use rustix::fs::inotify::{self, WatchFlags};
        let id = identity(dir)?;
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
        inotify::add_watch(&fd, dir, WatchFlags::CREATE | WatchFlags::MOVED_TO)?;
        // As in [`PortEvents::new`]: the descriptor moves into the AsyncFd for its life.
        #[allow(deprecated)]
        let inotify = AsyncFd::with_interest(fd, Interest::READABLE)?;
        Ok(NodeWatch { inotify, dir: id })
    }

    /// Whether this watches the directory now at `dir` (not one removed since, nor
    /// another directory).
    pub fn is_on(&self, dir: &std::path::Path) -> bool {
        identity(dir).is_ok_and(|id| id == self.dir)
    }

    /// Waits until an entry was made in the directory since the last return of this (or
    /// since [`NodeWatch::new`]), and takes in what was reported.
    pub async fn changed(&self) -> io::Result<()> {
        let mut guard = self.inotify.readable().await?;
        let mut buf = [0u8; 1024];
        loop {
            match rustix::io::read(self.inotify.get_ref(), &mut buf) {
                Ok(_) => {}
                Err(rustix::io::Errno::AGAIN) => break,
                Err(e) => return Err(e.into()),
            }
        }
        guard.clear_ready();
        Ok(())
    }
}

/// A directory's device and inode.
fn identity(dir: &std::path::Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir)?;
    Ok((m.dev(), m.ino()))
}

const NOW: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 0,
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The node arrives the way udev makes it, renamed into place, and the wait for it ends
    /// then, with nothing read of the rest of the directory.
    #[test]
    fn a_node_renamed_into_the_directory_wakes_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        rt.block_on(async {
            let watch = NodeWatch::new(dir.path()).unwrap();
            let quiet = tokio::time::timeout(Duration::from_millis(200), watch.changed()).await;
            assert!(quiet.is_err(), "the wait returned with nothing made");
            let tmp = dir.path().join(".tmp-node");
            std::fs::write(&tmp, b"").unwrap();
            // The temporary entry counts as a change too; drain it.
            tokio::time::timeout(Duration::from_secs(5), watch.changed())
                .await
                .expect("a new entry did not wake the wait")
                .unwrap();
            std::fs::rename(&tmp, dir.path().join("org.nixseed.channel.0")).unwrap();
            tokio::time::timeout(Duration::from_secs(5), watch.changed())
                .await
                .expect("an entry renamed into place did not wake the wait")
                .unwrap();
        });
    }

    /// A pipe stands in for the port: like a virtio-serial port, it wakes its wait queue
    /// when bytes arrive, which is all the set relies on.
    #[test]
    fn a_change_wakes_the_wait_once_and_none_is_lost_after_watch() {
        let (rx, tx) = std::io::pipe().unwrap();
        let mut tx = std::fs::File::from(OwnedFd::from(tx));
        let rt = runtime();
        rt.block_on(async {
            let mut events = PortEvents::new(&rx).unwrap();
            tx.write_all(b"w").unwrap();
            // Not watched yet: the bytes above are not a change the set reports.
            events.watch().unwrap();
            let quiet = tokio::time::timeout(Duration::from_millis(200), events.changed()).await;
            assert!(quiet.is_err(), "the wait returned with nothing changed");

            tx.write_all(b"x").unwrap();
            tokio::time::timeout(Duration::from_secs(5), events.changed())
                .await
                .expect("bytes arriving did not wake the wait")
                .unwrap();
            let again = tokio::time::timeout(Duration::from_millis(200), events.changed()).await;
            assert!(again.is_err(), "one change woke the wait twice");

            // A change after watch() and before the wait still wakes it.
            events.watch().unwrap();
            tx.write_all(b"y").unwrap();
            tokio::time::timeout(Duration::from_secs(5), events.changed())
                .await
                .expect("a change between watch() and the wait was lost")
                .unwrap();

            // Unwatched, the port's changes are not the set's business.
            events.unwatch().unwrap();
            tx.write_all(b"z").unwrap();
            let unwatched =
                tokio::time::timeout(Duration::from_millis(200), events.changed()).await;
            assert!(unwatched.is_err(), "an unwatched port woke the wait");
        });
    }
}
