//! The control channel decoder never panics on any byte stream, and a bad frame (bad
//! JSON, a wrong version, an unknown message) never desynchronises the stream: the frame
//! after it still decodes.
#![no_main]
use nixseed_core::channel::{Decoder, MAX_FRAME, Message, encode};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut d = Decoder::default();
    for chunk in data.chunks(7) {
        d.push(chunk);
        while let Ok(Some(_)) = d.next_message() {}
    }
    // `data` as one frame's body, then a valid frame: whatever the first decodes to, the
    // second is Status.
    if data.len() <= MAX_FRAME {
        let mut d = Decoder::default();
        let len = u32::try_from(data.len()).expect("MAX_FRAME fits a u32");
        d.push(&len.to_be_bytes());
        d.push(data);
        d.push(&encode(&Message::Status));
        if let Ok(Some(Message::Push { bundle })) = d.next_message() {
            let _ = bundle.verify();
        }
        assert_eq!(d.next_message(), Ok(Some(Message::Status)));
    }
});
