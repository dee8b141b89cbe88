//! The value syntaxes the flags share: durations (`500ms`, `2s`, `1m`), sizes (`512M`, `2G`),
//! signals (`TERM`, `15`), worker counts (`N`, `auto`), and the default backlog. Each parser
//! returns what was expected on error; the flag is named by the caller.

use std::time::Duration;

use nix::sys::signal::Signal;

use super::usage;
use crate::error::Error;

pub(super) fn parse_workers(s: &str) -> Result<usize, Error> {
    if s == "auto" {
        return Ok(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    }
    match s.parse::<usize>() {
        Ok(0) => Err(usage("--workers", s, "must be at least 1")),
        Ok(n) if n > 4096 => Err(usage("--workers", s, "at most 4096 workers")),
        Ok(n) => Ok(n),
        Err(_) => Err(usage("--workers", s, "expected a number or 'auto' (or MIN..MAX)")),
    }
}

/// `net.core.somaxconn`, the ceiling the kernel applies to any backlog anyway.
pub(super) fn default_backlog() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(4096)
}

/// Parse `512M`, `2G`, `1.5G`, `300K`, `1T` (powers of 1024; `MB`, `MiB` and lowercase too);
/// a bare number is bytes. At least 1 MiB, so that a typo cannot recycle every worker at once.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = || "expected a size like 512M or 2G (K, M, G, T), at least 1M".to_string();
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| err())?;
    let unit = unit.trim().to_ascii_uppercase();
    // One optional `B` or `iB` after the letter (`B` alone: bytes), not several.
    let letter = unit.strip_suffix("IB").filter(|l| !l.is_empty()).or_else(|| unit.strip_suffix('B')).unwrap_or(&unit);
    let shift = match letter {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(err()),
    };
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < (1u64 << 20) as f64 || bytes > u64::MAX as f64 {
        return Err(err());
    }
    Ok(bytes as u64)
}

/// Parse `500ms`, `2s`, `1.5s`, `1m`, `1h`; a bare number is seconds. Exact to the nanosecond
/// (decimal arithmetic, not floating point: `9737498469ms` is that many milliseconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || "expected a duration like 500ms, 2s or 1m".to_string();
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let nanos_per_unit: u128 = match unit {
        "ms" => 1_000_000,
        "" | "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return Err(err()),
    };
    let (whole, fraction) = num.split_once('.').unwrap_or((num, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(err());
    }
    // Leading zeros aside, more than 20 digits is far beyond the limit below anyway.
    let whole = whole.trim_start_matches('0');
    if whole.len() > 20 {
        return Err(err());
    }
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| err())? };
    // Digits past the 18th are below a nanosecond for every unit: dropped.
    let fraction = &fraction[..fraction.len().min(18)];
    let fraction_nanos = if fraction.is_empty() {
        0
    } else {
        fraction.parse::<u128>().map_err(|_| err())? * nanos_per_unit / 10u128.pow(fraction.len() as u32)
    };
    let nanos = whole * nanos_per_unit + fraction_nanos;
    if nanos > 86400 * 365 * 1_000_000_000 {
        return Err(err());
    }
    Ok(Duration::from_nanos(nanos as u64))
}

/// Parse `TERM`, `SIGTERM`, `term` or `15`.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let err = || "expected a signal name like TERM or INT, or its number".to_string();
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| err());
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    name.parse::<Signal>().map_err(|_| err())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("300MiB").unwrap(), 300 << 20);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        for bad in ["", "M", "12X", "-1G", "100K", "1e3G", "nanG"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("TERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("sigint").unwrap(), Signal::SIGINT);
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert!(parse_signal("NOPE").is_err());
    }
}
