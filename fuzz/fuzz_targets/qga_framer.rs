//! The guest-agent framer, envelope checks and reply encoding never panic on any byte
//! stream, and after garbage a fresh valid request still frames and parses.
#![no_main]
use nixseed_core::qga::encode::write_value;
use nixseed_core::qga::envelope::{Args, parse_request};
use nixseed_core::qga::framer::Framer;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut framer = Framer::new();
    let mut framed = Vec::new();
    for chunk in data.chunks(5) {
        framer.feed(chunk, &mut framed);
    }
    for f in framed.drain(..) {
        if let Ok(v) = f {
            let mut line = String::new();
            write_value(&mut line, &v);
            if let Ok(req) = parse_request(v) {
                let mut args = Args::new(req.arguments);
                let _ = args.opt_i64("id");
                let _ = args.opt_str("mode");
                let _ = args.finish();
            }
        }
    }
    // Whatever came before, a raw 0xFF and a request resynchronise the stream: this is
    // how every qemu-ga client recovers.
    framer.feed(b"\xff{\"execute\":\"guest-ping\"}", &mut framed);
    assert!(
        framed
            .iter()
            .any(|r| matches!(r, Ok(v) if v["execute"] == "guest-ping")),
        "no request framed after the delimiter: {framed:?}"
    );
});
