//! How the control protocol's JSON looks on the wire, both ends: serde_json with a formatter
//! ([`Line`]) that writes exactly what the launcher has always written, and the words of a
//! malformed-JSON error ([`invalid_json`]).
//!
//! The formatter keeps three habits of the hand-written printer this replaced (the README's
//! examples and scripts that compare answers depend on them): a whole number prints as an
//! integer (`"cpu_percent":0`, `"id":2` for `2.0`), backspace and form feed are `\u0008` and
//! `\u000c`, and U+2028/U+2029 are escaped as well, so that an answer is one line for every
//! reader, JavaScript's included. Everything else is serde_json's compact output.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::ser::{CharEscape, CompactFormatter, Formatter};

/// serde_json's compact formatter with the launcher's numbers and escapes (module docs).
pub struct Line;

impl Formatter for Line {
    fn write_f64<W: ?Sized + Write>(&mut self, w: &mut W, n: f64) -> io::Result<()> {
        // Not finite never gets here: serde_json writes `null` for it.
        if n.fract() == 0.0 && n.abs() < 1e15 {
            write!(w, "{}", n as i64)
        } else {
            write!(w, "{n}")
        }
    }

    fn write_f32<W: ?Sized + Write>(&mut self, w: &mut W, n: f32) -> io::Result<()> {
        self.write_f64(w, f64::from(n))
    }

    fn write_char_escape<W: ?Sized + Write>(&mut self, w: &mut W, escape: CharEscape) -> io::Result<()> {
        match escape {
            CharEscape::Backspace => w.write_all(b"\\u0008"),
            CharEscape::FormFeed => w.write_all(b"\\u000c"),
            other => CompactFormatter.write_char_escape(w, other),
        }
    }

    fn write_string_fragment<W: ?Sized + Write>(&mut self, w: &mut W, fragment: &str) -> io::Result<()> {
        let mut rest = fragment;
        while let Some(i) = rest.find(['\u{2028}', '\u{2029}']) {
            w.write_all(&rest.as_bytes()[..i])?;
            let c = rest[i..].chars().next().expect("found at i");
            write!(w, "\\u{:04x}", c as u32)?;
            rest = &rest[i + c.len_utf8()..];
        }
        w.write_all(rest.as_bytes())
    }
}

/// `value` as one line of JSON, without the newline.
pub fn to_line<T: Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Line);
    // Serializing the protocol's types cannot fail: no map has a key that is not a string.
    value.serialize(&mut ser).expect("the control protocol's types serialize");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// How deep a request's values may nest: a value inside more than this many arrays or objects
/// is refused, as the launcher always did (serde_json's own limit is 128).
const MAX_DEPTH: usize = 32;

/// Parse one JSON text; Err is [`invalid_json`]'s sentence, or `nested too deeply` at the first
/// value nested more than [`MAX_DEPTH`] deep when no error comes before it.
pub fn parse(text: &str) -> Result<serde_json::Value, String> {
    let deep = too_deep(text.as_bytes());
    let parsed = serde_json::from_str(text);
    let serde_at = parsed.as_ref().err().map(|e| (error_at(text, e), e));
    match (deep, serde_at) {
        (Some(at), Some((err_at, _))) if at <= err_at => Err(format!("invalid JSON at byte {at}: nested too deeply")),
        (Some(at), None) => Err(format!("invalid JSON at byte {at}: nested too deeply")),
        (_, Some((_, e))) => Err(invalid_json(text, e)),
        (None, None) => parsed.map_err(|e| invalid_json(text, &e)),
    }
}

/// Where the first value nested more than [`MAX_DEPTH`] deep is looked for, if there is one:
/// right after the `:` or `,` before it (after an opening `[`'s blanks), where the launcher's own parser used to say so (a
/// scan of the structure only: strings are skipped, malformed text is serde_json's to tell).
fn too_deep(b: &[u8]) -> Option<usize> {
    let (mut open, mut want_value, mut i, mut from) = (Vec::new(), true, 0, 0);
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if want_value && c != b']' && c != b'}' && open.len() > MAX_DEPTH {
            return Some(from);
        }
        // An array's first value is looked for after the blanks that follow its `[`.
        from = match c {
            b'[' => i + 1 + b[i + 1..].iter().take_while(|x| x.is_ascii_whitespace()).count(),
            _ => i + 1,
        };
        match c {
            b'[' | b'{' => {
                open.push(c);
                want_value = c == b'[';
            }
            b']' | b'}' => {
                open.pop();
                want_value = false;
            }
            b':' => want_value = true,
            b',' => want_value = open.last() == Some(&b'['),
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                want_value = false;
            }
            _ => want_value = false,
        }
        i += 1;
    }
    None
}

