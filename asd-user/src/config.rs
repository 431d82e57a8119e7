//! Reading asd.conf: the bash subset of asd 6.0, parsed without running a shell (DESIGN.md §4).
//!
//! asd sourced its config with bash, so a config could run arbitrary code as root. We accept only
//! the part of bash that asd configs actually use and refuse everything else with the line number,
//! so that what we read is exactly what bash would have assigned, or an error — never a silent
//! reinterpretation.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The settings asd acts on, after defaults and expansion.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Config {
    /// Absolute target directories, trailing slashes stripped, in file order, duplicates removed.
    pub whattosync: Vec<PathBuf>,
    /// Where volatile copies live (default `/tmp`).
    pub volatile: PathBuf,
    pub use_overlayfs: bool,
    /// Crash-recovery snapshots and the hard-linked start clone (default yes).
    pub use_backups: bool,
    /// Newest snapshots kept per target (default 5).
    pub backup_limit: usize,
    /// Refuse targets holding hard-linked files (default on).
    pub hardlink_safety_check: bool,
    /// How often `asd daemon` writes back (key RESYNC_INTERVAL, default 1 h).
    pub resync_interval: Duration,
}

pub const DEFAULT_VOLATILE: &str = "/tmp";
pub const DEFAULT_BACKUP_LIMIT: usize = 5;
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(3600);
/// Upper bound for RESYNC_INTERVAL: far beyond any sensible value, but small enough that adding it
/// to an `Instant` can never overflow (which would panic in the daemon loop).
pub const MAX_RESYNC_INTERVAL: Duration = Duration::from_secs(366 * 24 * 3600);

impl Default for Config {
    fn default() -> Self {
        Config {
            whattosync: Vec::new(),
            volatile: PathBuf::from(DEFAULT_VOLATILE),
            use_overlayfs: false,
            use_backups: true,
            backup_limit: DEFAULT_BACKUP_LIMIT,
            hardlink_safety_check: true,
            resync_interval: DEFAULT_RESYNC_INTERVAL,
        }
    }
}

/// Values used to expand `$HOME`, `${HOME}` and a leading `~` in per-user configs.
#[derive(Debug, Clone, Default)]
pub struct Expand {
    /// None: `$HOME`/`~` are an error (system config).
    pub home: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub line: usize,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax or value errors; `Display` names the file and every bad line.
    #[error("{}", format_invalid(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<(usize, String)>,
    },
}

fn format_invalid(path: &Path, problems: &[(usize, String)]) -> String {
    let mut s = format!("{} is not a valid asd config:", path.display());
    for (line, msg) in problems {
        s.push_str(&format!("\n  line {line}: {msg}"));
    }
    s
}

/// The keys asd knows; anything else is warned about and ignored.
pub const KNOWN_KEYS: &[&str] = &[
    "WHATTOSYNC",
    "VOLATILE",
    "USE_OVERLAYFS",
    "USE_BACKUPS",
    "BACKUP_LIMIT",
    "ENABLE_HARDLINK_SAFETY_CHECK",
    "RESYNC_INTERVAL",
];

/// asd's notion of "yes" (its `case` over these words, any case); everything else is false.
pub fn is_truthy(s: &str) -> bool {
    matches!(
        s.to_ascii_lowercase().as_str(),
        "y" | "yes" | "true" | "t" | "on" | "1" | "enabled" | "enable" | "use"
    )
}

/// Parse `text` (the content of `path`, used only in messages).
pub fn parse(
    text: &str,
    path: &Path,
    expand: &Expand,
) -> Result<(Config, Vec<Warning>), ConfigError> {
    let mut parser = Parser::new(text, expand.home.as_deref());
    let assignments = parser.run();
    let mut problems = parser.problems;
    let mut warnings = Vec::new();
    let config = apply(assignments, &mut problems, &mut warnings);
    if problems.is_empty() {
        warnings.sort_by_key(|w| w.line);
        Ok((config, warnings))
    } else {
        // Stable sort: several problems on one line keep the order they were found in.
        problems.sort_by_key(|(line, _)| *line);
        Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }
}

