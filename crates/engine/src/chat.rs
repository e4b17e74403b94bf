//! Chat templates: the model's own Jinja template (GGUF
//! `tokenizer.chat_template`, `tokenizer_config.json`'s `chat_template`)
//! rendered with minijinja, set up as Hugging Face transformers sets up
//! Jinja2 for `apply_chat_template`:
//! - `trim_blocks` and `lstrip_blocks` on, a template's final newline dropped;
//! - `{% break %}` / `{% continue %}`;
//! - `raise_exception(message)` and `strftime_now(format)` (UTC here);
//! - a `tojson` filter that writes JSON as Python's `json.dumps` does
//!   (`", "` and `": "` separators, non-ASCII as is, optional `indent`,
//!   `sort_keys`, `ensure_ascii`, `separators`), not HTML-escaped;
//! - Python's string and dict methods (`.strip()`, `.startswith()`,
//!   `.split()`, `.items()`, `.get()`…) through minijinja-contrib's pycompat.
//!
//! The context holds `messages` (maps with `role` and `content`, in that
//! order), `add_generation_prompt`, `bos_token` and `eos_token`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Enumerator, Kwargs, Object, StringInput, Value, ValueKind};
use minijinja::{context, Environment, Error, ErrorKind};

const NAME: &str = "chat_template";

/// A template comes from the model's files, so its rendering is bounded:
/// instructions (fuel; real templates take a few thousand for a
/// conversation), and the strings that filters and methods build from
/// sizes given in the template (indent widths, joins, replacements).
/// minijinja itself caps string repetition (`'x' * n`) at 100 MB.
const TEMPLATE_FUEL: u64 = 2_000_000;
const MAX_BUILT_STRING: usize = 16 << 20;
const MAX_INDENT: usize = 1024;

fn too_large(what: &str) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!(
            "{what}: the result would exceed {} MiB",
            MAX_BUILT_STRING >> 20
        ),
    )
}

/// The `indent` filter, with a bounded width.
fn indent(
    value: StringInput<'_>,
    width: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let w = kwargs
        .peek::<Option<usize>>("width")?
        .or(width)
        .unwrap_or(0);
    if w > MAX_INDENT {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("indent: a width of {w} (at most {MAX_INDENT})"),
        ));
    }
    let lines = value.as_str().lines().count().max(1);
    if value.as_str().len().saturating_add(lines.saturating_mul(w)) > MAX_BUILT_STRING {
        return Err(too_large("indent"));
    }
    minijinja::filters::indent(value, width, first, blank, kwargs)
}

/// The `join` filter, refusing results past [`MAX_BUILT_STRING`].
fn join(
    state: &minijinja::State,
    value: &Value,
    joiner: Option<StringInput<'_>>,
) -> Result<Value, Error> {
    let sep = joiner.as_ref().map_or(0, |j| j.as_str().len());
    if let Ok(items) = value.try_iter() {
        let mut total = 0usize;
        for (i, item) in items.enumerate() {
            let n = item
                .as_str()
                .map_or_else(|| item.to_string().len(), str::len);
            total = total
                .saturating_add(n)
                .saturating_add(if i > 0 { sep } else { 0 });
            if total > MAX_BUILT_STRING {
                return Err(too_large("join"));
            }
        }
    }
    minijinja::filters::join(state, value, joiner)
}

/// Size of `s` with every `from` replaced by `to`.
fn replaced_len(s: &str, from: &str, to: &str) -> usize {
    let n = if from.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(from).count()
    };
    s.len()
        .saturating_add(n.saturating_mul(to.len()))
        .saturating_sub(n.saturating_mul(from.len()))
}

/// The `replace` filter, refusing results past [`MAX_BUILT_STRING`].
fn replace(
    state: &minijinja::State,
    value: StringInput<'_>,
    from: StringInput<'_>,
    to: StringInput<'_>,
) -> Result<Value, Error> {
    if replaced_len(value.as_str(), from.as_str(), to.as_str()) > MAX_BUILT_STRING {
        return Err(too_large("replace"));
    }
    minijinja::filters::replace(state, value, from, to)
}

