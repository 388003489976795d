//! Chat prompts: a list of messages rendered with the model's own chat
//! template, as transformers' `apply_chat_template` renders it.
//!
//! The template is `chat_template.jinja` (what transformers saves since
//! 4.50), else `chat_template` in `tokenizer_config.json` (a string, or a
//! list of named templates, of which `default` is used). It is Jinja, run by
//! minijinja with the settings transformers uses (`trim_blocks`,
//! `lstrip_blocks`, loop controls), Python's string methods, and the globals
//! transformers gives templates: `messages`, `add_generation_prompt`, the
//! special tokens of `tokenizer_config.json` (`bos_token`, `eos_token`, ...),
//! `raise_exception(message)` and `strftime_now(format)`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind};

/// Why a model's chat template cannot be loaded or render; each message
/// names the file.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{}: not valid JSON: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "{} has no chat template (no chat_template.jinja, no `chat_template` in tokenizer_config.json): use `prompt` instead of `messages`",
        dir.display()
    )]
    NoTemplate { dir: PathBuf },
    /// The template does not parse, or stops rendering (`raise_exception`
    /// among others); `origin` says where it came from, and the message
    /// is on one line.
    #[error("{origin}: {}", one_line(.error))]
    Template {
        origin: String,
        #[source]
        error: minijinja::Error,
    },
}

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A model's chat template, ready to render.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// `bos_token`, `eos_token`, ... as text.
    specials: BTreeMap<String, String>,
    /// Where the template came from, for errors.
    source: String,
}

const SPECIALS: [&str; 7] = ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"];

impl ChatTemplate {
    /// The chat template of the model in `dir`; an error when it has none.
    pub fn load(dir: &Path) -> Result<ChatTemplate, ChatError> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read(&config_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ChatError::Json { path: config_path.clone(), source })?,
            Err(_) => serde_json::Value::Null,
        };
        let jinja = dir.join("chat_template.jinja");
        let (text, source) = if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|source| ChatError::Read { path: jinja.clone(), source })?;
            (text, jinja.display().to_string())
        } else {
            let from_config = match config.get("chat_template") {
                Some(serde_json::Value::String(t)) => Some(t.clone()),
                // A list of named templates: the default one.
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            };
            let Some(text) = from_config else {
                return Err(ChatError::NoTemplate { dir: dir.to_path_buf() });
            };
            (text, format!("{} (chat_template)", config_path.display()))
        };
        let mut specials = BTreeMap::new();
        for key in SPECIALS {
            // A token is written as its text, or as an AddedToken object.
            let text = match config.get(key) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
                _ => None,
            };
            if let Some(t) = text {
                specials.insert(key.to_string(), t);
            }
        }
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_template_owned("chat", text).map_err(|error| ChatError::Template { origin: source.clone(), error })?;
        Ok(ChatTemplate { env, specials, source })
    }

    /// The prompt text for `messages`, ending with what starts the
    /// assistant's answer (`add_generation_prompt`).
    pub fn render(&self, messages: &[Message]) -> Result<String, ChatError> {
        let template = self.env.get_template("chat").expect("added in load");
        let mut ctx: BTreeMap<String, minijinja::Value> = BTreeMap::new();
        ctx.insert("messages".into(), minijinja::Value::from_serialize(messages));
        ctx.insert("add_generation_prompt".into(), true.into());
        for (k, v) in &self.specials {
            ctx.insert(k.clone(), v.clone().into());
        }
        template.render(ctx).map_err(|error| ChatError::Template { origin: self.source.clone(), error })
    }
}

fn one_line(e: &minijinja::Error) -> String {
    let mut text = e.to_string();
    if let Some(detail) = e.detail() {
        if !text.contains(detail) {
            text = format!("{text}: {detail}");
        }
    }
    text.replace('\n', " ")
}

/// The current UTC time in `format` (strftime's %Y %m %d %H %M %S %b %B
/// %a %A %j %y %%), as transformers' `strftime_now` gives it to templates
/// (Llama 3 puts today's date in its system prompt).
fn strftime_now(format: &str) -> Result<String, minijinja::Error> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    Ok(strftime(format, secs))
}

fn strftime(format: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = mora_common::units::civil_from_days(days);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = before[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> mora_test_support::Scratch {
        let d = mora_test_support::Scratch::new("chat");
        for (name, body) in files {
            std::fs::write(d.join(name), body).unwrap();
        }
        d
    }

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message { role: r.to_string(), content: c.to_string() }).collect()
    }

    #[test]
    fn a_template_in_tokenizer_config_renders_with_special_tokens_and_python_methods() {
        let template = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'].strip() }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}";
        let config = serde_json::json!({
            "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}],
            "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
        });
        let d = dir_with(&[("tokenizer_config.json", &config.to_string())]);
        let t = ChatTemplate::load(&d).unwrap();
        let out = t.render(&msgs(&[("user", "  hi "), ("assistant", "hello"), ("user", "more")])).unwrap();
        assert_eq!(out, "<s>[INST] hi [/INST]hello</s>[INST] more [/INST]");
    }

    #[test]
    fn missing_templates_bad_templates_and_raised_exceptions_are_one_line_errors() {
        let d = dir_with(&[("tokenizer_config.json", "{}")]);
        let e = ChatTemplate::load(&d).err().unwrap().to_string();
        assert!(e.contains("has no chat template") && e.contains("use `prompt` instead of `messages`"), "{e}");
        let d = dir_with(&[("chat_template.jinja", "{% for m in messages %}"), ("tokenizer_config.json", "{}")]);
        let e = ChatTemplate::load(&d).err().unwrap().to_string();
        assert!(e.contains("chat_template.jinja") && !e.contains('\n'), "{e}");
        let d = dir_with(&[
            ("chat_template.jinja", "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with the user') }}{% endif %}"),
            ("tokenizer_config.json", "{}"),
        ]);
        let e = ChatTemplate::load(&d).unwrap().render(&msgs(&[("system", "x")])).unwrap_err().to_string();
        assert!(e.contains("Conversations must start with the user") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn strftime_formats_a_known_instant() {
        // 2024-02-29 13:05:09 UTC, a Thursday, day 60 of a leap year.
        let t = 1_709_211_909;
        assert_eq!(strftime("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(strftime("%A %B %j %H:%M:%S %y%% %m", t), "Thursday February 060 13:05:09 24% 02");
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
    }
}
