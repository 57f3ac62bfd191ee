//! The byte stream to JSON values, exactly as qemu-ga 7.2 cuts it: a lexer with error
//! recovery, a streamer that waits until braces and brackets balance, then a parser.
//! Clients rely on the quirks (a raw 0xFF resynchronises; a bare `}` after garbage is
//! answered), so the states and messages below follow qemu-ga's observable behaviour.
//! The framer belongs to the agent, not to a connection: a request split across two
//! connections is still one request.

use serde_json::{Map, Number, Value};

use super::QgaError;
use super::utf8::{ModUtf8, decode_mod_utf8_lossy, next_mod_utf8};

/// A single token longer than this is refused (qemu-ga's limit).
const MAX_TOKEN_SIZE: usize = 64 << 20;
/// Tokens in one value.
const MAX_TOKEN_COUNT: usize = 2 << 20;
/// Open braces plus brackets.
const MAX_NESTING: i64 = 1 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    ExpDigits,
    ExpSign,
    ExpE,
    Mantissa,
    MantissaDigits,
    Digits,
    Sign,
    Keyword,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    String,
    Integer,
    Float,
    Keyword,
}

/// What one byte does to the lexer.
enum Step {
    /// Consume the byte and stay in (or move to) a state.
    Go(Lex),
    /// Consume the byte; the token is complete.
    Emit(Kind),
    /// Do not consume the byte; the token before it is complete.
    EmitBefore(Kind),
    /// Consume the byte; the token is invalid.
    Error,
    /// Do not consume the byte; start afresh with it.
    RestartBefore,
    /// Consume the byte and drop the token text (whitespace, recovery).
    Drop(Lex),
}