/// Read and parse a file.
pub fn load(path: &Path, expand: &Expand) -> Result<(Config, Vec<Warning>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path, expand)
}

/// Parse a RESYNC_INTERVAL value: plain seconds, or a number with suffix `s`, `m` or `h`.
pub fn parse_interval(s: &str) -> Option<Duration> {
    let (digits, unit) = match s.as_bytes().last()? {
        b's' => (&s[..s.len() - 1], 1u64),
        b'm' => (&s[..s.len() - 1], 60),
        b'h' => (&s[..s.len() - 1], 3600),
        _ => (s, 1),
    };
    // u64::from_str would accept a leading `+`; asd-style values are bare digits.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs = digits.parse::<u64>().ok()?.checked_mul(unit)?;
    let d = Duration::from_secs(secs);
    (secs >= 1 && d <= MAX_RESYNC_INTERVAL).then_some(d)
}

/// A config template for a user's first run: every key explained, defaults commented out.
pub fn default_template() -> &'static str {
    DEFAULT_TEMPLATE
}

const DEFAULT_TEMPLATE: &str = r#"#
# asd.conf — settings for anything-sync-daemon (asd)
#
# This file uses a small part of bash syntax: KEY=value, KEY="value", KEY='value'
# and arrays KEY=('a' "b" c). It is read, never run: commands, other variables,
# `;`, pipes and the like are refused with an error naming the line.
# In a per-user config, $HOME, ${HOME} and a leading ~ are expanded.
#
# Edits made while asd is running apply after the next restart.

# The directories to keep in RAM. They must be directories given by an absolute
# path (or starting with ~ or $HOME); everything beneath them is included.
# Example:
#WHATTOSYNC=(~/.cache/thumbnails "$HOME/work")
WHATTOSYNC=()

# Where the copies in RAM live. It must be a tmpfs (or zram) mount that you
# can write to.
#VOLATILE="/tmp"

# Use an overlay mount instead of a full copy: less memory, faster sync, and
# only the changes are written back.
#USE_OVERLAYFS="no"

# Keep crash-recovery snapshots, so that data in RAM at a power cut or crash
# is recoverable. Set to "no" to turn this off.
#USE_BACKUPS="yes"

# How many crash-recovery snapshots to keep per directory (oldest go first).
#BACKUP_LIMIT=5

# Refuse directories that contain hard-linked files, since the copy in RAM
# breaks the link with files outside it. Set to 0 to allow them.
#ENABLE_HARDLINK_SAFETY_CHECK=1

# How often the running daemon writes the copies back to disk: seconds, or a
# number followed by s, m or h (for example 90s, 30m, 1h).
#RESYNC_INTERVAL=1h
"#;

// ---------------------------------------------------------------------------------------------
// Lexing and parsing

/// One shell word after quote removal and `$HOME` expansion; bytes because home may not be UTF-8.
#[derive(Debug)]
struct Word {
    bytes: Vec<u8>,
    line: usize,
}

#[derive(Debug)]
enum Value {
    Scalar(Word),
    Array(Vec<Word>),
}

#[derive(Debug)]
struct Assignment {
    key: String,
    line: usize,
    value: Value,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// The value of `KEY=...`: no word splitting or globbing, as in bash assignments.
    Scalar,
    /// An element of `KEY=(...)`: `)` ends the word and bash would glob it.
    Array,
}

enum ArrayEnd {
    /// Closed; bad elements were reported and left out, the good ones are still checked.
    Closed(Vec<Word>),
    /// No `)`: reported at the opening line; the parser stands at EOF or at the next assignment.
    Unterminated,
}

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    line: usize,
    home: Option<&'a Path>,
    problems: Vec<(usize, String)>,
}

