//! How the binaries log: `MORA_LOG` filters (as `RUST_LOG` does), and
//! `MORA_LOG_FORMAT` chooses between lines for people (`text`, the default)
//! and one JSON object a line for log collectors (`json`).

/// The log line format `MORA_LOG_FORMAT` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `MORA_LOG_FORMAT`, or why its value is not one.
pub fn log_format() -> Result<LogFormat, String> {
    parse(std::env::var("MORA_LOG_FORMAT").ok().as_deref())
}

fn parse(value: Option<&str>) -> Result<LogFormat, String> {
    match value.map(str::trim) {
        None | Some("") | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(format!("MORA_LOG_FORMAT is `{other}`: use `text` (the default) or `json`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_is_text_unless_json_is_asked_for() {
        assert_eq!(parse(None), Ok(LogFormat::Text));
        assert_eq!(parse(Some("text")), Ok(LogFormat::Text));
        assert_eq!(parse(Some(" json ")), Ok(LogFormat::Json));
        assert!(parse(Some("xml")).unwrap_err().contains("use `text` (the default) or `json`"));
    }
}