fn step(state: Lex, b: u8) -> Step {
    use Step::*;
    let digit = b.is_ascii_digit();
    match state {
        Lex::Recovery => match b {
            b'\t' => Drop(Lex::Recovery),
            0..=0x1f | 0xfe | 0xff | b'[' | b']' | b'{' | b'}' | b':' | b',' => RestartBefore,
            _ => Drop(Lex::Recovery),
        },
        Lex::DqString | Lex::SqString => {
            let quote = if state == Lex::DqString { b'"' } else { b'\'' };
            match b {
                b'\\' => Go(if state == Lex::DqString {
                    Lex::DqEscape
                } else {
                    Lex::SqEscape
                }),
                _ if b == quote => Emit(Kind::String),
                0x20..=0xfd => Go(state),
                _ => Error,
            }
        }
        Lex::DqEscape | Lex::SqEscape => match b {
            0x20..=0xfd => Go(if state == Lex::DqEscape {
                Lex::DqString
            } else {
                Lex::SqString
            }),
            _ => Error,
        },
        Lex::Zero => match b {
            b'0'..=b'9' => Error,
            b'.' => Go(Lex::Mantissa),
            _ => EmitBefore(Kind::Integer),
        },
        Lex::ExpDigits => {
            if digit {
                Go(Lex::ExpDigits)
            } else {
                EmitBefore(Kind::Float)
            }
        }
        Lex::ExpSign => {
            if digit {
                Go(Lex::ExpDigits)
            } else {
                Error
            }
        }
        Lex::ExpE => match b {
            b'-' | b'+' => Go(Lex::ExpSign),
            b'0'..=b'9' => Go(Lex::ExpDigits),
            _ => Error,
        },
        Lex::MantissaDigits => match b {
            b'0'..=b'9' => Go(Lex::MantissaDigits),
            b'e' | b'E' => Go(Lex::ExpE),
            _ => EmitBefore(Kind::Float),
        },
        Lex::Mantissa => {
            if digit {
                Go(Lex::MantissaDigits)
            } else {
                Error
            }
        }
        Lex::Digits => match b {
            b'0'..=b'9' => Go(Lex::Digits),
            b'e' | b'E' => Go(Lex::ExpE),
            b'.' => Go(Lex::Mantissa),
            _ => EmitBefore(Kind::Integer),
        },
        Lex::Sign => match b {
            b'0' => Go(Lex::Zero),
            b'1'..=b'9' => Go(Lex::Digits),
            _ => Error,
        },
        Lex::Keyword => match b {
            b'a'..=b'z' => Go(Lex::Keyword),
            _ => EmitBefore(Kind::Keyword),
        },
        Lex::Start => match b {
            b'"' => Go(Lex::DqString),
            b'\'' => Go(Lex::SqString),
            b'0' => Go(Lex::Zero),
            b'1'..=b'9' => Go(Lex::Digits),
            b'-' => Go(Lex::Sign),
            b'{' => Emit(Kind::LCurly),
            b'}' => Emit(Kind::RCurly),
            b'[' => Emit(Kind::LSquare),
            b']' => Emit(Kind::RSquare),
            b',' => Emit(Kind::Comma),
            b':' => Emit(Kind::Colon),
            b'a'..=b'z' => Go(Lex::Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Drop(Lex::Start),
            _ => Error,
        },
    }
}

#[derive(Debug)]
struct Token {
    kind: Kind,
    text: Vec<u8>,
}

/// The agent's JSON input state: feed it bytes, collect complete values or errors.
#[derive(Debug)]
pub struct Framer {
    state: Lex,
    token: Vec<u8>,
    tokens: Vec<Token>,
    braces: i64,
    brackets: i64,
    token_size: usize,
}

impl Default for Framer {
    fn default() -> Self {
        Self::new()
    }
}

/// One thing the framer found in the stream: a JSON value or a parse error to answer.
pub type Framed = Result<Value, QgaError>;

impl Framer {
    pub fn new() -> Self {
        Framer {
            state: Lex::Start,
            token: Vec::new(),
            tokens: Vec::new(),
            braces: 0,
            brackets: 0,
            token_size: 0,
        }
    }

    /// True when no partial value is pending (the stream is between requests).
    pub fn is_idle(&self) -> bool {
        self.state == Lex::Start && self.tokens.is_empty() && self.token.is_empty()
    }

    /// Feeds bytes; every complete value (or error) is pushed to `out` in order.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Framed>) {
        for &b in bytes {
            self.feed_byte(b, out);
        }
    }

    fn feed_byte(&mut self, b: u8, out: &mut Vec<Framed>) {
        loop {
            match step(self.state, b) {
                Step::Go(s) => {
                    self.token.push(b);
                    self.state = s;
                    break;
                }
                Step::Drop(s) => {
                    self.token.clear();
                    self.state = s;
                    break;
                }
                Step::Emit(kind) => {
                    self.token.push(b);
                    self.finish_token(kind, out);
                    self.state = Lex::Start;
                    break;
                }
                Step::EmitBefore(kind) => {
                    self.finish_token(kind, out);
                    self.state = Lex::Start;
                }
                Step::RestartBefore => {
                    self.token.clear();
                    self.state = Lex::Start;
                }
                Step::Error => {
                    self.token.push(b);
                    let text = std::mem::take(&mut self.token);
                    self.reset_stream();
                    out.push(Err(stray(&text)));
                    self.state = Lex::Recovery;
                    break;
                }
            }
        }
        if self.token.len() > MAX_TOKEN_SIZE {
            self.token = Vec::new();
            self.state = Lex::Start;
            self.reset_stream();
            out.push(Err(QgaError::generic("JSON token size limit exceeded")));
        }
    }

    fn reset_stream(&mut self) {
        self.tokens = Vec::new();
        self.braces = 0;
        self.brackets = 0;
        self.token_size = 0;
    }

    fn finish_token(&mut self, kind: Kind, out: &mut Vec<Framed>) {
        let text = std::mem::take(&mut self.token);
        match kind {
            Kind::LCurly => self.braces += 1,
            Kind::RCurly => self.braces -= 1,
            Kind::LSquare => self.brackets += 1,
            Kind::RSquare => self.brackets -= 1,
            _ => {}
        }
        let limit = if self.token_size + text.len() + 1 > MAX_TOKEN_SIZE {
            Some("JSON token size limit exceeded")
        } else if self.tokens.len() + 1 > MAX_TOKEN_COUNT {
            Some("JSON token count limit exceeded")
        } else if self.braces + self.brackets > MAX_NESTING {
            Some("JSON nesting depth limit exceeded")
        } else {
            None
        };
        if let Some(msg) = limit {
            self.reset_stream();
            out.push(Err(QgaError::generic(msg)));
            return;
        }
        self.token_size += text.len();
        self.tokens.push(Token { kind, text });
        if (self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0 {
            return;
        }
        let tokens = std::mem::take(&mut self.tokens);
        self.reset_stream();
        let mut p = Parser {
            tokens: &tokens,
            pos: 0,
            err: None,
        };
        let value = p.value();
        out.push(match (value, p.err) {
            (_, Some(e)) => Err(e),
            (Some(v), None) => Ok(v),
            (None, None) => Err(QgaError::generic("JSON parse error, expecting value")),
        });
    }
}

/// The error a lone byte that is not UTF-8 gives: what the 0xFF a client sends to reset
/// the parser before `guest-sync-delimited` turns into (answered, as qemu-ga answers it,
/// but no cause for a warning in the guest's log).
pub fn is_resync(e: &QgaError) -> bool {
    e.desc == "JSON parse error, stray '\u{FFFD}'"
}

fn stray(text: &[u8]) -> QgaError {
    // The message is a C string in qemu-ga: it ends at the first NUL byte.
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    QgaError::generic(format!(
        "JSON parse error, stray '{}'",
        decode_mod_utf8_lossy(&text[..end])
    ))
}

/// Recursive descent over one balanced token run; the first error wins.
struct Parser<'t> {
    tokens: &'t [Token],
    pos: usize,
    err: Option<QgaError>,
}

