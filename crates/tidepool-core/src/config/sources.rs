//! Where each configuration value comes from, and the effective configuration as text.
//!
//! Three layers, each overriding the one before: the built-in defaults, the file, and the
//! environment. One rule maps a key to its variable: `TIDEPOOL_` then the key's path in upper
//! case with `__` between segments, e.g. `[pool] policy` ← `TIDEPOOL_POOL__POLICY`, `[server]
//! database_url` ← `TIDEPOOL_SERVER__DATABASE_URL`, the first `[[models]]`' `context_tokens` ←
//! `TIDEPOOL_MODELS__0__CONTEXT_TOKENS` (an entry the file declares). Only names with a `__` are
//! read, so the command-line variables (`TIDEPOOL_CONFIG`, `TIDEPOOL_DATABASE_URL`, …) are
//! never mistaken for keys. A value is read as its key's type: strings as written, integers and
//! `true`/`false` parsed, arrays and tables as TOML inline values (`["eu", "us"]`,
//! `{ acme = ["eu"] }`). A variable naming no key, or whose value does not parse, is an error,
//! as an unknown key in the file is.
//!
//! The approach: the file is deserialized strictly ([`Config`], `deny_unknown_fields`) and
//! serialized back into a TOML tree, which then holds every key with its default filled in;
//! an environment variable must name a key of that tree (or an optional key, which is absent
//! while unset: [`OPTIONAL_KEYS`]) and takes that key's type. The tree is deserialized again
//! after each override, so a bad value is reported against its variable.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use super::Config;
use crate::{CoreError, FieldError};

/// What every configuration variable starts with.
pub const ENV_PREFIX: &str = "TIDEPOOL_";
/// Between the segments of a key's path in a variable's name.
pub const ENV_SEPARATOR: &str = "__";

/// Keys that are absent from the serialized configuration while unset (`Option`s), with their
/// type; `[]` stands for any index of an array. A unit test keeps this list complete.
const OPTIONAL_KEYS: &[(&str, Kind)] = &[
    ("server.models_dir", Kind::String),
    ("server.metrics_listen", Kind::String),
    ("pool.memory_bytes_max", Kind::Integer),
    ("pool.memory_models_max", Kind::Integer),
    ("models[].keep_alive_ms", Kind::Integer),
    ("models[].price_cached_input_per_mtok", Kind::Integer),
    ("backends[].api_key_env", Kind::String),
    ("backends[].api_key_file", Kind::String),
    ("batch.files_dir", Kind::String),
];

/// Values printed as `***`, or with their password replaced, wherever they are shown.
const SECRET_KEYS: &[&str] = &["server.database_url", "alerts[].secret"];

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The configuration file (or the built-in one).
    File,
    /// The environment variable named.
    Env(String),
    /// A command-line option, or the environment variable behind it (e.g.
    /// `--database-url` / `TIDEPOOL_DATABASE_URL`).
    Flag(String),
    /// Set nowhere: the built-in default.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File => f.write_str("file"),
            Self::Env(name) => write!(f, "env {name}"),
            Self::Flag(flag) => write!(f, "flag {flag}"),
            Self::Default => f.write_str("default"),
        }
    }
}

/// The TOML type of a key, which an override's text is parsed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    String,
    Integer,
    Float,
    Boolean,
    /// Arrays, tables and datetimes: a TOML inline value.
    Inline,
}

impl Kind {
    fn of(value: &Value) -> Self {
        match value {
            Value::String(_) => Self::String,
            Value::Integer(_) => Self::Integer,
            Value::Float(_) => Self::Float,
            Value::Boolean(_) => Self::Boolean,
            Value::Datetime(_) | Value::Array(_) | Value::Table(_) => Self::Inline,
        }
    }

