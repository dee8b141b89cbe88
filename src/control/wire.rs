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

/// Parse one JSON text; Err is [`invalid_json`]'s sentence.
pub fn parse(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| invalid_json(text, &e))
}

/// `invalid JSON at byte 4: expected ':'`: where serde_json stopped in `text`, and why. A value
/// that cannot start where it does is `unexpected character` at its first byte, and text after
/// a complete value is `unexpected text after the value`, as the launcher has always said them
/// (the README shows the first); other causes are serde_json's words.
pub fn invalid_json(text: &str, e: &serde_json::Error) -> String {
    let full = e.to_string();
    let cause = full.strip_suffix(&format!(" at line {} column {}", e.line(), e.column())).unwrap_or(&full);
    let line_start: usize = text.split_inclusive('\n').take(e.line().saturating_sub(1)).map(str::len).sum();
    // serde_json's column is the byte it stopped at, counted from 1; at the end, the length.
    let eof = e.classify() == serde_json::error::Category::Eof;
    let mut at = (line_start + e.column()).saturating_sub(usize::from(!eof)).min(text.len());
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
        assert_eq!(parse(" {\"a\":[1,null]} ").unwrap(), json!({"a": [1, Value::Null]}));
    }
}
