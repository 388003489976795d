//! The daemon's log: lines for people by default, one JSON object a line
//! with `MORA_LOG_FORMAT=json`, a clear refusal of another format.

use std::process::Stdio;
use std::time::Duration;

use mora::{one_line_failure, tiny_llama, wait_until, Env};

#[test]
fn json_logs_are_one_object_a_line_with_the_events_fields() {
    let env = Env::new("log-json");
    let log_path = env.scratch.join("daemon.log");
    let mut daemon = env
        .command("mora-cache")
        .args(["serve", "--socket"])
        .arg(&env.socket)
        .env("MORA_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let socket = env.socket.clone();
    assert!(wait_until(Duration::from_secs(20), || std::os::unix::net::UnixStream::connect(&socket).is_ok()));
    env.admin_ok(&["load", tiny_llama().to_str().unwrap()]);
    env.admin_ok(&["stop"]);
    let _ = daemon.wait();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "{log}");
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string() && l["message"].is_string(), "{l}");
    }
    assert!(lines.iter().any(|l| l["level"] == "INFO" && l["message"].as_str().unwrap().contains("resident")), "{log}");
}

#[test]
fn an_unknown_log_format_is_refused_in_one_line() {
    let env = Env::new("log-bad");
    let out = env.command("mora-cache").args(["serve", "--socket"]).arg(&env.socket).env("MORA_LOG_FORMAT", "xml").output().unwrap();
    let line = one_line_failure(&out);
    assert!(line.contains("MORA_LOG_FORMAT is `xml`: use `text` (the default) or `json`"), "{line}");
}