    /// `text` as a value of this type; the error never repeats `text` (it may be a secret).
    fn parse(self, text: &str) -> Result<Value, String> {
        match self {
            Self::String => Ok(Value::String(text.to_owned())),
            Self::Integer => text
                .trim()
                .parse()
                .map(Value::Integer)
                .map_err(|_| "expected an integer".to_owned()),
            Self::Float => text
                .trim()
                .parse()
                .map(Value::Float)
                .map_err(|_| "expected a number".to_owned()),
            Self::Boolean => match text.trim().to_ascii_lowercase().as_str() {
                "true" => Ok(Value::Boolean(true)),
                "false" => Ok(Value::Boolean(false)),
                _ => Err("expected true or false".to_owned()),
            },
            Self::Inline => toml::from_str::<Table>(&format!("value = {text}"))
                .ok()
                .and_then(|mut table| table.remove("value"))
                .ok_or_else(|| {
                    "expected a TOML inline value, e.g. [\"a\", \"b\"] or { key = \"value\" }"
                        .to_owned()
                }),
        }
    }
}

/// The effective configuration: file, environment overrides and defaults, with the source of
/// every value. Not yet validated: [`Config::validate`] (so `tidepool config check` can show an
/// invalid configuration with all its errors).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub config: Config,
    /// The file read (a path, or a label such as `<built-in tidepool.toml>`).
    pub origin: PathBuf,
    /// `config` as a TOML tree, defaults filled in.
    tree: Table,
    /// Leaf path (`pool.policy`, `models[0].id`) → where its value came from; absent: default.
    sources: BTreeMap<String, Source>,
}

impl Resolved {
    /// Parses `text` strictly, then applies the `TIDEPOOL_<SECTION>__<KEY>` variables among
    /// `env` (other names are ignored). All bad variables are reported together.
    pub fn new<I, K, V>(text: &str, origin: &Path, env: I) -> Result<Self, CoreError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let parse_error = |error| CoreError::config_parse(origin, text, &error);
        let config: Config = toml::from_str(text).map_err(parse_error)?;
        let file: Table = toml::from_str(text).map_err(parse_error)?;
        let mut sources = BTreeMap::new();
        leaves(&Value::Table(file), "", &mut |path| {
            sources.insert(path, Source::File);
        });
        let Value::Table(tree) = Value::try_from(&config).map_err(|e| invalid("config", e))? else {
            return Err(invalid("config", "does not serialize to a table"));
        };
        let mut resolved = Self {
            config,
            origin: origin.to_owned(),
            tree,
            sources,
        };
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| is_config_var(name.as_ref()))
            .map(|(name, value)| (name.as_ref().to_owned(), value.as_ref().to_owned()))
            .collect();
        vars.sort();
        let mut errors = Vec::new();
        for (name, value) in vars {
            let path: Vec<String> = name
                .strip_prefix(ENV_PREFIX)
                .unwrap_or_default()
                .split(ENV_SEPARATOR)
                .map(str::to_ascii_lowercase)
                .collect();
            if let Err(reason) = resolved.apply(&path, &value, &Source::Env(name.clone())) {
                errors.push(FieldError {
                    field: name,
                    reason,
                });
            }
        }
        if errors.is_empty() {
            Ok(resolved)
        } else {
            Err(CoreError::ConfigInvalid { errors })
        }
    }

    /// Reads the file at `path`, then as [`Self::new`].
    pub fn load<I, K, V>(path: &Path, env: I) -> Result<Self, CoreError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let text = std::fs::read_to_string(path).map_err(|source| CoreError::ConfigRead {
            path: path.to_owned(),
            source,
        })?;
        Self::new(&text, path, env)
    }

    /// Sets `key` (a dotted path, e.g. `server.database_url`) from a command-line option.
    pub fn set_flag(&mut self, key: &str, value: &str, flag: &str) -> Result<(), CoreError> {
        let path: Vec<String> = key.split('.').map(str::to_owned).collect();
        self.apply(&path, value, &Source::Flag(flag.to_owned()))
            .map_err(|reason| invalid(flag, reason))
    }

    /// Where the value at `path` (`pool.policy`, `models[0].id`) came from.
    pub fn source(&self, path: &str) -> Source {
        self.sources.get(path).cloned().unwrap_or(Source::Default)
    }

    /// Sets the value at `path` (lower-case segments; digits index an array) to `text`, read as
    /// that key's type; the whole configuration must still deserialize.
    fn apply(&mut self, path: &[String], text: &str, source: &Source) -> Result<(), String> {
        let mut tree = self.tree.clone();
        let (dotted, value) = set_path(&mut tree, path, text)?;
        let config = Value::Table(tree.clone())
            .try_into::<Config>()
            .map_err(|error| error.to_string())?;
        self.sources
            .retain(|leaf, _| !(leaf == &dotted || is_under(leaf, &dotted)));
        leaves(&value, &dotted, &mut |leaf| {
            self.sources.insert(leaf, source.clone());
        });
        self.tree = tree;
        self.config = config;
        Ok(())
    }

    /// The effective configuration as TOML, each value followed by its source as a comment;
    /// secrets redacted (also `{resolved}`).
    pub fn render(&self) -> String {
        self.to_string()
    }

    /// `[header]`, the table's values, then its sub-tables.
    fn render_table(
        &self,
        f: &mut fmt::Formatter<'_>,
        header: &str,
        path: &str,
        table: &Table,
    ) -> fmt::Result {
        let lines: Vec<(String, String)> = table
            .iter()
            .filter(|(_, value)| !value.is_table())
            .map(|(key, value)| {
                let leaf = format!("{path}.{key}");
                let shown = if SECRET_KEYS.contains(&strip_indices(&leaf).as_str()) {
                    // A URL keeps all but its password; any other secret is hidden whole.
                    let text = value.as_str().unwrap_or("***");
                    Value::String(if text.contains("://") {
                        redact_url(text)
                    } else {
                        "***".to_owned()
                    })
                } else {
                    value.clone()
                };
                (format!("{} = {shown}", toml_key(key)), self.comment(&leaf))
            })
            .collect();
        let width = lines.iter().map(|(line, _)| line.len()).max().unwrap_or(0);
        writeln!(f, "\n[{header}]")?;
        for (line, comment) in lines {
            writeln!(f, "{line:<width$}{comment}")?;
        }
        // Optional keys left unset, so they can be found here too.
        let pattern = format!("{}.", strip_indices(path));
        for (optional, _) in OPTIONAL_KEYS {
            if let Some(key) = optional.strip_prefix(&pattern)
                && !table.contains_key(key)
            {
                writeln!(f, "# {key} is unset  # default")?;
            }
        }
        for (key, value) in table {
            if let Value::Table(sub) = value {
                let sub_path = format!("{path}.{key}");
                let sub_header = format!("{}.{}", header.trim_matches(['[', ']']), toml_key(key));
                if sub.is_empty() {
                    writeln!(f, "\n[{sub_header}]{}", self.comment(&sub_path))?;
                } else {
                    self.render_table(f, &sub_header, &sub_path, sub)?;
                }
            }
        }
        Ok(())
    }

    fn comment(&self, path: &str) -> String {
        format!("  # {}", self.source(path))
    }
}

