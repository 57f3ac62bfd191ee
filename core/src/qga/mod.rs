//! qemu-guest-agent wire protocol: framer, request envelope, error texts.