/// Python's string methods (`minijinja_contrib::pycompat`), with
/// `str.replace` refusing results past [`MAX_BUILT_STRING`].
fn python_methods(
    state: &minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let ("replace", Some(s), [from, to, ..]) = (method, value.as_str(), args) {
        if let (Some(from), Some(to)) = (from.as_str(), to.as_str()) {
            if replaced_len(s, from, to) > MAX_BUILT_STRING {
                return Err(too_large("replace"));
            }
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// A parsed chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// One message as the template sees it: a map with `role` then `content`.
#[derive(Debug)]
struct Message {
    role: String,
    content: String,
}

impl Object for Message {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.role.as_str())),
            "content" => Some(Value::from(self.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// A minijinja error on one line: its description, detail and place.
fn one_line(e: &Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl ChatTemplate {
    /// Parses a template.
    pub fn new(source: &str) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_formatter(python_formatter);
        env.set_unknown_method_callback(python_methods);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_filter("indent", indent);
        env.add_filter("join", join);
        env.add_filter("replace", replace);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| format!("chat template does not parse: {}", one_line(&e)))?;
        Ok(ChatTemplate { env })
    }

    /// Renders `messages` (role, content); `add_generation_prompt` asks for
    /// the opening of the assistant's turn; `bos` and `eos` are the token
    /// strings the template sees as `bos_token` and `eos_token`.
    pub fn render(
        &self,
        messages: &[(&str, &str)],
        add_generation_prompt: bool,
        bos: &str,
        eos: &str,
    ) -> Result<String, String> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| format!("chat template: {}", one_line(&e)))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|&(role, content)| {
                Value::from_object(Message {
                    role: role.to_owned(),
                    content: content.to_owned(),
                })
            })
            .collect();
        // Rendered into a writer that refuses output past
        // [`MAX_BUILT_STRING`]: a loop printing large strings ends there.
        let mut out = Capped(Vec::new());
        template
            .render_captured_to(
                context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => bos,
                    eos_token => eos,
                },
                &mut out,
            )
            .map(drop)
            .map_err(|e| format!("chat template: {}", one_line(&e)))?;
        String::from_utf8(out.0).map_err(|_| "chat template: output is not UTF-8".to_string())
    }
}