/// The effective configuration as TOML (see [`Resolved::render`]): sections in the order of
/// `tidepool.toml`, keys alphabetical.
impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "# Effective configuration: {}, then TIDEPOOL_<SECTION>__<KEY> environment \
             overrides, then defaults.",
            self.origin.display()
        )?;
        let order = [
            "server",
            "limits",
            "engine",
            "pool",
            "billing",
            "routing",
            "residency",
            "models",
            "backends",
        ];
        let mut sections: Vec<&String> = self.tree.keys().collect();
        sections.sort_by_key(|key| order.iter().position(|o| o == key).unwrap_or(order.len()));
        for key in sections {
            match &self.tree[key.as_str()] {
                Value::Table(table) => self.render_table(f, key, key, table)?,
                Value::Array(items) if items.is_empty() => {
                    writeln!(f, "\n# no [[{key}]] ({})", self.source(key))?;
                }
                Value::Array(items) => {
                    for (index, item) in items.iter().enumerate() {
                        if let Value::Table(table) = item {
                            let path = format!("{key}[{index}]");
                            self.render_table(f, &format!("[{key}]"), &path, table)?;
                        }
                    }
                }
                value => writeln!(f, "{key} = {value}{}", self.comment(key))?,
            }
        }
        Ok(())
    }
}

