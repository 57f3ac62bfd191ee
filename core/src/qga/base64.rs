//! Base64 as qemu-ga decodes its arguments (`buf-b64`, `input-data`, `password`): qemu's
//! character check, then glib's decoder, which reads on past padding. Seeds keep their
//! own decoder (`credentials::base64_decode`, which also takes URL-safe characters and
//! whitespace).

use super::QgaError;

/// Decodes `text` as qemu-ga does: only `A-Z a-z 0-9 + / =` and `\n` are allowed (else
/// `Base64 data contains invalid characters`); `\n` is skipped; every group of four
/// characters gives three bytes, less one for each `=` among its last two; an
/// incomplete last group gives nothing. So `YQ==YQ==` is `aa`. qemu reads the text as a
/// C string, so it ends at a NUL.
pub fn decode(text: &str) -> Result<Vec<u8>, QgaError> {
    let text = text.split('\0').next().unwrap_or_default();
    let allowed = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b'\n');
    if !text.bytes().all(allowed) {
        return Err(QgaError::generic("Base64 data contains invalid characters"));
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut group = 0u32;
    let mut n = 0;
    // The two characters of the group read last, newest first.
    let mut last = [0u8; 2];
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => 0,
            _ => continue,
        };
        last = [c, last[0]];
        group = (group << 6) | u32::from(v);
        n += 1;
        if n == 4 {
            let [_, a, b, c] = group.to_be_bytes();
            out.push(a);
            if last[1] != b'=' {
                out.push(b);
            }
            if last[0] != b'=' {
                out.push(c);
            }
            group = 0;
            n = 0;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::decode;

    fn ok(text: &str) -> Vec<u8> {
        decode(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn padding_and_line_breaks() {
        assert_eq!(ok("aGk="), b"hi");
        assert_eq!(ok("aGVsbG8="), b"hello");
        assert_eq!(ok("YQ=="), b"a");
        assert_eq!(ok(""), b"");
        // Proxmox wraps its base64 at 76 characters.
        assert_eq!(ok("YW\nJj\n"), b"abc");
        assert_eq!(ok("cORzcw=="), b"p\xe4ss");
    }

    #[test]
    fn decoding_goes_on_past_padding() {
        assert_eq!(ok("YQ==YQ=="), b"aa");
        assert_eq!(ok("YQ==YWJj"), b"aabc");
    }

    #[test]
    fn an_incomplete_group_gives_nothing() {
        assert_eq!(ok("YWJjZA"), b"abc");
        assert_eq!(ok("Y"), b"");
    }

    #[test]
    fn only_qemus_characters_are_allowed() {
        for bad in ["a*b", "YQ== ", "YQ\r\n==", "-_8=", "YQ\t=="] {
            assert_eq!(
                decode(bad).map_err(|e| e.desc),
                Err("Base64 data contains invalid characters".to_string()),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_text_ends_at_a_nul() {
        assert_eq!(ok("YQ==\0*"), b"a");
    }
}