fn push_char(out: &mut Vec<u8>, c: char) {
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Why an unquoted character is refused.
fn describe_char(c: char) -> String {
    match c {
        ';' => "`;` is not supported: one KEY=value per line, no commands".into(),
        '&' => "`&` is not supported: no commands, `&&` or background jobs".into(),
        '|' => "`|` is not supported: no pipes or `||`".into(),
        '<' | '>' => format!("redirection `{c}` is not supported"),
        '(' => {
            "unexpected `(`: only KEY=(...) arrays are supported, no subshells or functions".into()
        }
        ')' => "unbalanced `)`".into(),
        '`' => "command substitution with backticks is not supported".into(),
        '\r' => "carriage return: DOS (CRLF) line endings are not supported".into(),
        '*' | '?' | '[' => {
            format!("unquoted glob character `{c}` in an array is not supported: quote the path")
        }
        '{' => "unquoted `{` (brace expansion) in an array is not supported: quote the path".into(),
        _ => format!("unexpected `{c}`"),
    }
}

fn is_special(c: char) -> bool {
    matches!(c, ';' | '&' | '|' | '<' | '>' | '(' | ')' | '`' | '\r')
}

impl<'a> Parser<'a> {
    fn new(text: &str, home: Option<&'a Path>) -> Self {
        Parser {
            chars: text.chars().collect(),
            pos: 0,
            line: 1,
            home,
            problems: Vec::new(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, n: usize) -> Option<char> {
        self.chars.get(self.pos + n).copied()
    }

    fn problem(&mut self, line: usize, msg: impl Into<String>) {
        self.problems.push((line, msg.into()));
    }

    fn skip_blanks(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t')) {
            self.pos += 1;
        }
    }

    /// Leaves the newline in place so the caller's line accounting stays in one spot.
    fn skip_to_eol(&mut self) {
        while let Some(c) = self.peek() {
            if c == '\n' {
                break;
            }
            self.pos += 1;
        }
    }

    fn newline(&mut self) {
        self.pos += 1;
        self.line += 1;
    }

    fn run(&mut self) -> Vec<Assignment> {
        let mut out = Vec::new();
        loop {
            self.skip_blanks();
            match self.peek() {
                None => break,
                Some('\n') => self.newline(),
                Some('#') => self.skip_to_eol(),
                Some(_) => {
                    if let Some(a) = self.statement() {
                        out.push(a);
                    }
                }
            }
        }
        out
    }

    fn statement(&mut self) -> Option<Assignment> {
        let line = self.line;
        let start = self.pos;
        while self.peek().is_some_and(is_name_char) {
            self.pos += 1;
        }
        let name: String = self.chars[start..self.pos].iter().collect();
        let valid_name = name.chars().next().is_some_and(|c| !c.is_ascii_digit());
        if !(valid_name && self.peek() == Some('=')) {
            let msg = self.describe_bad_statement(start, &name, valid_name);
            self.problem(line, msg);
            self.skip_to_eol();
            return None;
        }
        self.pos += 1;
        let value = if self.peek() == Some('(') {
            self.pos += 1;
            match self.array(line) {
                ArrayEnd::Closed(items) => Some(Value::Array(items)),
                ArrayEnd::Unterminated => return None,
            }
        } else {
            self.word(Ctx::Scalar).map(Value::Scalar)
        };
        let clean_end = self.end_of_statement();
        Some(Assignment {
            key: name,
            line,
            value: value.filter(|_| clean_end)?,
        })
    }

    /// A line that is not `NAME=...`: say what it looks like, since "syntax error" helps nobody.
    fn describe_bad_statement(&self, start: usize, name: &str, valid_name: bool) -> String {
        let next = self.peek();
        if matches!(
            name,
            "export" | "declare" | "typeset" | "readonly" | "local"
        ) && matches!(next, Some(' ' | '\t'))
        {
            return format!("`{name}` is not supported: write KEY=value without it");
        }
        if valid_name && next == Some('+') && self.peek_at(1) == Some('=') {
            return "`+=` is not supported: assign the whole value".into();
        }
        if valid_name && next == Some('[') {
            return "array element assignment `KEY[...]=` is not supported".into();
        }
        if valid_name && matches!(next, Some(' ' | '\t')) {
            let mut i = self.pos;
            while matches!(self.chars.get(i), Some(' ' | '\t')) {
                i += 1;
            }
            if self.chars.get(i) == Some(&'=') {
                return "spaces around `=` are not allowed".into();
            }
        }
        if name.is_empty() {
            if let Some(c) = next.filter(|c| is_special(*c)) {
                return describe_char(c);
            }
        }
        let end = self.chars[start..]
            .iter()
            .position(|c| *c == '\n')
            .map_or(self.chars.len(), |n| start + n);
        let mut snippet: String = self.chars[start..end].iter().take(60).collect();
        if end - start > 60 {
            snippet.push('…');
        }
        format!(
            "not a KEY=value assignment (commands are not run): `{}`",
            snippet.trim_end()
        )
    }

    /// After a value only blanks and a comment may follow on the line.
    fn end_of_statement(&mut self) -> bool {
        self.skip_blanks();
        match self.peek() {
            None | Some('\n') => true,
            Some('#') => {
                self.skip_to_eol();
                true
            }
            Some(c) => {
                let msg = if is_special(c) {
                    describe_char(c)
                } else {
                    "unexpected text after the value: one KEY=value per line, and a value \
                     with spaces must be quoted"
                        .into()
                };
                let line = self.line;
                self.problem(line, msg);
                self.skip_to_eol();
                false
            }
        }
    }

    fn array(&mut self, open_line: usize) -> ArrayEnd {
        let mut items = Vec::new();
        let mut line_start = false;
        loop {
            self.skip_blanks();
            match self.peek() {
                None => {
                    self.problem(open_line, "unterminated array: `(` has no matching `)`");
                    return ArrayEnd::Unterminated;
                }
                Some('\n') => {
                    self.newline();
                    line_start = true;
                }
                Some('#') => self.skip_to_eol(),
                Some(')') => {
                    self.pos += 1;
                    return ArrayEnd::Closed(items);
                }
                Some('\\') if self.peek_at(1) == Some('\n') => {
                    self.pos += 1;
                    self.newline();
                }
                Some(_) => {
                    // bash would swallow the rest of the file into the array; stopping at the
                    // next assignment reports the missing `)` without a cascade of errors.
                    if line_start && self.looks_like_assignment() {
                        self.problem(open_line, "unterminated array: `(` has no matching `)`");
                        return ArrayEnd::Unterminated;
                    }
                    line_start = false;
                    if let Some(w) = self.word(Ctx::Array) {
                        items.push(w);
                    }
                }
            }
        }
    }

    fn looks_like_assignment(&self) -> bool {
        let mut i = self.pos;
        match self.chars.get(i) {
            Some(c) if c.is_ascii_alphabetic() || *c == '_' => {}
            _ => return false,
        }
        while self.chars.get(i).is_some_and(|c| is_name_char(*c)) {
            i += 1;
        }
        match self.chars.get(i) {
            Some('=') => true,
            Some('+') => self.chars.get(i + 1) == Some(&'='),
            _ => false,
        }
    }

    /// Skip the rest of a broken word, so that one mistake gives one error. In an array, stop
    /// before the next element or the `)` that closes the array, so later elements are still
    /// checked and the array still ends.
    fn recover(&mut self, ctx: Ctx) -> Option<Word> {
        if ctx == Ctx::Scalar {
            self.skip_to_eol();
            return None;
        }
        let mut depth = 0usize;
        while let Some(c) = self.peek() {
            match c {
                '\n' => break,
                ' ' | '\t' if depth == 0 => break,
                '\\' if self.peek_at(1) != Some('\n') => self.pos += 1,
                '\'' | '"' => {
                    self.pos += 1;
                    while self.peek().is_some_and(|q| q != c && q != '\n') {
                        self.pos += 1;
                    }
                    if self.peek() != Some(c) {
                        break;
                    }
                }
                '(' => depth += 1,
                ')' if depth == 0 => break,
                ')' => depth -= 1,
                _ => {}
            }
            self.pos += 1;
        }
        None
    }

    /// Like `recover`, from inside a double-quoted string: leave the string first so its
    /// contents are not mistaken for syntax.
    fn recover_dquote(&mut self, ctx: Ctx) -> Option<Word> {
        while self.peek().is_some_and(|c| c != '"' && c != '\n') {
            self.pos += if self.peek() == Some('\\') && self.peek_at(1) == Some('"') {
                2
            } else {
                1
            };
        }
        if self.peek() == Some('"') {
            self.pos += 1;
        }
        self.recover(ctx)
    }

    /// One shell word. None when it was bad (reported already); the parser then stands at the
    /// end of the word or line.
    fn word(&mut self, ctx: Ctx) -> Option<Word> {
        let line = self.line;
        let mut out = Vec::new();
        let mut ok = true;
        let mut at_start = true;
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' | '\n' => break,
                ')' if ctx == Ctx::Array => break,
                '\'' => {
                    let qline = self.line;
                    self.pos += 1;
                    loop {
                        match self.peek() {
                            None | Some('\n') => {
                                self.problem(qline, "unterminated single quote");
                                return self.recover(ctx);
                            }
                            Some('\'') => {
                                self.pos += 1;
                                break;
                            }
                            Some(ch) => {
                                push_char(&mut out, ch);
                                self.pos += 1;
                            }
                        }
                    }
                }
                '"' => {
                    let qline = self.line;
                    self.pos += 1;
                    loop {
                        match self.peek() {
                            None | Some('\n') => {
                                self.problem(qline, "unterminated double quote");
                                return self.recover(ctx);
                            }
                            Some('"') => {
                                self.pos += 1;
                                break;
                            }
                            Some('\\') => match self.peek_at(1) {
                                Some(e @ ('"' | '\\' | '$' | '`')) => {
                                    push_char(&mut out, e);
                                    self.pos += 2;
                                }
                                // Inside double quotes bash keeps any other backslash.
                                _ => {
                                    out.push(b'\\');
                                    self.pos += 1;
                                }
                            },
                            Some('$') => {
                                if !self.dollar(&mut out, &mut ok) {
                                    return self.recover_dquote(ctx);
                                }
                            }
                            Some('`') => {
                                self.problem(self.line, describe_char('`'));
                                return self.recover_dquote(ctx);
                            }
                            Some(ch) => {
                                push_char(&mut out, ch);
                                self.pos += 1;
                            }
                        }
                    }
                }
                '\\' => match self.peek_at(1) {
                    None => {
                        self.problem(self.line, "backslash at end of file");
                        self.pos += 1;
                        return None;
                    }
                    Some('\n') => {
                        // Line continuation: bash removes both characters.
                        self.pos += 1;
                        self.newline();
                    }
                    Some(e) => {
                        push_char(&mut out, e);
                        self.pos += 2;
                    }
                },
                '$' => {
                    if !self.dollar(&mut out, &mut ok) {
                        return self.recover(ctx);
                    }
                }
                '~' if at_start => {
                    let ends_prefix = match self.peek_at(1) {
                        None | Some(' ' | '\t' | '\n' | '/') => true,
                        Some(')') => ctx == Ctx::Array,
                        _ => false,
                    };
                    if !ends_prefix {
                        self.problem(
                            self.line,
                            "`~user` expansion is not supported (only `~` and `~/`)",
                        );
                        return self.recover(ctx);
                    }
                    self.pos += 1;
                    self.expand_home(&mut out, &mut ok, "`~`");
                }
                '*' | '?' | '[' | '{' if ctx == Ctx::Array => {
                    self.problem(self.line, describe_char(c));
                    return self.recover(ctx);
                }
                c if is_special(c) => {
                    self.problem(self.line, describe_char(c));
                    return self.recover(ctx);
                }
                c => {
                    push_char(&mut out, c);
                    self.pos += 1;
                }
            }
            at_start = false;
        }
        ok.then_some(Word { bytes: out, line })
    }

    fn expand_home(&mut self, out: &mut Vec<u8>, ok: &mut bool, what: &str) {
        match self.home {
            Some(h) => out.extend_from_slice(h.as_os_str().as_bytes()),
            None => {
                // Not a syntax error: keep parsing the line to find further problems.
                self.problem(
                    self.line,
                    format!("{what} (home expansion) is only allowed in a per-user config"),
                );
                *ok = false;
            }
        }
    }

    /// At a `$`: expand `$HOME`/`${HOME}`, or report why not. False on a syntax error.
    fn dollar(&mut self, out: &mut Vec<u8>, ok: &mut bool) -> bool {
        let ahead: String = self.chars[self.pos + 1..].iter().take(6).collect();
        let after = |n: usize| self.chars.get(self.pos + n).copied();
        if ahead.starts_with("HOME") && !after(5).is_some_and(is_name_char) {
            self.pos += 5;
            self.expand_home(out, ok, "`$HOME`");
            return true;
        }
        if ahead.starts_with("{HOME}") {
            self.pos += 7;
            self.expand_home(out, ok, "`${HOME}`");
            return true;
        }
        let msg = match after(1) {
            Some('(') => "command substitution `$(...)` is not supported".to_string(),
            Some('{') => {
                "parameter expansion `${...}` is not supported (only `${HOME}` in a per-user \
                 config)"
                    .to_string()
            }
            Some('\'') => "`$'...'` quoting is not supported".to_string(),
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let name: String = self.chars[self.pos + 1..]
                    .iter()
                    .take_while(|c| is_name_char(**c))
                    .collect();
                format!("variable `${name}` is not supported (only `$HOME` in a per-user config)")
            }
            _ => "a literal `$` must be quoted as '$' or \\$".to_string(),
        };
        self.problem(self.line, msg);
        false
    }
}