/// A buffer that refuses to grow past [`MAX_BUILT_STRING`].
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.0.len().saturating_add(b.len()) > MAX_BUILT_STRING {
            return Err(std::io::Error::other(format!(
                "output past {} MiB",
                MAX_BUILT_STRING >> 20
            )));
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes values as Jinja2 does (Python's `str`): `True`, `False`, `None`,
/// floats as Python writes them.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &Value,
) -> Result<(), Error> {
    let python = match value.kind() {
        ValueKind::Bool => Some(if value.is_true() { "True" } else { "False" }.to_owned()),
        ValueKind::None => Some("None".to_owned()),
        ValueKind::Number if value.to_string().parse::<i128>().is_err() => {
            f64::try_from(value.clone())
                .ok()
                .map(|f| python_float(f, false))
        }
        _ => None,
    };
    match python {
        Some(s) => minijinja::escape_formatter(out, state, &Value::from(s)),
        None => minijinja::escape_formatter(out, state, value),
    }
}

/// `raise_exception(message)`: fails the rendering with that message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

// ---------------------------------------------------------------------------
// strftime_now

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A UTC calendar time.
struct Civil {
    year: i64,
    /// 1 to 12.
    month: u32,
    /// 1 to 31.
    day: u32,
    /// 1 to 366.
    yday: u32,
    /// 0 = Monday.
    wday: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Civil {
    fn from_unix(secs: i64) -> Civil {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yday = CUM[(month - 1) as usize] + day + u32::from(leap && month > 2);
        Civil {
            year,
            month,
            day,
            yday,
            // 1970-01-01 was a Thursday (3).
            wday: (days + 3).rem_euclid(7) as u32,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
        }
    }

    /// C `strftime` for the common specifiers (`%-d` style: no padding);
    /// others are written as they are.
    fn format(&self, fmt: &str) -> String {
        let mut out = String::new();
        let mut chars = fmt.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let mut spec = chars.next();
            let pad = if spec == Some('-') {
                spec = chars.next();
                false
            } else {
                true
            };
            let num = |v: u32, width: usize| {
                if pad {
                    format!("{v:0width$}")
                } else {
                    v.to_string()
                }
            };
            let month = MONTHS[(self.month - 1) as usize];
            let weekday = WEEKDAYS[self.wday as usize];
            match spec {
                Some('Y') => out.push_str(&self.year.to_string()),
                Some('y') => out.push_str(&num(self.year.rem_euclid(100) as u32, 2)),
                Some('m') => out.push_str(&num(self.month, 2)),
                Some('d') => out.push_str(&num(self.day, 2)),
                Some('e') => out.push_str(&format!("{:>2}", self.day)),
                Some('j') => out.push_str(&num(self.yday, 3)),
                Some('H') => out.push_str(&num(self.hour, 2)),
                Some('I') => out.push_str(&num((self.hour + 11) % 12 + 1, 2)),
                Some('M') => out.push_str(&num(self.minute, 2)),
                Some('S') => out.push_str(&num(self.second, 2)),
                Some('p') => out.push_str(if self.hour < 12 { "AM" } else { "PM" }),
                Some('B') => out.push_str(month),
                Some('b') | Some('h') => out.push_str(&month[..3]),
                Some('A') => out.push_str(weekday),
                Some('a') => out.push_str(&weekday[..3]),
                Some('F') => {
                    out.push_str(&format!("{}-{:02}-{:02}", self.year, self.month, self.day))
                }
                Some('%') => out.push('%'),
                Some(other) => {
                    out.push('%');
                    if !pad {
                        out.push('-');
                    }
                    out.push(other);
                }
                None => {
                    out.push('%');
                    if !pad {
                        out.push('-');
                    }
                }
            }
        }
        out
    }
}

/// `strftime_now(format)`: the current time (UTC), formatted.
fn strftime_now(format: String) -> String {
    let secs = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(0),
    };
    Civil::from_unix(secs).format(&format)
}

// ---------------------------------------------------------------------------
// tojson

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// `tojson`: Python's `json.dumps(value, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, as transformers defines it.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(v) => Some(v),
        None => indent,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an integer",
                    )
                })?;
                let n = usize::try_from(n).unwrap_or(0);
                if n > MAX_INDENT {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson: an indent of {n} (at most {MAX_INDENT})"),
                    ));
                }
                Some(" ".repeat(n))
            }
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_owned()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ))
            }
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        Some(seps) if !seps.is_none() => {
            let parts: Vec<Value> = seps.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => (
                    a.as_str().unwrap_or_default().to_owned(),
                    b.as_str().unwrap_or_default().to_owned(),
                ),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        ensure_ascii,
        sort_keys,
    };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from(out))
}

