//! The automatic scaling's part of the hand-over text (`state`): two kinds of line,
//! `autoscale FLAP FLAP_MS DOWN_MS UPS DOWNS` and one `scaled MS FROM TO BY REASON` per recent
//! change, times relative to the exec as everywhere in the state.

use std::fmt::Write as _;

use super::state::{dec, enc, opt};

/// The automatic scaling's memory: flaps (doublings, when the last was), the last automatic
/// scale-down, the counts of automatic changes, and the recent changes (when, from, to, by,
/// reason).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoscaleState {
    pub flap: u32,
    pub flap_ms: Option<i64>,
    pub last_down_ms: Option<i64>,
    pub ups: u64,
    pub downs: u64,
    pub history: Vec<(i64, usize, usize, String, String)>,
}

fn num<T: std::str::FromStr>(v: Option<&str>, what: &str) -> Result<T, String> {
    v.ok_or(format!("{what} missing"))?.parse::<T>().map_err(|_| format!("bad {what}"))
}

fn optn(v: Option<&str>, what: &str) -> Result<Option<i64>, String> {
    match v {
        Some("-") => Ok(None),
        other => num(other, what).map(Some),
    }
}

impl AutoscaleState {
    pub(super) fn encode(&self, o: &mut String) {
        let (flap, down) = (opt(&self.flap_ms), opt(&self.last_down_ms));
        let _ = writeln!(o, "autoscale {} {flap} {down} {} {}", self.flap, self.ups, self.downs);
        for (ms, from, to, by, reason) in &self.history {
            let _ = writeln!(o, "scaled {ms} {from} {to} {} {}", enc(by), enc(reason));
        }
    }

    /// One line of the kind `word`, its fields after the word in `f`.
    pub(super) fn decode<'a>(&mut self, word: &str, f: &mut impl Iterator<Item = &'a str>) -> Result<(), String> {
        if word == "autoscale" {
            self.flap = num(f.next(), "autoscale flap")?;
            self.flap_ms = optn(f.next(), "autoscale flap time")?;
            self.last_down_ms = optn(f.next(), "autoscale last down")?;
            self.ups = num(f.next(), "autoscale ups")?;
            self.downs = num(f.next(), "autoscale downs")?;
            return Ok(());
        }
        let ms = num(f.next(), "scaled time")?;
        let from = num(f.next(), "scaled from")?;
        let to = num(f.next(), "scaled to")?;
        let (by, reason) = (dec(f.next().unwrap_or("%")), dec(f.next().unwrap_or("%")));
        self.history.push((ms, from, to, by, reason));
        Ok(())
    }
}