// ---------------------------------------------------------------------------------------------
// From assignments to a Config

/// Absolute, without `.` or empty segments or a trailing slash; `..` is refused because its
/// meaning depends on symlinks, which the config must not be able to smuggle in.
fn normalize(raw: &[u8]) -> Result<PathBuf, String> {
    let shown = String::from_utf8_lossy(raw);
    if raw.contains(&0) {
        return Err(format!("`{shown}` contains a NUL byte"));
    }
    if !raw.starts_with(b"/") {
        return Err(format!("`{shown}` is not an absolute path"));
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err(format!("`{shown}` contains `..`")),
            c => {
                out.push(b'/');
                out.extend_from_slice(c);
            }
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Ok(PathBuf::from(OsString::from_vec(out)))
}

fn scalar<'w>(a: &'w Assignment, problems: &mut Vec<(usize, String)>) -> Option<&'w Word> {
    match &a.value {
        Value::Scalar(w) => Some(w),
        Value::Array(_) => {
            problems.push((
                a.line,
                format!("{} takes a single value, not an array", a.key),
            ));
            None
        }
    }
}

fn text(w: &Word) -> String {
    String::from_utf8_lossy(&w.bytes).into_owned()
}

fn apply(
    assignments: Vec<Assignment>,
    problems: &mut Vec<(usize, String)>,
    warnings: &mut Vec<Warning>,
) -> Config {
    let mut cfg = Config::default();
    for a in &assignments {
        match a.key.as_str() {
            "WHATTOSYNC" => {
                let words: Vec<&Word> = match &a.value {
                    // bash would give one empty element; "no targets" is what the user meant.
                    Value::Scalar(w) if w.bytes.is_empty() => Vec::new(),
                    Value::Scalar(w) => vec![w],
                    Value::Array(v) => v.iter().collect(),
                };
                let mut list: Vec<PathBuf> = Vec::new();
                let mut ok = true;
                for w in words {
                    if w.bytes.is_empty() {
                        problems.push((w.line, "empty entry in WHATTOSYNC".into()));
                        ok = false;
                        continue;
                    }
                    match normalize(&w.bytes) {
                        Ok(p) if list.contains(&p) => warnings.push(Warning {
                            line: w.line,
                            message: format!(
                                "WHATTOSYNC lists `{}` twice; the repeat is ignored",
                                p.display()
                            ),
                        }),
                        Ok(p) => list.push(p),
                        Err(m) => {
                            problems.push((w.line, format!("WHATTOSYNC: {m}")));
                            ok = false;
                        }
                    }
                }
                if ok {
                    cfg.whattosync = list;
                }
            }
            "VOLATILE" => {
                if let Some(w) = scalar(a, problems) {
                    match normalize(&w.bytes) {
                        Ok(p) => cfg.volatile = p,
                        Err(m) => problems.push((w.line, format!("VOLATILE: {m}"))),
                    }
                }
            }
            "USE_OVERLAYFS" => {
                if let Some(w) = scalar(a, problems) {
                    cfg.use_overlayfs = is_truthy(&text(w));
                }
            }
            "USE_BACKUPS" => {
                if let Some(w) = scalar(a, problems) {
                    cfg.use_backups = is_truthy(&text(w));
                }
            }
            "ENABLE_HARDLINK_SAFETY_CHECK" => {
                if let Some(w) = scalar(a, problems) {
                    let v = text(w);
                    // asd compares it as a number (non-zero = on); words are accepted too.
                    cfg.hardlink_safety_check = match v.parse::<i64>() {
                        Ok(n) => n != 0,
                        Err(_) => is_truthy(&v),
                    };
                }
            }
            "BACKUP_LIMIT" => {
                if let Some(w) = scalar(a, problems) {
                    let v = text(w);
                    match v.parse::<usize>() {
                        Ok(n) if v.bytes().all(|b| b.is_ascii_digit()) => cfg.backup_limit = n,
                        _ => problems.push((
                            w.line,
                            format!("BACKUP_LIMIT must be a non-negative integer, not `{v}`"),
                        )),
                    }
                }
            }
            "RESYNC_INTERVAL" => {
                if let Some(w) = scalar(a, problems) {
                    let v = text(w);
                    match parse_interval(&v) {
                        Some(d) => cfg.resync_interval = d,
                        None => problems.push((
                            w.line,
                            format!(
                                "RESYNC_INTERVAL must be seconds or a number with s, m or h \
                                 (e.g. 90s, 30m, 1h), from 1 s to 366 days, not `{v}`"
                            ),
                        )),
                    }
                }
            }
            // Our `$HOME` comes from the environment; honouring a reassignment would need
            // bash's evaluation order, so refuse rather than expand the wrong value.
            "HOME" => problems.push((a.line, "assigning HOME is not supported".into())),
            other => {
                let upper = other.to_ascii_uppercase();
                let hint = if KNOWN_KEYS.contains(&upper.as_str()) {
                    format!(" (did you mean {upper}?)")
                } else {
                    String::new()
                };
                warnings.push(Warning {
                    line: a.line,
                    message: format!("unknown key `{other}` is ignored{hint}"),
                });
            }
        }
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str, home: Option<&str>) -> Config {
        let expand = Expand {
            home: home.map(PathBuf::from),
        };
        match parse(text, Path::new("t.conf"), &expand) {
            Ok((c, _)) => c,
            Err(e) => panic!("{e}"),
        }
    }

    fn problems(text: &str) -> Vec<(usize, String)> {
        match parse(text, Path::new("t.conf"), &Expand::default()) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn truthy_words() {
        for w in [
            "y", "YES", "True", "t", "on", "1", "enabled", "Enable", "use",
        ] {
            assert!(is_truthy(w), "{w}");
        }
        for w in ["", "no", "0", "off", "yes ", "2", "maybe"] {
            assert!(!is_truthy(w), "{w}");
        }
    }

    #[test]
    fn normalize_paths() {
        let n = |s: &str| normalize(s.as_bytes()).map(|p| p.to_string_lossy().into_owned());
        assert_eq!(n("/"), Ok("/".into()));
        assert_eq!(n("///"), Ok("/".into()));
        assert_eq!(n("/a//b/./c/"), Ok("/a/b/c".into()));
        assert_eq!(n("/a/.b/c./"), Ok("/a/.b/c.".into()));
        assert!(n("a/b").is_err());
        assert!(n("/a/../b").is_err());
        assert!(n("/a/..").is_err());
        assert!(n("/a/...").is_ok());
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("3600"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_interval("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_interval("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_interval("2h"), Some(Duration::from_secs(7200)));
        for bad in [
            "",
            "0",
            "0s",
            "h",
            "-5",
            "+5",
            "1.5h",
            "1d",
            "1 h",
            "99999999999999999999",
        ] {
            assert_eq!(parse_interval(bad), None, "{bad}");
        }
        assert_eq!(parse_interval("8784h"), Some(MAX_RESYNC_INTERVAL));
        assert_eq!(parse_interval("8785h"), None);
    }

    #[test]
    fn quoting_concatenates_like_bash() {
        let c = ok(r##"VOLATILE=/a"b c"'d$e'\ f\$g"\"\\\$""##, None);
        assert_eq!(c.volatile, PathBuf::from(r#"/ab cd$e f$g"\$"#));
        // A `#` inside a word does not start a comment; other backslashes stay in "...".
        let c = ok("VOLATILE=/x#y\"\\n\" # real comment", None);
        assert_eq!(c.volatile, PathBuf::from("/x#y\\n"));
    }

    #[test]
    fn home_expansion_detail() {
        let c = ok(
            "WHATTOSYNC=(~ ~/a $HOME/b \"${HOME}/c\" /x/~)\n",
            Some("/home/al"),
        );
        let want: Vec<PathBuf> = ["/home/al", "/home/al/a", "/home/al/b", "/home/al/c", "/x/~"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(c.whattosync, want);
        let p = problems("VOLATILE='~'/x\nVOLATILE=$HOMEDIR\nVOLATILE=~bob/x\n");
        let lines: Vec<usize> = p.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, vec![1, 2, 3], "{p:?}");
    }

    #[test]
    fn template_parses_to_defaults() {
        assert_eq!(ok(default_template(), None), Config::default());
        assert_eq!(ok(default_template(), Some("/home/x")), Config::default());
        // Every key is documented in the template.
        for k in KNOWN_KEYS {
            assert!(default_template().contains(k), "{k}");
        }
    }

    #[test]
    fn one_problem_per_broken_array_element() {
        let p = problems("WHATTOSYNC=(\n  '/a'\n  /b;c\n  \"$(date)\"\n  /d)\nVOLATILE=/v\n");
        let lines: Vec<usize> = p.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, vec![3, 4], "{p:?}");
    }

    #[test]
    fn arbitrary_input_never_panics() {
        // Shell-significant characters, so that random text hits every branch of the lexer.
        let alphabet: Vec<char> = "AW=()'\"\\$~#;&|<> \t\n/{}*?[]`HOME.xé\r0"
            .chars()
            .collect();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let len = (seed >> 59) as usize;
            let prefix = ["", "A=", "A=(", "A=\""][(seed & 3) as usize];
            let body: String = (0..len)
                .map(|i| {
                    let r = seed.rotate_left(7 * i as u32) >> 40;
                    alphabet[r as usize % alphabet.len()]
                })
                .collect();
            let text = format!("{prefix}{body}");
            for home in [None, Some(PathBuf::from("/h"))] {
                let _ = parse(&text, Path::new("f"), &Expand { home });
            }
        }
    }

    #[test]
    fn crlf_is_explained() {
        let p = problems("VOLATILE=/tmp\r\n");
        assert!(p[0].1.contains("CRLF"), "{p:?}");
    }

    #[test]
    fn display_names_file_and_lines() {
        let e = parse(
            "a;b\nVOLATILE=x\n",
            Path::new("/etc/asd.conf"),
            &Expand::default(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("/etc/asd.conf"), "{e}");
        assert!(e.contains("line 1:") && e.contains("line 2:"), "{e}");
    }
}
