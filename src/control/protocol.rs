//! The control protocol's messages, both directions, as types serde derives: a [`Request`]
//! (what the client sends and the server decodes once, [`decode`], into what goes to the
//! loop), and a [`Response`] (what the server answers and the client reads, [`Reply`]).
//!
//! ```text
//! {"cmd":"scale","workers":"+2","id":1}    {"id":1,"ok":true,"pid":4069,"desired":6}
//! {"cmd":"nope"}                            {"ok":false,"error":"unknown cmd 'nope': ..."}
//! ```
//!
//! A request's other members are ignored (a newer client may send more); a reply's missing
//! members are their defaults (an older launcher may send fewer). `scale`'s number has one
//! form on the wire, `"N"`, `"+K"` or `"-K"`, and any of those or a JSON number N is accepted.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use super::status::Status;
use crate::event::{Command, Scale};

/// What a client asks; `{"cmd":"status"}`, `{"cmd":"scale","workers":"+2"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    Scale { workers: Scale },
    Roll,
    Stop,
    Reexec,
}

/// Every `cmd`, as an error lists them.
const CMDS: [&str; 5] = ["status", "scale", "roll", "stop", "reexec"];

impl From<Request> for Command {
    fn from(r: Request) -> Command {
        match r {
            Request::Status => Command::Status,
            Request::Scale { workers } => Command::Scale(workers),
            Request::Roll => Command::Roll,
            Request::Stop => Command::Stop,
            Request::Reexec => Command::Reexec,
        }
    }
}

/// A request line that is not a request: its `"id"` if it had one, and the error to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub id: Option<Value>,
    pub error: String,
}

/// One request line to its `"id"` (any JSON value, echoed) and the request, or the refusal.
pub fn decode(line: &str) -> Result<(Option<Value>, Request), Refused> {
    let refuse = |id: Option<&Value>, error: String| Refused { id: id.cloned(), error };
    let v = super::wire::parse(line).map_err(|e| refuse(None, format!("invalid request: {e}")))?;
    let Value::Object(members) = v else {
        return Err(refuse(None, "invalid request: expected a JSON object like {\"cmd\":\"status\"}".into()));
    };
    let id = members.get("id");
    match members.get("cmd") {
        Some(Value::String(cmd)) if CMDS.contains(&cmd.as_str()) => {}
        Some(Value::String(other)) => {
            return Err(refuse(id, format!("unknown cmd '{other}': expected status, scale, roll, stop or reexec")));
        }
        _ => return Err(refuse(id, "invalid request: no \"cmd\" (status, scale, roll, stop or reexec)".into())),
    }
    let id = id.cloned();
    match Request::deserialize(Value::Object(members)) {
        Ok(request) => Ok((id, request)),
        Err(e) => Err(Refused { id, error: format!("invalid request: {e}") }),
    }
}

/// `N` (that many workers), `+K` or `-K` (K more or fewer).
impl FromStr for Scale {
    type Err = String;

    fn from_str(s: &str) -> Result<Scale, String> {
        let err = || format!("expected N, +K or -K (a number of workers), not '{s}'");
        let t = s.trim();
        let number = |d: &str| {
            if d.bytes().all(|b| b.is_ascii_digit()) && !d.is_empty() {
                d.parse::<u32>().ok()
            } else {
                None
            }
        };
        if let Some(k) = t.strip_prefix('+') {
            return number(k).map(|k| Scale::By(k.into())).ok_or_else(err);
        }
        if let Some(k) = t.strip_prefix('-') {
            return number(k).map(|k| Scale::By(-i64::from(k))).ok_or_else(err);
        }
        number(t).map(|n| Scale::To(n as usize)).ok_or_else(err)
    }
}

/// The wire form: `4`, `+2`, `-1`.
impl fmt::Display for Scale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scale::To(n) => write!(f, "{n}"),
            Scale::By(k) if *k < 0 => write!(f, "{k}"),
            Scale::By(k) => write!(f, "+{k}"),
        }
    }
}

impl Serialize for Scale {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scale {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scale, D::Error> {
        // Through `deserialize_option`, so that a missing `"workers"` (which serde hands over
        // as none) gets the same sentence as `null` or `true`.
        d.deserialize_option(Workers)
    }
}

/// `"workers"`: a string `N`/`+K`/`-K`, or a whole non-negative number below 2^53.
struct Workers;

impl Workers {
    fn needed<E: de::Error>() -> E {
        E::custom("scale needs \"workers\": N, \"+K\" or \"-K\"")
    }