/// Whether `name` is a configuration variable (`TIDEPOOL_` and at least one `__`).
pub fn is_config_var(name: &str) -> bool {
    name.strip_prefix(ENV_PREFIX)
        .is_some_and(|rest| rest.contains(ENV_SEPARATOR))
}

/// `url` with its password replaced by `***`: the `user:password@` part and any
/// `password=` query parameter. Other text is returned as it is.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((name, _)) if name.to_ascii_lowercase().contains("password") => {
                        format!("{name}=***")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// Where a database URL points, for a log line: an SQLite file as an absolute path (relative
/// paths resolved against `cwd`), anything else redacted.
pub fn database_location(url: &str, cwd: &Path) -> String {
    let Some(rest) = url.strip_prefix("sqlite:") else {
        return redact_url(url);
    };
    let file = rest.trim_start_matches("//");
    let file = file.split_once('?').map_or(file, |(file, _)| file);
    if file.is_empty() || file == ":memory:" {
        return "an in-memory SQLite database".to_owned();
    }
    format!("the SQLite file {}", cwd.join(file).display())
}

fn invalid(field: &str, reason: impl fmt::Display) -> CoreError {
    CoreError::ConfigInvalid {
        errors: vec![FieldError {
            field: field.to_owned(),
            reason: reason.to_string(),
        }],
    }
}

/// Sets `path` in `tree` to `text` read as the key's type; returns the key's dotted path
/// (`models[0].context_tokens`) and the value set.
fn set_path(tree: &mut Table, path: &[String], text: &str) -> Result<(String, Value), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("names no key".to_owned());
    };
    if path.iter().any(String::is_empty) {
        return Err("has an empty path segment".to_owned());
    }
    let mut dotted = String::new();
    let mut node = tree;
    let mut parents = parents.iter().peekable();
    // Walk the tables (and array entries) down to the one that holds `last`.
    while let Some(segment) = parents.next() {
        let child = node
            .get_mut(segment.as_str())
            .ok_or_else(|| unknown_key(&dotted, segment))?;
        dotted = join(&dotted, segment);
        node = match child {
            Value::Table(table) => table,
            Value::Array(items) => {
                let Some(index) = parents.next() else {
                    return set_array_item(items, &dotted, last, text);
                };
                let count = items.len();
                let item = index
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| items.get_mut(i))
                    .ok_or_else(|| {
                        format!("`{dotted}` has {count} entries; `{index}` is not an index of one")
                    })?;
                dotted = format!("{dotted}[{index}]");
                match item {
                    Value::Table(table) => table,
                    _ => return Err(format!("`{dotted}` is not a table")),
                }
            }
            _ => return Err(format!("`{dotted}` is a value, not a table")),
        };
    }
    let key = join(&dotted, last);
    let kind = match node.get(last.as_str()) {
        Some(existing) => Kind::of(existing),
        None => OPTIONAL_KEYS
            .iter()
            .find(|(optional, _)| *optional == strip_indices(&key))
            .map(|(_, kind)| *kind)
            .ok_or_else(|| unknown_key(&dotted, last))?,
    };
    let value = kind
        .parse(text)
        .map_err(|reason| format!("`{key}`: {reason}"))?;
    node.insert(last.clone(), value.clone());
    Ok((key, value))
}

/// `last` is an index into the array at `dotted` (`TIDEPOOL_BACKENDS__0__MODELS__1`, or a
/// whole `TIDEPOOL_MODELS__0`). Returns what was set: the entry of an array of tables, else the
/// whole array (an array of values is one leaf).
fn set_array_item(
    items: &mut [Value],
    dotted: &str,
    last: &str,
    text: &str,
) -> Result<(String, Value), String> {
    let count = items.len();
    let index = last
        .parse::<usize>()
        .ok()
        .filter(|i| *i < count)
        .ok_or_else(|| {
            format!("`{dotted}` has {count} entries; `{last}` is not an index of one")
        })?;
    let key = format!("{dotted}[{index}]");
    let value = Kind::of(&items[index])
        .parse(text)
        .map_err(|reason| format!("`{key}`: {reason}"))?;
    let whole_array = !value.is_table();
    items[index] = value.clone();
    if whole_array {
        Ok((dotted.to_owned(), Value::Array(items.to_vec())))
    } else {
        Ok((key, value))
    }
}