fn json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as Python's `repr` writes it (`1.0`, `1e+16`); not-a-number and
/// infinities as `json.dumps` writes them (`NaN`, `Infinity`) when `json`,
/// else as `repr` does (`nan`, `inf`).
fn python_float(f: f64, json: bool) -> String {
    if f.is_nan() {
        return if json { "NaN" } else { "nan" }.into();
    }
    if f.is_infinite() {
        let s = if json { "Infinity" } else { "inf" };
        return if f > 0.0 { s.into() } else { format!("-{s}") };
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Shortest round-trip digits in scientific notation: d.ddde±XX.
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        return format!(
            "{mantissa}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        );
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

fn newline(out: &mut String, style: &JsonStyle, level: usize) {
    if let Some(ind) = &style.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn write_json(out: &mut String, v: &Value, style: &JsonStyle, level: usize) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: undefined value is not JSON serializable",
            ))
        }
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            // Integers as they are; floats (which minijinja writes with a
            // '.', an exponent, "inf" or "NaN") as Python writes them.
            let s = v.to_string();
            if s.parse::<i128>().is_ok() {
                out.push_str(&s);
            } else {
                let f = f64::try_from(v.clone()).map_err(|_| {
                    Error::new(ErrorKind::InvalidOperation, "tojson: unsupported number")
                })?;
                out.push_str(&python_float(f, true));
            }
        }
        ValueKind::String => json_string(out, v.as_str().unwrap_or_default(), style.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, style, level + 1);
                write_json(out, item, style, level + 1)?;
            }
            newline(out, style, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in v.try_iter()? {
                let value = v.get_item(&key)?;
                let key = match key.as_str() {
                    Some(s) => s.to_owned(),
                    None if key.is_none() => "null".to_owned(),
                    None => {
                        let mut s = String::new();
                        write_json(&mut s, &key, style, 0)?;
                        s
                    }
                };
                entries.push((key, value));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (key, value)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, style, level + 1);
                json_string(out, key, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(out, value, style, level + 1)?;
            }
            newline(out, style, level);
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a {} value is not JSON serializable", v.kind()),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Messages of the Jinja2 comparisons below.
    const MESSAGES: [(&str, &str); 5] = [
        ("system", "  hi, there  "),
        ("skip", "x"),
        ("user", "a,b,c"),
        ("assistant", "é\"\n"),
        ("user", "never"),
    ];

    /// (template, output with all MESSAGES and add_generation_prompt, output
    /// with the first message only and no generation prompt), as rendered by
    /// transformers 4.57.6's `_compile_jinja_template` (Jinja2 3.1.6) with
    /// bos_token "<s>" and eos_token "</s>".
    const JINJA2_CASES: [(&str, &str, &str); 2] = [
        ("{% for message in messages %}\n    {% if message.role == 'system' %}\n[SYS] {{ message.content }}\n    {% else %}\n<{{ message.role }}>{{ message.content }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n<assistant>\n{% endif %}\n", "[SYS]   hi, there  \n<skip>x\n<user>a,b,c\n<assistant>é\"\n\n<user>never\n<assistant>\n", "[SYS]   hi, there  \n"),
        ("{%- set ns = namespace(n=0) -%}\n{%- for m in messages -%}\n{%- if m.role == 'skip' %}{% continue %}{% endif -%}\n{%- set ns.n = ns.n + 1 -%}\n{{ m.role.upper() }}: {{ m.content.strip() }}|{{ m.content.startswith('  hi') }}|{{ m.content.split(',') | length }}|{% for k, v in m.items() %}{{ k }}={{ v|length }};{% endfor %}\n\n{%- if loop.index >= 3 %}{% break %}{% endif %}\n{% endfor -%}\ncount={{ ns.n }} {{ messages|tojson }} {{ messages[0]|tojson(indent=2) }} {{ {'b': [1, 2.0, none, true, 1e20, 0.5], 'a': 'é\"\\n\\t\\u0001'}|tojson(sort_keys=true) }} {{ 'é🙂'|tojson(ensure_ascii=true) }} {{ [] | tojson(indent=4) }} {{ [1,[2,{}]] | tojson(indent=1) }} {{ {'k': 1}|tojson(separators=(',', ':')) }}\n{{ bos_token }}..{{ eos_token }}\n", "SYSTEM: hi, there|True|2|role=6;content=13;USER: a,b,c|False|3|role=4;content=5;count=2 [{\"role\": \"system\", \"content\": \"  hi, there  \"}, {\"role\": \"skip\", \"content\": \"x\"}, {\"role\": \"user\", \"content\": \"a,b,c\"}, {\"role\": \"assistant\", \"content\": \"é\\\"\\n\"}, {\"role\": \"user\", \"content\": \"never\"}] {\n  \"role\": \"system\",\n  \"content\": \"  hi, there  \"\n} {\"a\": \"é\\\"\\n\\t\\u0001\", \"b\": [1, 2.0, null, true, 1e+20, 0.5]} \"\\u00e9\\ud83d\\ude42\" [] [\n 1,\n [\n  2,\n  {}\n ]\n] {\"k\":1}\n<s>..</s>", "SYSTEM: hi, there|True|2|role=6;content=13;count=1 [{\"role\": \"system\", \"content\": \"  hi, there  \"}] {\n  \"role\": \"system\",\n  \"content\": \"  hi, there  \"\n} {\"a\": \"é\\\"\\n\\t\\u0001\", \"b\": [1, 2.0, null, true, 1e+20, 0.5]} \"\\u00e9\\ud83d\\ude42\" [] [\n 1,\n [\n  2,\n  {}\n ]\n] {\"k\":1}\n<s>..</s>"),
    ];

    #[test]
    fn shareable_between_threads() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
    }

    #[test]
    fn smollm2_template() {
        let t = ChatTemplate::new(SMOLLM2).unwrap();
        let out = t
            .render(
                &[("user", "What is the capital of France?")],
                true,
                "<|im_start|>",
                "<|im_end|>",
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(&[("system", "Be brief."), ("user", "Hi")], false, "", "")
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
        assert_eq!(
            t.render(&[], true, "", "").unwrap(),
            "<|im_start|>assistant\n"
        );
    }

    #[test]
    fn gguf_template_matches_reference() {
        let path = crate::tokenizer::tests::fixture_gguf();
        let file = std::fs::File::open(&path).unwrap();
        let len = file.metadata().unwrap().len();
        let (h, _) = tpde_ingest::gguf::read_header(std::io::BufReader::new(file), len).unwrap();
        let source = h
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .expect("tokenizer.chat_template");
        assert_eq!(source, SMOLLM2);

        let reference = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/reference/smollm2-135m-q4_1.json");
        let reference: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&reference).unwrap()).unwrap();
        let prompt = reference["chat"]["prompt"].as_str().unwrap();
        let want = reference["chat"]["text"].as_str().unwrap();
        let t = ChatTemplate::new(source).unwrap();
        assert_eq!(
            t.render(&[("user", prompt)], true, "<|im_start|>", "<|im_end|>")
                .unwrap(),
            want
        );
    }

    #[test]
    fn renders_as_jinja2_in_transformers() {
        for (source, gen, nogen) in JINJA2_CASES {
            let t = ChatTemplate::new(source).unwrap();
            assert_eq!(
                t.render(&MESSAGES, true, "<s>", "</s>").unwrap(),
                gen,
                "{source}"
            );
            assert_eq!(
                t.render(&MESSAGES[..1], false, "<s>", "</s>").unwrap(),
                nogen,
                "{source}"
            );
        }
    }

    #[test]
    fn jinja2_details() {
        let render = |src: &str| {
            ChatTemplate::new(src)
                .unwrap()
                .render(&MESSAGES[..1], true, "<s>", "</s>")
        };
        // A template's final newline is dropped, as Jinja2 does by default.
        assert_eq!(render("hello\n").unwrap(), "hello");
        assert_eq!(
            render("{{ true }} {{ none }} {{ 1.5 }} {{ 2 }} {{ undefined_name }}.").unwrap(),
            "True None 1.5 2 ."
        );
        assert_eq!(
            render("{{ messages[0].content.rstrip() }}|{{ messages[0]['role'].title() }}").unwrap(),
            "  hi, there|System"
        );
        assert_eq!(
            render("{{ messages[0].get('role') }}{{ messages[0].get('tool_calls', 'none') }}")
                .unwrap(),
            "systemnone"
        );
        assert_eq!(
            render("{% if messages[0].tool_calls is defined %}x{% else %}y{% endif %}").unwrap(),
            "y"
        );
        assert_eq!(
            render("{{ {'a': none}|tojson }} {{ 'x'|tojson(indent='\t') }}").unwrap(),
            "{\"a\": null} \"x\""
        );
        let year: i64 = render("{{ strftime_now('%Y') }}").unwrap().parse().unwrap();
        assert!(year >= 2024, "{year}");
    }

    #[test]
    fn hostile_templates_end_with_an_error() {
        // Each of these ran for minutes or asked for terabytes before the
        // limits (found by an audit of model files).
        for (src, phrase) in [
            (
                "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                "fuel",
            ),
            ("{{ messages | tojson(indent=1000000000000) }}", "indent"),
            ("{{ 'a\nb' | indent(1000000000000) }}", "indent"),
            ("{{ 'a\nb' | indent(width=1000000000000) }}", "indent"),
            ("{{ range(100000) | join('x' * 100000) | length }}", "join"),
            (
                "{{ ('x' * 100000).replace('x', 'y' * 100000) | length }}",
                "replace",
            ),
            (
                "{{ ('x' * 100000) | replace('x', 'y' * 100000) | length }}",
                "replace",
            ),
            (
                "{% for i in range(20000) %}{{ 'x' * 100000000 }}{% endfor %}",
                "output past 16 MiB",
            ),
        ] {
            let t = ChatTemplate::new(src).unwrap();
            let e = t.render(&[("user", "hi")], true, "", "").unwrap_err();
            assert!(e.contains(phrase), "{src}: {e}");
        }
        // Within the limits they work as before.
        let t = ChatTemplate::new(
            "{{ 'a\nb' | indent(2, true) }}|{{ [1, 2] | join('-') }}|{{ 'ab'.replace('b', 'c') }}",
        )
        .unwrap();
        assert_eq!(t.render(&[], false, "", "").unwrap(), "  a\n  b|1-2|ac");
    }

    #[test]
    fn errors_are_one_line() {
        let e = ChatTemplate::new("{% for x in %}").unwrap_err();
        assert!(e.starts_with("chat template does not parse"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}ok",
        )
        .unwrap();
        let e = t.render(&MESSAGES, true, "", "").unwrap_err();
        assert!(e.contains("Conversation roles must alternate"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        assert_eq!(t.render(&[("user", "x")], true, "", "").unwrap(), "ok");
        let e = ChatTemplate::new("{{ messages|tojson(bogus=1) }}")
            .unwrap()
            .render(&MESSAGES, true, "", "")
            .unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        let e = ChatTemplate::new("{{ nothing|tojson }}")
            .unwrap()
            .render(&MESSAGES, true, "", "")
            .unwrap_err();
        assert!(e.contains("undefined"), "{e}");
    }

    #[test]
    fn strftime_formats() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let c = Civil::from_unix(1_709_211_909);
        assert_eq!(c.format("%Y-%m-%d %H:%M:%S"), "2024-02-29 13:05:09");
        assert_eq!(
            c.format("%d %b %Y, %A %a %B %j %y %-d %e %I%p %F %% %Q"),
            "29 Feb 2024, Thursday Thu February 060 24 29 29 01PM 2024-02-29 % %Q"
        );
        let c = Civil::from_unix(0);
        assert_eq!(c.format("%a %Y-%m-%d %j"), "Thu 1970-01-01 001");
        let c = Civil::from_unix(-86_400);
        assert_eq!(c.format("%a %Y-%m-%d %j"), "Wed 1969-12-31 365");
        let c = Civil::from_unix(951_782_400); // 2000-02-29
        assert_eq!(c.format("%F %j %a"), "2000-02-29 060 Tue");
    }

    #[test]
    fn python_floats() {
        assert_eq!(python_float(1.0, true), "1.0");
        assert_eq!(python_float(0.1, true), "0.1");
        assert_eq!(python_float(1e20, true), "1e+20");
        assert_eq!(python_float(1.5e-7, true), "1.5e-07");
        assert_eq!(python_float(123456.789, true), "123456.789");
        assert_eq!(python_float(f64::NAN, true), "NaN");
        assert_eq!(python_float(f64::NEG_INFINITY, false), "-inf");
    }
}