/// The byte serde_json stopped at: its column is that byte counted from 1 on its line; at the
/// end of the text, the length.
fn error_at(text: &str, e: &serde_json::Error) -> usize {
    let line_start: usize = text.split_inclusive('\n').take(e.line().saturating_sub(1)).map(str::len).sum();
    let eof = e.classify() == serde_json::error::Category::Eof;
    (line_start + e.column()).saturating_sub(usize::from(!eof)).min(text.len())
}

/// `invalid JSON at byte 4: expected ':'`: where serde_json stopped in `text`, and why. A value
/// that cannot start where it does is `unexpected character` at its first byte, and text after
/// a complete value is `unexpected text after the value`, as the launcher has always said them
/// (the README shows the first); other causes are serde_json's words.
pub fn invalid_json(text: &str, e: &serde_json::Error) -> String {
    let full = e.to_string();
    let cause = full.strip_suffix(&format!(" at line {} column {}", e.line(), e.column())).unwrap_or(&full);
    let mut at = error_at(text, e);
    let cause = match cause {
        "expected value" => "unexpected character",
        "expected ident" => {
            // A misspelt true/false/null: from its first letter.
            while at > 0 && text.as_bytes()[at - 1].is_ascii_lowercase() {
                at -= 1;
            }
            "unexpected character"
        }
        "trailing characters" => "unexpected text after the value",
        "recursion limit exceeded" => "nested too deeply",
        other => return format!("invalid JSON at byte {at}: {}", other.replace('`', "'")),
    };
    format!("invalid JSON at byte {at}: {cause}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn numbers_print_as_integers_when_whole() {
        assert_eq!(to_line(&3u64), "3");
        assert_eq!(to_line(&2.5), "2.5");
        assert_eq!(to_line(&0.0), "0");
        assert_eq!(to_line(&-4.0), "-4");
        assert_eq!(to_line(&f64::NAN), "null");
        assert_eq!(to_line(&1e15), "1000000000000000");
        assert_eq!(to_line(&json!({"id": [2.0, 1e-7]})), r#"{"id":[2,0.0000001]}"#);
    }

    #[test]
    fn escapes_keep_an_answer_on_one_line() {
        let s = "a\"b\\c\n\r\t\u{8}\u{c}\u{1}\u{2028}x\u{2029}\u{7f}é😀";
        let line = to_line(s);
        assert_eq!(line, r#""a\"b\\c\n\r\t\u0008\u000c\u0001\u2028x\u2029"#.to_string() + "\u{7f}é😀\"");
        assert_eq!(serde_json::from_str::<String>(&line).unwrap(), s);
    }

    #[test]
    fn malformed_json_is_named_as_before() {
        for (text, said) in [
            ("not json", "invalid JSON at byte 0: unexpected character"),
            ("this is not json", "invalid JSON at byte 0: unexpected character"),
            (r#"{"a":tru}"#, "invalid JSON at byte 5: unexpected character"),
            ("x", "invalid JSON at byte 0: unexpected character"),
            (r#"{"cmd":"status"} x"#, "invalid JSON at byte 17: unexpected text after the value"),
            (r#"{"a"}"#, "invalid JSON at byte 4: expected ':'"),
            ("[1 2]", "invalid JSON at byte 3: expected ',' or ']'"),
            (r#"{"cmd":"status""#, "invalid JSON at byte 15: EOF while parsing an object"),
            ("", "invalid JSON at byte 0: EOF while parsing a value"),
        ] {
            assert_eq!(parse(text).unwrap_err(), said, "{text:?}");
        }
        let deep = "[".repeat(10_000);
        assert!(parse(&deep).unwrap_err().ends_with("nested too deeply"));
        // As the launcher always had it: 33 nested arrays parse, a 34th (a value 33 deep) does not.
        let nest = |n: usize, inner: &str| format!("{}{inner}{}", "[".repeat(n), "]".repeat(n));
        assert!(parse(&nest(33, "")).is_ok());
        assert_eq!(parse(&nest(34, "")).unwrap_err(), "invalid JSON at byte 33: nested too deeply");
        assert_eq!(parse(&nest(33, "1")).unwrap_err(), "invalid JSON at byte 33: nested too deeply");
        let obj = format!("{}{{\"k\": 1}}{}", "[".repeat(32), "]".repeat(32));
        assert_eq!(parse(&obj).unwrap_err(), "invalid JSON at byte 37: nested too deeply");
        assert!(parse(&format!("{}\"[[[\"{}", "[".repeat(33), "]".repeat(33))).is_err(), "a string 33 deep");
        let spaced = format!("{}{}", "[ ".repeat(34), "]".repeat(34));
        assert_eq!(parse(&spaced).unwrap_err(), "invalid JSON at byte 66: nested too deeply");
        // An error before the depth is reported as it is.
        assert!(parse(&format!("[x{}", "[".repeat(40))).unwrap_err().contains("at byte 1: unexpected character"));
        assert_eq!(parse(" {\"a\":[1,null]} ").unwrap(), json!({"a": [1, Value::Null]}));
    }
}