impl Parser<'_> {
    fn fail(&mut self, msg: impl std::fmt::Display) {
        if self.err.is_none() {
            self.err = Some(QgaError::generic(format!("JSON parse error, {msg}")));
        }
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn pop(&mut self) -> Option<Kind> {
        let t = self.tokens.get(self.pos)?;
        self.pos += 1;
        Some(t.kind)
    }

    fn value(&mut self) -> Option<Value> {
        let Some(t) = self.peek() else {
            self.fail("premature EOI");
            return None;
        };
        match t.kind {
            Kind::LCurly => self.object(),
            Kind::LSquare => self.array(),
            Kind::String | Kind::Integer | Kind::Float => self.literal(),
            Kind::Keyword => {
                let word = String::from_utf8_lossy(&t.text).into_owned();
                self.pos += 1;
                match word.as_str() {
                    "true" => Some(Value::Bool(true)),
                    "false" => Some(Value::Bool(false)),
                    "null" => Some(Value::Null),
                    _ => {
                        self.fail(format_args!("invalid keyword '{word}'"));
                        None
                    }
                }
            }
            _ => {
                self.fail("expecting value");
                None
            }
        }
    }

    fn object(&mut self) -> Option<Value> {
        self.pos += 1;
        let mut map = Map::new();
        match self.peek() {
            None => {
                self.fail("premature EOI");
                return None;
            }
            Some(t) if t.kind == Kind::RCurly => {
                self.pos += 1;
                return Some(Value::Object(map));
            }
            Some(_) => {}
        }
        loop {
            self.pair(&mut map)?;
            match self.pop() {
                None => {
                    self.fail("premature EOI");
                    return None;
                }
                Some(Kind::RCurly) => return Some(Value::Object(map)),
                Some(Kind::Comma) => {}
                Some(_) => {
                    self.fail("expected separator in dict");
                    return None;
                }
            }
        }
    }

    fn pair(&mut self, map: &mut Map<String, Value>) -> Option<()> {
        if self.peek().is_none() {
            self.fail("premature EOI");
            return None;
        }
        let key = match self.value() {
            Some(Value::String(k)) => k,
            _ => {
                self.fail("key is not a string in object");
                return None;
            }
        };
        match self.pop() {
            None => {
                self.fail("premature EOI");
                return None;
            }
            Some(Kind::Colon) => {}
            Some(_) => {
                self.fail("missing : in object pair");
                return None;
            }
        }
        let Some(value) = self.value() else {
            self.fail("Missing value in dict");
            return None;
        };
        if map.contains_key(&key) {
            self.fail("duplicate key");
            return None;
        }
        map.insert(key, value);
        Some(())
    }

    fn array(&mut self) -> Option<Value> {
        self.pos += 1;
        let mut list = Vec::new();
        match self.peek() {
            None => {
                self.fail("premature EOI");
                return None;
            }
            Some(t) if t.kind == Kind::RSquare => {
                self.pos += 1;
                return Some(Value::Array(list));
            }
            Some(_) => {}
        }
        loop {
            let Some(v) = self.value() else {
                self.fail("expecting value");
                return None;
            };
            list.push(v);
            match self.pop() {
                None => {
                    self.fail("premature EOI");
                    return None;
                }
                Some(Kind::RSquare) => return Some(Value::Array(list)),
                Some(Kind::Comma) => {}
                Some(_) => {
                    self.fail("expected separator in list");
                    return None;
                }
            }
        }
    }

    fn literal(&mut self) -> Option<Value> {
        let t = &self.tokens[self.pos];
        self.pos += 1;
        let text = String::from_utf8_lossy(&t.text).into_owned();
        match t.kind {
            Kind::String => match parse_string(&t.text) {
                Ok(s) => Some(Value::String(s)),
                Err(msg) => {
                    self.fail(msg);
                    None
                }
            },
            Kind::Integer => {
                if let Ok(i) = text.parse::<i64>() {
                    Some(Value::Number(i.into()))
                } else if let (false, Ok(u)) = (text.starts_with('-'), text.parse::<u64>()) {
                    Some(Value::Number(u.into()))
                } else {
                    Some(float(&text))
                }
            }
            _ => Some(float(&text)),
        }
    }
}

