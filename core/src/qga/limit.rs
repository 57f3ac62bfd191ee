//! A token bucket for guest-agent requests: a host (or whoever reaches the port) cannot
//! keep the guest busy with expensive commands. Time is passed in, so this stays pure.

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

    /// Takes one token at time `now` (seconds, monotonic); false when empty.
    pub fn allow(&mut self, now: f64) -> bool {
        let elapsed = (now - self.last).max(0.0);
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_up_to_capacity_then_refills_at_the_rate() {
        let mut b = TokenBucket::new(3, 10);
        assert!(b.allow(0.0) && b.allow(0.0) && b.allow(0.0));
        assert!(!b.allow(0.0));
        assert!(!b.allow(0.05), "half a token after 50 ms");
        assert!(b.allow(0.1));
        assert!(
            b.allow(10.0) && b.allow(10.0) && b.allow(10.0) && !b.allow(10.0),
            "never above capacity"
        );
    }
}
