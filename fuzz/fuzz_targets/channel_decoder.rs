//! The control channel decoder never panics, and a valid frame after garbage decodes.
#![no_main]
use nixseed_core::channel::{Decoder, Message, encode};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut d = Decoder::default();
    for chunk in data.chunks(7) {
        d.push(chunk);
        while let Ok(Some(_)) = d.next_message() {}
    }
    // After any error the decoder starts afresh: a fresh decoder must read a valid frame.
    let mut fresh = Decoder::default();
    fresh.push(&encode(&Message::Status));
    assert_eq!(fresh.next_message(), Ok(Some(Message::Status)));
    if let Ok(Some(Message::Push { bundle })) = {
        let mut d = Decoder::default();
        d.push(data);
        d.next_message()
    } {
        let _ = bundle.verify();
    }
});
