//! The control channel as a first-boot source: with no seed disk, the agent says `hello`
//! on `org.nixseed.channel.0` and waits a bounded time for the host to push an identity.
//! No udev in the initrd: the port is found through `/sys/class/virtio-ports/*/name`.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nixseed_core::channel::{Decoder, Message, encode};
use nixseed_core::seed::Seed;

use super::{Env, Source};

pub const PORT_NAME: &str = "org.nixseed.channel.0";

/// The device node of the named virtio port, if the VM has one.
pub fn find_port(env: &Env, name: &str) -> Option<PathBuf> {
    let dir = env.host_path("/sys/class/virtio-ports");
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let port_name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Some(env.host_path(&format!("/dev/{}", e.file_name().to_string_lossy())));
        }
    }
    None
}

pub struct ControlChannel;

impl Source for ControlChannel {
    fn name(&self) -> &'static str {
        "channel"
    }

    fn asks_the_host(&self) -> bool {
        true
    }

    fn looks_at(&self) -> &'static str {
        "the control channel org.nixseed.channel.0 (virtio-serial), when a wait for it is set"
    }

    fn find(&self, env: &Env) -> Result<Option<Seed>> {
        if env.channel_wait.is_zero() {
            return Ok(None);
        }
        let Some(node) = find_port(env, PORT_NAME) else {
            return Ok(None);
        };
        let t0 = Instant::now();
        // Non-blocking: virtio_console blocks a write until a host connects to the port,
        // and with nobody on the host side a blocking hello would never return.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(&node);
        let mut port = match opened {
            Ok(port) => port,
            // The port has one opener at a time: in a booted system that is the agent's own
            // `serve`, through which the host pushes anyway. Nothing to find here then.
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                tracing::warn!(
                    "{} is held by another process (the agent's `serve`?): not asking the host for a seed over it",
                    node.display()
                );
                return Ok(None);
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot open the control channel {}",
                    node.display()
                )));
            }
        };
        let (generation, instance_id) = env.current_identity();
        let hello = encode(&Message::Hello {
            product_uuid: env.product_uuid(),
            generation,
            instance_id,
        });
        let mut decoder = Decoder::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut next_hello = Instant::now();
        let mut outbox = Outbox::default();
        while t0.elapsed() < env.channel_wait {
            if Instant::now() >= next_hello {
                // Repeated: a hello written before the host connected is lost.
                outbox.queue(&hello);
                next_hello = Instant::now() + Duration::from_secs(1);
            }
            outbox.flush(&mut port);
            let mut fds = [nix::poll::PollFd::new(
                port.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16));
            let readable = fds[0]
                .revents()
                .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLIN));
            if !readable {
                // POLLHUP alone: no host on the other end yet.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let n = match port.read(&mut buf) {
                Ok(0) => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", node.display())),
            };
            decoder.push(&buf[..n]);
            loop {
                match decoder.next_message() {
                    Ok(Some(Message::Push { bundle })) => {
                        let files = bundle.verify()?;
                        let source = format!("channel:{}", bundle.machine);
                        tracing::info!(
                            "control channel: identity for {} received {:.0} ms after hello",
                            bundle.machine,
                            t0.elapsed().as_secs_f64() * 1000.0
                        );
                        let seed = Seed::from_nocloud(&files, &source, None)?;
                        env.check_bundle_is_mine(&seed, &bundle.machine)?;
                        return Ok(Some(seed));
                    }
                    Ok(Some(Message::Refuse { reason })) => {
                        tracing::warn!(
                            "control channel: the host refused to provision this VM: {reason}"
                        );
                        return Ok(None);
                    }
                    Ok(Some(other)) => {
                        tracing::warn!(
                            "control channel: ignoring unexpected {other:?} while waiting for an identity"
                        )
                    }
                    Ok(None) => break,
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
        tracing::info!(
            "control channel: no identity from the host within {} s; keeping the current one",
            env.channel_wait.as_secs()
        );
        Ok(None)
    }
}

/// Frames waiting to go out on a non-blocking port, written whole: a frame the port took
/// in part is finished before another is queued, so the host never reads the start of
/// one frame followed by a whole other one (which would desynchronise its decoder).
#[derive(Default)]
struct Outbox {
    pending: Vec<u8>,
}

impl Outbox {
    /// Queues `frame` unless an earlier one is still going out.
    fn queue(&mut self, frame: &[u8]) {
        if self.pending.is_empty() {
            self.pending.extend_from_slice(frame);
        }
    }

    /// Writes what the port takes now. A port with no host takes nothing (`EAGAIN`); a
    /// frame written before the host connected is lost on the way, as a whole.
    fn flush(&mut self, port: &mut impl Write) {
        while !self.pending.is_empty() {
            match port.write(&self.pending) {
                Ok(0) => return,
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A fake port for this unit test: takes at most `take` bytes per write while
    /// `room` lasts, then says `EAGAIN`.
    struct FakePort {
        written: Vec<u8>,
        take: usize,
        room: usize,
    }

    impl Write for FakePort {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let n = b.len().min(self.take).min(self.room);
            if n == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            self.room -= n;
            self.written.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A hello the port took in part is finished before the next one starts: the host's
    /// decoder reads whole hellos, however the writes were cut.
    #[test]
    fn a_hello_cut_short_is_finished_before_the_next() {
        let hello = encode(&Message::Hello {
            product_uuid: Some("u".repeat(300)),
            generation: Some(3),
            instance_id: Some("i-1".into()),
        });
        let mut port = FakePort {
            written: Vec::new(),
            take: 100,
            room: 150,
        };
        let mut outbox = Outbox::default();
        outbox.queue(&hello);
        outbox.flush(&mut port);
        // A second hello is due while the first is still going out.
        outbox.queue(&hello);
        port.room = usize::MAX;
        outbox.flush(&mut port);
        outbox.queue(&hello);
        outbox.flush(&mut port);
        let mut decoder = Decoder::default();
        decoder.push(&port.written);
        let mut hellos = 0;
        while let Some(m) = decoder.next_message().unwrap() {
            assert!(
                matches!(
                    m,
                    Message::Hello {
                        generation: Some(3),
                        ..
                    }
                ),
                "{m:?}"
            );
            hellos += 1;
        }
        assert_eq!(hellos, 2);
        assert_eq!(port.written.len(), 2 * hello.len());
    }
}
