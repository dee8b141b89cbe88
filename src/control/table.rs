//! `reuse-launch status` as a table, in the manner of `pm2 ls`: rendered by the client from the
//! status JSON (so the table never shows anything `--json` does not). It reads the object as
//! it comes, member by member, so that a launcher of another version still gets a table: what
//! is missing or of another type shows as `?` or `-`.

use serde_json::Value;

/// The header line and the table, ending with a newline.
pub fn render(status: &Value) -> String {
    let num = |k: &str| status.get(k).and_then(Value::as_u64);
    let text = |k: &str| status.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    let list = |k: &str| status.get(k).and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
    let rows = list("workers");
    let binds: Vec<&str> = list("binds").iter().filter_map(Value::as_str).collect();
    let mut header = vec![
        format!("launcher {}", num("pid").map_or("?".into(), |p| p.to_string())),
        format!("{} mode", text("mode")),
        if binds.is_empty() { "no sockets".into() } else { binds.join(", ") },
        format!("gen {}", num("generation").unwrap_or(0)),
    ];
    if let Some(kind) = status.get("containment").and_then(Value::as_str) {
        header.insert(3, format!("containment {kind}"));
    }
    if let Some(roll) = status.get("roll").filter(|r| !r.is_null()) {
        let n = |k: &str| roll.get(k).and_then(Value::as_u64).unwrap_or(0);
        header.push(format!("rolling to gen {} ({}/{})", n("generation"), n("done"), n("slots")));
    }
    header.push(format!("{}/{} workers ready", num("ready").unwrap_or(0), num("desired").unwrap_or(0)));
    if status.get("stopping").and_then(Value::as_bool) == Some(true) {
        header.push("stopping".into());
    }

    let mut out = header.join("  ");
    out.push('\n');
    if let Some(a) = status.get("autoscale").filter(|a| !a.is_null()) {
        out.push_str(&autoscale(a));
        out.push('\n');
    }

    let titles = ["slot", "pid", "gen", "state", "uptime", "restarts", "last exit", "cpu", "mem", "queue"];
    let mut table: Vec<Vec<String>> = vec![titles.iter().map(|t| t.to_string()).collect()];
    for r in rows {
        let n = |k: &str| r.get(k).and_then(Value::as_u64);
        let f = |k: &str| r.get(k).and_then(Value::as_f64);
        let dash = || "-".to_string();
        let mut state = r.get("state").and_then(Value::as_str).unwrap_or("?").to_string();
        if let Some(b) = f("backoff_s") {
            state = format!("{state} {}", duration(b));
        }
        if r.get("retiring").and_then(Value::as_bool) == Some(true) {
            state.push_str(" (retiring)");
        }
        table.push(vec![
            n("slot").map_or_else(dash, |s| s.to_string()),
            n("pid").map_or_else(dash, |p| p.to_string()),
            n("generation").map_or_else(dash, |g| g.to_string()),
            state,
            f("uptime_s").map_or_else(dash, duration),
            n("restarts").map_or_else(dash, |x| x.to_string()),
            r.get("last_exit").and_then(Value::as_str).map_or_else(dash, str::to_string),
            f("cpu_percent").map_or_else(dash, |c| format!("{c:.1}%")),
            n("rss_bytes").map_or_else(dash, bytes),
            match (n("queue"), n("queue_max")) {
                (Some(q), Some(m)) => format!("{q}/{m}"),
                _ => dash(),
            },
        ]);
    }
    let widths: Vec<usize> =
        (0..titles.len()).map(|c| table.iter().map(|row| row[c].chars().count()).max().unwrap_or(0)).collect();
    for row in &table {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `autoscale 1..3 (2 desired): scaled up to 3: at least one connection waiting per slot for 2s (4.1s ago)`.
fn autoscale(a: &Value) -> String {
    let n = |k: &str| a.get(k).and_then(Value::as_u64).unwrap_or(0);
    let bounds = format!("autoscale {}..{}", n("min"), n("max"));
    match a.get("last").filter(|l| !l.is_null()) {
        Some(last) => {
            let text = last.get("text").and_then(Value::as_str).unwrap_or("?");
            let ago = last.get("ago_s").and_then(Value::as_f64).map_or("?".into(), duration);
            format!("{bounds}: {text} ({ago} ago)")
        }
        None => format!("{bounds}: no automatic decision yet"),
    }
}

/// `42s`, `3m05s`, `2h07m`, `4d03h`; under 10 s with a tenth.
fn duration(secs: f64) -> String {
    if secs < 10.0 {
        return format!("{secs:.1}s");
    }
    let s = secs as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `812 KiB`, `23.4 MiB`, `1.2 GiB`.
fn bytes(n: u64) -> String {
    const K: f64 = 1024.0;
    let x = n as f64;
    if x < K * K {
        format!("{:.0} KiB", x / K)
    } else if x < K * K * K {
        format!("{:.1} MiB", x / K / K)
    } else {
        format!("{:.1} GiB", x / K / K / K)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::wire::parse;

    #[test]
    fn renders_header_and_rows() {
        let v = parse(
            r#"{"ok":true,"pid":10,"mode":"reuseport","binds":["127.0.0.1:8080"],"generation":2,"desired":2,"ready":1,
            "roll":{"generation":3,"done":1,"slots":2},"stopping":false,"control":"/x","workers":[
            {"slot":0,"pid":11,"generation":2,"state":"ready","uptime_s":75.2,"cpu_percent":0.5,"rss_bytes":25165824,
             "restarts":1,"last_exit":"killed by SIGKILL","queue":0,"queue_max":4096,"backoff_s":null,"retiring":false},
            {"slot":1,"pid":null,"generation":2,"state":"backoff","uptime_s":null,"cpu_percent":null,"rss_bytes":null,
             "restarts":4,"last_exit":"exited with status 1","queue":3,"queue_max":4096,"backoff_s":2.25,"retiring":false}]}"#,
        )
        .unwrap();
        let t = render(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "launcher 10  reuseport mode  127.0.0.1:8080  gen 2  rolling to gen 3 (1/2)  1/2 workers ready"
        );
        assert_eq!(
            lines[1],
            "slot  pid  gen  state         uptime  restarts  last exit             cpu   mem       queue"
        );
        assert_eq!(
            lines[2],
            "0     11   2    ready         1m15s   1         killed by SIGKILL     0.5%  24.0 MiB  0/4096"
        );
        assert_eq!(
            lines[3],
            "1     -    2    backoff 2.2s  -       4         exited with status 1  -     -         3/4096"
        );
    }

    #[test]
    fn the_header_names_the_containment() {
        let v = parse(
            r#"{"pid":10,"mode":"reuseport","binds":["127.0.0.1:8080"],"generation":1,"desired":1,"ready":1,
            "roll":null,"stopping":false,"containment":"cgroup","cgroup":"/sys/fs/cgroup/x/reuse-launch.10","workers":[]}"#,
        )
        .unwrap();
        assert_eq!(
            render(&v).lines().next().unwrap(),
            "launcher 10  reuseport mode  127.0.0.1:8080  containment cgroup  gen 1  1/1 workers ready"
        );
    }

    #[test]
    fn the_autoscale_line_shows_the_bounds_and_the_last_decision() {
        let v = parse(
            r#"{"pid":10,"mode":"reuseport","binds":[],"generation":1,"desired":3,"ready":3,"workers":[],
            "autoscale":{"min":1,"max":3,"last":{"text":"scaled up to 3: at least one connection waiting per slot for 2s","ago_s":4.12}}}"#,
        )
        .unwrap();
        let t = render(&v);
        assert_eq!(
            t.lines().nth(1).unwrap(),
            "autoscale 1..3: scaled up to 3: at least one connection waiting per slot for 2s (4.1s ago)"
        );
        let v = parse(r#"{"pid":10,"workers":[],"autoscale":{"min":2,"max":4,"last":null}}"#).unwrap();
        assert_eq!(render(&v).lines().nth(1).unwrap(), "autoscale 2..4: no automatic decision yet");
        let v = parse(r#"{"pid":10,"workers":[],"autoscale":null}"#).unwrap();
        assert_eq!(
            render(&v).lines().nth(1).unwrap(),
            "slot  pid  gen  state  uptime  restarts  last exit  cpu  mem  queue"
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(duration(3.25), "3.2s");
        assert_eq!(duration(3725.0), "1h02m");
        assert_eq!(duration(90000.0), "1d01h");
        assert_eq!(bytes(512 * 1024), "512 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }
}
