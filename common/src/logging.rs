//! How the binaries log: `MORA_LOG` filters (as `RUST_LOG` does), and
//! `MORA_LOG_FORMAT` chooses between lines for people (`text`, the default)
//! and one JSON object a line for log collectors (`json`).

/// The log line format `MORA_LOG_FORMAT` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A `MORA_LOG_FORMAT` that names no format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MORA_LOG_FORMAT is `{0}`: use `text` (the default) or `json`")]
pub struct UnknownLogFormat(pub String);

/// `MORA_LOG_FORMAT`, or why its value is not one.
pub fn log_format() -> Result<LogFormat, UnknownLogFormat> {
    parse(std::env::var("MORA_LOG_FORMAT").ok().as_deref())
}

fn parse(value: Option<&str>) -> Result<LogFormat, UnknownLogFormat> {
    match value.map(str::trim) {
        None | Some("") | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(UnknownLogFormat(other.to_string())),
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
        assert!(parse(Some("xml")).unwrap_err().to_string().contains("use `text` (the default) or `json`"));
    }
}
