//! qemu-ga's "modified UTF-8": like UTF-8, but `C0 80` is U+0000, and noncharacters,
//! surrogates and overlong forms are invalid. Bad input in an error message becomes
//! U+FFFD, one replacement per invalid sequence, exactly where qemu-ga puts them.

pub enum ModUtf8 {
    /// A character and the bytes it took.
    Char(char, usize),
    /// An invalid sequence and the bytes it took (at least 1).
    Invalid(usize),
}

fn valid(cp: u32) -> bool {
    !(cp > 0x10FFFF
        || (0xFDD0..=0xFDEF).contains(&cp)
        || (cp & 0xFFFE) == 0xFFFE
        || (0xD800..=0xDFFF).contains(&cp))
}

/// Decodes the sequence at the start of `s` (which must not be empty).
pub fn next_mod_utf8(s: &[u8]) -> ModUtf8 {
    const MIN: [u32; 5] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];
    let first = s[0];
    if first < 0x80 {
        return ModUtf8::Char(char::from(first), 1);
    }
    if first >= 0xFE || first & 0x40 == 0 {
        return ModUtf8::Invalid(1);
    }
    let len = first.leading_ones() as usize;
    let mut cp = u32::from(first) & (0x7F >> len);
    let mut used = 1;
    for i in 1..len.min(6) {
        let b = s.get(i).copied().unwrap_or(0);
        if b & 0xC0 != 0x80 {
            return ModUtf8::Invalid(used);
        }
        used += 1;
        cp = (cp << 6) | u32::from(b & 0x3F);
    }
    if !valid(cp) || (cp < MIN[len - 2] && !(cp == 0 && len == 2)) {
        return ModUtf8::Invalid(used);
    }
    match char::from_u32(cp) {
        Some(c) => ModUtf8::Char(c, used),
        None => ModUtf8::Invalid(used),
    }
}

/// Bytes to text, each invalid sequence replaced by U+FFFD.
pub fn decode_mod_utf8_lossy(mut s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    while !s.is_empty() {
        match next_mod_utf8(s) {
            ModUtf8::Char(c, n) => {
                out.push(c);
                s = &s[n..];
            }
            ModUtf8::Invalid(n) => {
                out.push('\u{FFFD}');
                s = &s[n..];
            }
        }
    }
    out
}

/// True for characters qemu-ga's writer refuses to print as themselves.
pub fn is_writable(c: char) -> bool {
    valid(u32::from(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacement_per_sequence() {
        assert_eq!(decode_mod_utf8_lossy(b"a\xffb"), "a\u{FFFD}b");
        assert_eq!(decode_mod_utf8_lossy(b"\xc3\xa9"), "\u{e9}");
        assert_eq!(decode_mod_utf8_lossy(b"\xc0\x80"), "\0");
        // Overlong '/' and a truncated 3-byte sequence.
        assert_eq!(
            decode_mod_utf8_lossy(b"\xc0\xaf\xe2\x82"),
            "\u{FFFD}\u{FFFD}"
        );
        assert_eq!(decode_mod_utf8_lossy(b"\xef\xbf\xbe"), "\u{FFFD}");
    }
}