fn unknown_key(parent: &str, segment: &str) -> String {
    format!("no configuration key `{}`", join(parent, segment))
}

fn join(parent: &str, segment: &str) -> String {
    if parent.is_empty() {
        segment.to_owned()
    } else {
        format!("{parent}.{segment}")
    }
}

/// `models[3].keep_alive_ms` → `models[].keep_alive_ms`.
fn strip_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

/// Whether `leaf` lies inside the table or array at `path`.
fn is_under(leaf: &str, path: &str) -> bool {
    leaf.strip_prefix(path)
        .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

/// Calls `found` with the path of every leaf under `value` (at `path`): scalars, arrays of
/// values and empty tables; arrays of tables are walked entry by entry (`models[0].id`).
fn leaves(value: &Value, path: &str, found: &mut impl FnMut(String)) {
    match value {
        Value::Table(table) if !table.is_empty() => {
            for (key, child) in table {
                leaves(child, &join(path, key), found);
            }
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_table) => {
            for (index, item) in items.iter().enumerate() {
                leaves(item, &format!("{path}[{index}]"), found);
            }
        }
        _ => found(path.to_owned()),
    }
}

/// A key as TOML writes it: bare when it can be, quoted otherwise (`"acme/prod"`).
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        Value::String(key.to_owned()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[server]
listen = "127.0.0.1:9000"

[pool]
ttft_slo_ms = 4000

[[models]]
id = "smol"
kind = "chat"
file = "smol.gguf"

[[models]]
id = "big"
kind = "chat"
file = "big.gguf"
"#;

    fn resolve(env: &[(&str, &str)]) -> Result<Resolved, CoreError> {
        Resolved::new(FILE, Path::new("t.toml"), env.iter().copied())
    }

    fn errors(result: Result<Resolved, CoreError>) -> Vec<FieldError> {
        match result {
            Err(CoreError::ConfigInvalid { errors }) => errors,
            other => panic!("expected ConfigInvalid, got {other:?}"),
        }
    }

    #[test]
    fn env_overrides_any_key_by_type_and_records_sources() {
        let resolved = resolve(&[
            ("TIDEPOOL_POOL__POLICY", "swap-lru"),
            (
                "tidepool_server__listen",
                "ignored: the prefix is upper case",
            ),
            ("TIDEPOOL_SERVER__LISTEN", "0.0.0.0:8080"),
            ("TIDEPOOL_Server__Database_Url", "postgres://u:secret@db/tp"),
            ("TIDEPOOL_POOL__PREFILL_RIDERS", "TRUE"),
            ("TIDEPOOL_POOL__MEMORY_BYTES_MAX", "1073741824"),
            ("TIDEPOOL_MODELS__1__CONTEXT_TOKENS", "4096"),
            ("TIDEPOOL_RESIDENCY__TENANTS", "{ acme = [\"local\"] }"),
            ("TIDEPOOL_BILLING__REPLICA_ID", "42"),
            // Command-line variables (one underscore) are not configuration keys.
            ("TIDEPOOL_DATABASE_URL", "sqlite://other.db"),
            ("TIDEPOOL_MODELS_DIR", "/models"),
            ("PATH", "/bin"),
        ])
        .unwrap();
        let config = &resolved.config;
        assert_eq!(config.pool.policy, super::super::PoolPolicy::SwapLru);
        assert_eq!(config.server.listen, "0.0.0.0:8080");
        assert_eq!(config.server.database_url, "postgres://u:secret@db/tp");
        assert!(config.pool.knobs.prefill_riders);
        assert_eq!(config.pool.memory_bytes_max, Some(1 << 30));
        assert_eq!(config.models[1].context_tokens, 4096);
        assert_eq!(config.models[0].context_tokens, 2048);
        assert_eq!(config.billing.replica_id, "42");
        assert_eq!(
            config.residency.regions_for("acme", "p"),
            Some(vec!["local".to_owned()])
        );
        assert_eq!(
            resolved.source("pool.policy"),
            Source::Env("TIDEPOOL_POOL__POLICY".into())
        );
        assert_eq!(resolved.source("pool.ttft_slo_ms"), Source::File);
        assert_eq!(resolved.source("pool.tbt_slo_ms"), Source::Default);
        assert_eq!(resolved.source("models[0].id"), Source::File);
        assert_eq!(resolved.source("models[0].context_tokens"), Source::Default);
        assert_eq!(
            resolved.source("models[1].context_tokens"),
            Source::Env("TIDEPOOL_MODELS__1__CONTEXT_TOKENS".into())
        );
        assert_eq!(
            resolved.source("residency.tenants.acme"),
            Source::Env("TIDEPOOL_RESIDENCY__TENANTS".into())
        );
        assert!(config.validate().is_ok());
    }

    #[test]
    fn bad_variables_are_all_reported_by_name() {
        let errors = errors(resolve(&[
            ("TIDEPOOL_POOL__BOGUS", "1"),
            ("TIDEPOOL_NOPE__X", "1"),
            ("TIDEPOOL_POOL__TTFT_SLO_MS", "soon"),
            ("TIDEPOOL_POOL__POLICY", "fastest"),
            ("TIDEPOOL_MODELS__2__SEQS_MAX", "4"),
            ("TIDEPOOL_SERVER__LISTEN__PORT", "1"),
            ("TIDEPOOL_POOL____POLICY", "token"),
            ("TIDEPOOL_SERVER__LISTEN", "ok"),
        ]));
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "TIDEPOOL_MODELS__2__SEQS_MAX",
                "TIDEPOOL_NOPE__X",
                "TIDEPOOL_POOL__BOGUS",
                "TIDEPOOL_POOL__POLICY",
                "TIDEPOOL_POOL__TTFT_SLO_MS",
                "TIDEPOOL_POOL____POLICY",
                "TIDEPOOL_SERVER__LISTEN__PORT",
            ]
        );
        let reasons: Vec<&str> = errors.iter().map(|e| e.reason.as_str()).collect();
        assert!(reasons[0].contains("`models` has 2 entries"), "{reasons:?}");
        assert!(reasons[1].contains("no configuration key `nope`"));
        assert!(reasons[2].contains("no configuration key `pool.bogus`"));
        assert!(reasons[3].contains("fastest"));
        assert!(reasons[4].contains("expected an integer"));
        assert!(!reasons[4].contains("soon"), "values are never echoed");
        assert!(reasons[5].contains("empty path segment"));
        assert!(reasons[6].contains("not a table"));
    }

    #[test]
    fn render_shows_sources_and_hides_passwords() {
        let resolved = resolve(&[(
            "TIDEPOOL_SERVER__DATABASE_URL",
            "postgres://tidepool:s3cret@db:5432/tp?sslmode=require&password=s3cret",
        )])
        .unwrap();
        let text = resolved.render();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains(
            "database_url = \"postgres://tidepool:***@db:5432/tp?sslmode=require&password=***\"  # env TIDEPOOL_SERVER__DATABASE_URL"
        ), "{text}");
        let line = |key: &str| {
            text.lines()
                .find(|l| l.starts_with(key))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(line("listen ").ends_with("# file"), "{text}");
        assert!(line("ttft_slo_ms ").ends_with("# file"));
        assert!(line("tbt_slo_ms ").ends_with("# default"));
        assert_eq!(text.matches("[[models]]").count(), 2);
        assert!(text.contains("# no [[backends]]"));
        assert!(
            text.contains("\n# memory_bytes_max is unset  # default\n"),
            "{text}"
        );
        // The rendered text is a configuration that parses to the same values.
        let again = Resolved::new(&text, Path::new("again"), [("", "")]).unwrap();
        assert_eq!(again.config.pool.knobs.ttft_slo_ms, 4000);
        assert_eq!(again.config.models.len(), 2);
    }

    #[test]
    fn flags_override_with_their_own_source() {
        let mut resolved = resolve(&[("TIDEPOOL_SERVER__DATABASE_URL", "sqlite://a.db")]).unwrap();
        resolved
            .set_flag("server.database_url", "sqlite://b.db", "--database-url")
            .unwrap();
        assert_eq!(resolved.config.server.database_url, "sqlite://b.db");
        assert_eq!(
            resolved.source("server.database_url").to_string(),
            "flag --database-url"
        );
    }

    #[test]
    fn redacts_passwords_only() {
        let cases = [
            ("postgres://u:pw@h/db", "postgres://u:***@h/db"),
            ("postgres://u@h:5432/db", "postgres://u@h:5432/db"),
            ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
            (
                "postgres://h/db?user=u&password=pw",
                "postgres://h/db?user=u&password=***",
            ),
            ("sqlite://tidepool.db", "sqlite://tidepool.db"),
            ("sqlite::memory:", "sqlite::memory:"),
        ];
        for (url, redacted) in cases {
            assert_eq!(redact_url(url), redacted, "{url}");
        }
        let cwd = Path::new("/srv");
        assert_eq!(
            database_location("sqlite://tidepool.db", cwd),
            "the SQLite file /srv/tidepool.db"
        );
        assert_eq!(
            database_location("sqlite:///var/tp.db?mode=rwc", cwd),
            "the SQLite file /var/tp.db"
        );
        assert_eq!(
            database_location("postgres://u:pw@h/db", cwd),
            "postgres://u:***@h/db"
        );
    }

    /// Every `Option` key of the configuration is in [`OPTIONAL_KEYS`], with its type, and every
    /// entry there is one: JSON keeps the `null`s that TOML drops.
    #[test]
    fn optional_keys_are_complete() {
        fn walk(value: &serde_json::Value, path: &str, nulls: &mut Vec<String>) {
            match value {
                serde_json::Value::Null => nulls.push(path.to_owned()),
                serde_json::Value::Object(map) => {
                    for (key, child) in map {
                        walk(child, &join(path, key), nulls);
                    }
                }
                serde_json::Value::Array(items) => {
                    if let Some(first) = items.first() {
                        walk(first, &format!("{path}[]"), nulls);
                    }
                }
                _ => {}
            }
        }
        let text = format!(
            "{FILE}\n[[models]]\nid = \"r\"\nkind = \"chat\"\nbackend = \"remote\"\n\n\
             [[backends]]\nid = \"w\"\nkind = \"worker\"\nurl = \"http://w\"\nregion = \"local\"\n\
             models = [\"r\"]\n"
        );
        let config: Config = toml::from_str(&text).unwrap();
        let json = serde_json::to_value(&config).unwrap();
        let mut nulls = Vec::new();
        walk(&json, "", &mut nulls);
        nulls.sort();
        let mut listed: Vec<String> = OPTIONAL_KEYS.iter().map(|(k, _)| (*k).to_owned()).collect();
        listed.sort();
        assert_eq!(nulls, listed);
        // Setting each through the environment works (the listed type is the right one).
        let resolved = Resolved::new(
            &text,
            Path::new("t.toml"),
            [
                ("TIDEPOOL_SERVER__MODELS_DIR", "/m"),
                ("TIDEPOOL_POOL__MEMORY_BYTES_MAX", "1"),
                ("TIDEPOOL_POOL__MEMORY_MODELS_MAX", "2"),
                ("TIDEPOOL_MODELS__0__KEEP_ALIVE_MS", "3"),
                ("TIDEPOOL_BACKENDS__0__API_KEY_FILE", "/k"),
                ("TIDEPOOL_BACKENDS__0__MODELS__0", "r"),
            ],
        )
        .unwrap();
        assert_eq!(resolved.config.models[0].keep_alive_ms, Some(3));
        assert_eq!(
            resolved.source("backends[0].api_key_file"),
            Source::Env("TIDEPOOL_BACKENDS__0__API_KEY_FILE".into())
        );
        assert_eq!(
            resolved.source("backends[0].models"),
            Source::Env("TIDEPOOL_BACKENDS__0__MODELS__0".into()),
            "an array of values is one leaf"
        );
    }
}