/// qemu-ga keeps doubles; a value beyond f64 (qemu prints `inf`) has no JSON form here.
fn float(text: &str) -> Value {
    text.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

fn hex4(s: &[u8]) -> Option<u32> {
    if s.len() < 4 {
        return None;
    }
    let mut cp = 0u32;
    for &c in &s[..4] {
        cp = (cp << 4) | char::from(c).to_digit(16)?;
    }
    Some(cp)
}

/// Decodes a string token (with its quotes) with qemu-ga's escapes and messages.
fn parse_string(tok: &[u8]) -> Result<String, String> {
    let quote = tok[0];
    let body = &tok[1..];
    let mut out = String::new();
    let mut i = 0;
    while i < body.len() && body[i] != quote {
        let c = body[i];
        if c == b'\\' {
            let beg = i;
            let esc = body.get(i + 1).copied().unwrap_or(0);
            i += 2;
            match esc {
                b'"' => out.push('"'),
                b'\'' => out.push('\''),
                b'\\' => out.push('\\'),
                b'/' => out.push('/'),
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => {
                    let mut cp = hex4(&body[i.min(body.len())..])
                        .map(i64::from)
                        .unwrap_or(-1);
                    i += 4;
                    if (0xD800..=0xDBFF).contains(&cp)
                        && body.get(i) == Some(&b'\\')
                        && body.get(i + 1) == Some(&b'u')
                    {
                        let lead = cp;
                        cp = -1;
                        if let Some(trail) = hex4(&body[(i + 2).min(body.len())..])
                            && (0xDC00..=0xDFFF).contains(&trail)
                        {
                            cp = 0x10000 + ((lead & 0x3FF) << 10) + i64::from(trail & 0x3FF);
                            i += 6;
                        }
                    }
                    match u32::try_from(cp).ok().and_then(valid_codepoint) {
                        Some(ch) => out.push(ch),
                        None => {
                            // The quoted span is at most what the token holds.
                            let end = i.min(body.len());
                            let span = decode_mod_utf8_lossy(&body[beg..end.max(beg)]);
                            return Err(format!("{span} is not a valid Unicode character"));
                        }
                    }
                }
                _ => return Err("invalid escape sequence in string".into()),
            }
        } else {
            match next_mod_utf8(&body[i..]) {
                ModUtf8::Char(ch, n) => {
                    out.push(ch);
                    i += n;
                }
                ModUtf8::Invalid(_) => return Err("invalid UTF-8 sequence in string".into()),
            }
        }
    }
    Ok(out)
}

fn valid_codepoint(cp: u32) -> Option<char> {
    if (0xFDD0..=0xFDEF).contains(&cp) || (cp & 0xFFFE) == 0xFFFE {
        return None;
    }
    char::from_u32(cp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> Vec<Framed> {
        let mut f = Framer::new();
        let mut out = Vec::new();
        for c in chunks {
            f.feed(c, &mut out);
        }
        out
    }

    fn errs(v: &[Framed]) -> Vec<String> {
        v.iter()
            .map(|r| match r {
                Ok(v) => format!("ok {v}"),
                Err(e) => e.desc.clone(),
            })
            .collect()
    }

    #[test]
    fn objects_split_and_joined() {
        let out = run(&[b"{\"execute\":", b"\"guest-ping\"}{\"execute\":\"a\"}"]);
        assert_eq!(
            errs(&out),
            ["ok {\"execute\":\"guest-ping\"}", "ok {\"execute\":\"a\"}"]
        );
    }

    #[test]
    fn raw_ff_is_one_stray_error_then_resync() {
        let out = run(&[b"\xff{\"execute\":\"guest-sync\"}"]);
        assert_eq!(
            errs(&out),
            [
                "JSON parse error, stray '\u{FFFD}'",
                "ok {\"execute\":\"guest-sync\"}"
            ]
        );
        // Told apart from other garbage, which the agent logs as a warning.
        assert!(matches!(&out[0], Err(e) if is_resync(e)));
        let garbage = run(&[b"}"]);
        assert!(matches!(&garbage[0], Err(e) if !is_resync(e)));
    }

    #[test]
    fn keyword_waits_for_its_end() {
        // Measured against qemu-ga 7.2: "garbage" alone answers nothing until "}".
        assert!(run(&[b"garbage"]).is_empty());
        assert_eq!(
            errs(&run(&[b"garbage", b"}"])),
            [
                "JSON parse error, invalid keyword 'garbage'",
                "JSON parse error, expecting value"
            ]
        );
    }

    #[test]
    fn control_byte_in_string_is_stray_then_recovers() {
        let out = run(&[b"{\"execute\":\"gu\xc3\xa9st\x7f\x01/\\\"}"]);
        assert_eq!(
            errs(&out),
            [
                "JSON parse error, stray '\"gu\u{e9}st\u{7f}\u{1}'",
                "JSON parse error, expecting value"
            ]
        );
    }

    #[test]
    fn parser_messages() {
        let cases: &[(&[u8], &str)] = &[
            (b"{\"a\" 1}", "JSON parse error, missing : in object pair"),
            (b"{\"a\":1]", "JSON parse error, expected separator in dict"),
            (b"{1:2}", "JSON parse error, key is not a string in object"),
            (b"{\"a\":1,}", "JSON parse error, expecting value"),
            (b"{\"a\":1,\"a\":2}", "JSON parse error, duplicate key"),
            (b"[1 2]", "JSON parse error, expected separator in list"),
            (
                b"\"\\x\"",
                "JSON parse error, invalid escape sequence in string",
            ),
            (
                b"\"\\uD800\"",
                "JSON parse error, \\uD800 is not a valid Unicode character",
            ),
            (
                b"\"\xc3\"",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                errs(&run(&[input])),
                [*want],
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn strings_and_numbers() {
        let out = run(&[b"['a\\u00e9\\ud83d\\ude00\\u0000', -0, 18446744073709551615, 1e2]"]);
        let v = out[0].as_ref().unwrap();
        assert_eq!(v[0], "a\u{e9}\u{1F600}\0");
        assert_eq!(v[1], 0);
        assert_eq!(v[2], u64::MAX);
        assert_eq!(v[3].as_f64(), Some(100.0));
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = vec![b'['; 2000];
        let out = run(&[&deep]);
        assert_eq!(errs(&out)[0], "JSON nesting depth limit exceeded");
    }

    proptest::proptest! {
        /// Whatever precedes it, a raw 0xFF and a request resynchronise the stream
        /// and the request is answered: this is how every qemu-ga client recovers.
        #[test]
        fn garbage_never_blocks_the_next_request(garbage in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut f = Framer::new();
            let mut out = Vec::new();
            f.feed(&garbage, &mut out);
            out.clear();
            f.feed(b"\xff", &mut out);
            f.feed(b"{\"execute\":\"guest-ping\"}", &mut out);
            proptest::prop_assert!(out.iter().any(|r| matches!(r, Ok(v) if v["execute"] == "guest-ping")),
                "no request after {:?}: {:?}", garbage, out);
        }
    }
}