    fn not_a_number<E: de::Error>(n: f64) -> E {
        let shown = super::wire::to_line(&n);
        E::custom(format!("\"workers\": {shown} is not a number of workers (\"+K\" or \"-K\" change it by K)"))
    }
}

impl<'de> Visitor<'de> for Workers {
    type Value = Scale;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("N, \"+K\" or \"-K\"")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Scale, E> {
        s.parse().map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Scale, E> {
        if n < 1 << 53 {
            Ok(Scale::To(n as usize))
        } else {
            Err(Workers::not_a_number(n as f64))
        }
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Scale, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(Workers::not_a_number(n as f64)),
        }
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Scale, E> {
        if n >= 0.0 && n.fract() == 0.0 && n < 2f64.powi(53) {
            Ok(Scale::To(n as usize))
        } else {
            Err(Workers::not_a_number(n))
        }
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Scale, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_none<E: de::Error>(self) -> Result<Scale, E> {
        Err(Workers::needed())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Scale, E> {
        Err(Workers::needed())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Scale, E> {
        Err(Workers::needed())
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Scale, A::Error> {
        Err(Workers::needed())
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Scale, A::Error> {
        Err(Workers::needed())
    }
}

/// One answer line: `{"id":...,"ok":true,"pid":...,...}` or `{"id":...,"ok":false,"error":...}`
/// (`"id"` only when the request had one).
#[derive(Debug, Serialize)]
pub struct Response {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    pub ok: bool,
    #[serde(flatten)]
    pub body: Body,
}

/// What follows `"ok"`: each success starts with the launcher's `"pid"`.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Body {
    Failed { error: String },
    Status(Box<Status>),
    Scaled { pid: u32, desired: usize },
    Rolling { pid: u32, generation: u64 },
    Stopping { pid: u32, stopping: bool },
    Reexec { pid: u32, reexec: Upgrade },
}

/// The binary that takes over in a `reexec`, and what its `--version` printed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Upgrade {
    pub binary: String,
    pub version: String,
}

impl Response {
    pub fn failure(id: Option<Value>, error: impl Into<String>) -> Response {
        Response { id, ok: false, body: Body::Failed { error: error.into() } }
    }

    pub fn success(id: Option<Value>, body: Body) -> Response {
        Response { id, ok: true, body }
    }

    /// The line to send, with its newline.
    pub fn line(&self) -> String {
        let mut line = super::wire::to_line(self);
        line.push('\n');
        line
    }
}

/// An answer as the client reads it: what it prints and how it exits. Members it does not know
/// are ignored, and those a launcher did not send are their defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Reply {
    pub ok: bool,
    pub error: Option<String>,
    pub pid: u64,
    pub desired: u64,
    pub generation: u64,
    pub reexec: Option<Upgrade>,
    /// Which process image answered (`status`): another one after a `reexec`.
    pub image: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scale_forms() {
        assert_eq!("4".parse(), Ok(Scale::To(4)));
        assert_eq!(" +2 ".parse(), Ok(Scale::By(2)));
        assert_eq!("-1".parse(), Ok(Scale::By(-1)));
        for bad in ["", "+", "-", "x", "2.5", "+-1", "1e3", "99999999999"] {
            assert!(bad.parse::<Scale>().is_err(), "{bad:?}");
        }
        for s in [Scale::To(4), Scale::By(2), Scale::By(-3), Scale::By(0)] {
            assert_eq!(s.to_string().parse(), Ok(s));
        }
    }

    #[test]
    fn requests_on_the_wire_are_what_the_client_always_sent() {
        let scale = Request::Scale { workers: Scale::By(2) };
        assert_eq!(super::super::wire::to_line(&scale), r#"{"cmd":"scale","workers":"+2"}"#);
        assert_eq!(super::super::wire::to_line(&Request::Status), r#"{"cmd":"status"}"#);
        assert_eq!(decode(r#"{"cmd":"scale","workers":"+2"}"#), Ok((None, scale)));
        assert_eq!(decode(r#"{"id":[1],"cmd":"roll","more":{}}"#), Ok((Some(json!([1])), Request::Roll)));
        assert_eq!(decode(r#"{"cmd":"scale","workers":3.0}"#), Ok((None, Request::Scale { workers: Scale::To(3) })));
    }

    #[test]
    fn refusals_say_what_they_always_said() {
        let needs = "invalid request: scale needs \"workers\": N, \"+K\" or \"-K\"";
        for (line, error) in [
            (r#"{"cmd":"scale"}"#, needs),
            (r#"{"cmd":"scale","workers":null}"#, needs),
            (r#"{"cmd":"scale","workers":[2]}"#, needs),
            (
                r#"{"cmd":"scale","workers":-1}"#,
                "invalid request: \"workers\": -1 is not a number of workers (\"+K\" or \"-K\" change it by K)",
            ),
            (
                r#"{"cmd":"scale","workers":9007199254740992}"#,
                "invalid request: \"workers\": 9007199254740992 is not a number of workers (\"+K\" or \"-K\" change it by K)",
            ),
            (r#"{"cmd":"nope"}"#, "unknown cmd 'nope': expected status, scale, roll, stop or reexec"),
            (r#"{"cmd":5}"#, "invalid request: no \"cmd\" (status, scale, roll, stop or reexec)"),
            ("[1,2]", "invalid request: expected a JSON object like {\"cmd\":\"status\"}"),
            ("not json", "invalid request: invalid JSON at byte 0: unexpected character"),
        ] {
            assert_eq!(decode(line).map_err(|r| r.error), Err(error.to_string()), "{line}");
        }
        let refused = decode(r#"{"cmd":"scale","workers":"many","id":null}"#).unwrap_err();
        assert_eq!(refused.id, Some(Value::Null), "a null id is echoed too");
    }

    #[test]
    fn responses_keep_their_member_order() {
        let r = Response::success(Some(json!(1)), Body::Rolling { pid: 7, generation: 2 });
        assert_eq!(r.line(), "{\"id\":1,\"ok\":true,\"pid\":7,\"generation\":2}\n");
        let r = Response::success(
            None,
            Body::Reexec { pid: 7, reexec: Upgrade { binary: "/b".into(), version: "v".into() } },
        );
        assert_eq!(r.line(), "{\"ok\":true,\"pid\":7,\"reexec\":{\"binary\":\"/b\",\"version\":\"v\"}}\n");
        assert_eq!(Response::failure(None, "busy").line(), "{\"ok\":false,\"error\":\"busy\"}\n");
        let reply: Reply = serde_json::from_str(&r.line()).unwrap();
        assert_eq!((reply.ok, reply.pid, reply.reexec.unwrap().binary.as_str()), (true, 7, "/b"));
        let old: Reply = serde_json::from_str(r#"{"ok":true,"pid":3,"future":[1]}"#).unwrap();
        assert_eq!((old.pid, old.desired, old.image), (3, 0, None));
    }
}
