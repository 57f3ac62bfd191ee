//! A token bucket for guest-agent requests: a host (or whoever reaches the port) cannot
//! keep the guest busy with expensive commands. Past the burst, requests are paced, not
//! refused: qemu-ga refuses none, and a client reading a file 4 KiB at a time must not
//! fail halfway. Time is passed in, so this stays pure.

#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last: f64,
}

impl TokenBucket {
    /// A full bucket of `capacity` requests, refilled at `per_second`.
    pub fn new(capacity: u32, per_second: u32) -> TokenBucket {
        TokenBucket {
            capacity: f64::from(capacity),
            per_second: f64::from(per_second),
            tokens: f64::from(capacity),
            last: 0.0,
        }
    }

    /// Takes one token at time `now` (seconds, monotonic) and returns how long to wait
    /// before running the request: 0 within the burst, otherwise until the bucket has
    /// refilled that token. A token taken ahead is owed, so requests that keep coming
    /// are spaced at the rate.
    pub fn take(&mut self, now: f64) -> f64 {
        let elapsed = (now - self.last).max(0.0);
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity) - 1.0;
        if self.tokens >= 0.0 {
            0.0
        } else {
            -self.tokens / self.per_second
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_up_to_capacity_then_paces_at_the_rate() {
        let mut b = TokenBucket::new(3, 10);
        assert_eq!((b.take(0.0), b.take(0.0), b.take(0.0)), (0.0, 0.0, 0.0));
        // Beyond the burst each request waits for its own token: 0.1 s, 0.2 s, ...
        assert!((b.take(0.0) - 0.1).abs() < 1e-9);
        assert!((b.take(0.0) - 0.2).abs() < 1e-9);
        // The fifth waited until 0.2 s as told; the sixth then waits for its own token only.
        assert!((b.take(0.2) - 0.1).abs() < 1e-9, "one token's wait");
        assert_eq!(b.take(10.0), 0.0);
        assert_eq!((b.take(10.0), b.take(10.0)), (0.0, 0.0));
        assert!(b.take(10.0) > 0.0, "never above capacity");
    }
}
