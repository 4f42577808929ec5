//! `--config FILE`: a TOML file whose values become the defaults of the command-line options.
//!
//! Names are the options' names with `_` (or `-`): `fsync_batch_bytes = "16MiB"` in `[recv]` is
//! `walship recv --fsync-batch-bytes 16MiB` is `WALSHIP_FSYNC_BATCH_BYTES=16MiB`. Top-level keys set
//! global options (`log_format`, `log_level`); a table per subcommand (`[send]`, `[recv]`,
//! `[restore]`, ...) sets that subcommand's options. Values are written as on the command line
//! (strings, integers or booleans; a list for a repeatable option: `to = ["a:5499", "b:5499"]`). Because file values are installed as clap *defaults*, the
//! precedence is: flag > environment variable > file > built-in default; `--help` shows the
//! effective default. Unknown keys are errors (a typo must not silently fall back to a default).
use std::ffi::OsString;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {why}")]
    Parse { path: PathBuf, why: String },
    #[error("config file {path}: unknown key `{key}` in {section}; known keys there: {known}")]
    UnknownKey {
        path: PathBuf,
        section: String,
        key: String,
        known: String,
    },
    #[error("config file {path}: unknown section [{section}]; sections are the subcommands: {known}")]
    UnknownSection {
        path: PathBuf,
        section: String,
        known: String,
    },
    #[error("config file {path}: `{key}` in {section} must be a string, integer, float or boolean")]
    BadValue {
        path: PathBuf,
        section: String,
        key: String,
    },
}

/// The path given by `--config FILE` / `--config=FILE` in `args`, else by `WALSHIP_CONFIG`.
pub fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("WALSHIP_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Read `path` and install its values as defaults of `cmd`'s options.
pub fn apply_file(cmd: clap::Command, path: &Path) -> Result<clap::Command, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    apply_str(cmd, path, &text)
}

/// Install the values of TOML `text` (from `path`, for messages) as defaults of `cmd`'s options.
pub fn apply_str(mut cmd: clap::Command, path: &Path, text: &str) -> Result<clap::Command, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Parse {
        path: path.into(),
        why: e.to_string(),
    })?;
    for (key, value) in &table {
        if let toml::Value::Table(section) = value {
            let name = key.replace('_', "-");
            let Some(sub) = cmd.find_subcommand(&name) else {
                let known = cmd
                    .get_subcommands()
                    .map(|s| s.get_name().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(ConfigError::UnknownSection {
                    path: path.into(),
                    section: key.clone(),
                    known,
                });
            };
            let sub_name = sub.get_name().to_string();
            let mut sub = sub.clone();
            for (k, v) in section {
                sub = set_default(sub, path, &format!("[{key}]"), k, v)?;
            }
            cmd = cmd.mut_subcommand(&sub_name, |_| sub);
        } else {
            cmd = set_default(cmd, path, "the top level", key, value)?;
        }
    }
    Ok(cmd)
}

fn set_default(
    cmd: clap::Command,
    path: &Path,
    section: &str,
    key: &str,
    value: &toml::Value,
) -> Result<clap::Command, ConfigError> {
    let id = key.replace('-', "_");
    let settable =
        |a: &clap::Arg| !a.is_positional() && a.get_id() != "config" && a.get_id() != "help" && a.get_id() != "version";
    if !cmd.get_arguments().any(|a| a.get_id() == id.as_str() && settable(a)) {
        let known = cmd
            .get_arguments()
            .filter(|a| settable(a))
            .map(|a| a.get_id().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ConfigError::UnknownKey {
            path: path.into(),
            section: section.into(),
            key: key.into(),
            known,
        });
    }
    let bad = || ConfigError::BadValue { path: path.into(), section: section.into(), key: key.into() };
    let texts = match value {
        // A list (e.g. `to = ["a:5499", "b:5499"]`) gives a repeatable option several values.
        toml::Value::Array(items) if !items.is_empty() && repeatable(&cmd, &id) => items.iter().map(scalar).collect::<Option<Vec<_>>>().ok_or_else(bad)?,
        other => vec![scalar(other).ok_or_else(bad)?],
    };
    // A required option that the file supplies is no longer required (clap checks "required" before
    // it applies defaults).
    Ok(cmd.mut_arg(id, |a| a.default_values(texts).required(false)))
}

/// Whether option `id` of `cmd` takes several values (a repeatable flag).
fn repeatable(cmd: &clap::Command, id: &str) -> bool {
    cmd.get_arguments().any(|a| a.get_id() == id && matches!(a.get_action(), clap::ArgAction::Append))
}

/// A TOML value as it would be written on the command line (None: not a scalar).
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn cli() -> Command {
        Command::new("w")
            .arg(
                Arg::new("log_level")
                    .long("log-level")
                    .global(true)
                    .env("WALSHIP_TEST_CF_LOG")
                    .default_value("info"),
            )
            .subcommand(
                Command::new("recv")
                    .arg(
                        Arg::new("fsync_batch_bytes")
                            .long("fsync-batch-bytes")
                            .env("WALSHIP_TEST_CF_FBB")
                            .default_value("16MiB"),
                    )
                    .arg(Arg::new("once").long("once").action(ArgAction::SetTrue))
                    .arg(Arg::new("to").long("to").action(ArgAction::Append))
                    .arg(Arg::new("dir").long("dir")),
            )
            .subcommand(Command::new("gen-wal").arg(Arg::new("seed").long("seed")))
    }

    fn get(m: &clap::ArgMatches, sub: &str, id: &str) -> String {
        m.subcommand_matches(sub)
            .unwrap()
            .get_one::<String>(id)
            .cloned()
            .unwrap_or_default()
    }

    #[test]
    fn file_sets_defaults_flag_and_env_win() {
        let toml = "log_level = \"debug\"\n[recv]\nfsync_batch_bytes = \"4MiB\"\nonce = true\ndir = \"/w\"\n[gen_wal]\nseed = 7\n";
        let cmd = apply_str(cli(), Path::new("t.toml"), toml).unwrap();
        let m = cmd.clone().try_get_matches_from(["w", "recv"]).unwrap();
        assert_eq!(get(&m, "recv", "fsync_batch_bytes"), "4MiB");
        assert_eq!(get(&m, "recv", "dir"), "/w");
        assert!(m.subcommand_matches("recv").unwrap().get_flag("once"));
        assert_eq!(m.get_one::<String>("log_level").unwrap(), "debug");
        let m = cmd
            .clone()
            .try_get_matches_from(["w", "recv", "--fsync-batch-bytes", "1MiB"])
            .unwrap();
        assert_eq!(get(&m, "recv", "fsync_batch_bytes"), "1MiB");
        let m = cmd.clone().try_get_matches_from(["w", "gen-wal"]).unwrap();
        assert_eq!(get(&m, "gen-wal", "seed"), "7");
        // clap reads an option's environment variable when the option is defined, as main does at
        // start-up: so set it, then build. The variable is private to this test.
        std::env::set_var("WALSHIP_TEST_CF_FBB", "2MiB");
        let cmd = apply_str(cli(), Path::new("t.toml"), toml).unwrap();
        std::env::remove_var("WALSHIP_TEST_CF_FBB");
        let m = cmd.try_get_matches_from(["w", "recv"]).unwrap();
        assert_eq!(get(&m, "recv", "fsync_batch_bytes"), "2MiB");
    }

    #[test]
    fn a_list_gives_a_repeatable_option_its_values() {
        let cmd = apply_str(cli(), Path::new("t.toml"), "[recv]\nto = [\"a:1\", \"b:2\"]\n").unwrap();
        let m = cmd.clone().try_get_matches_from(["w", "recv"]).unwrap();
        let to: Vec<&String> = m.subcommand_matches("recv").unwrap().get_many::<String>("to").unwrap().collect();
        assert_eq!(to, ["a:1", "b:2"]);
        let m = cmd.try_get_matches_from(["w", "recv", "--to", "c:3"]).unwrap();
        assert_eq!(m.subcommand_matches("recv").unwrap().get_many::<String>("to").unwrap().count(), 1, "the command line wins");
    }

    #[test]
    fn unknown_keys_and_sections_are_errors() {
        let e = apply_str(cli(), Path::new("t.toml"), "[recv]\nfsync_batch_byte = 1\n").unwrap_err();
        assert!(
            e.to_string().contains("unknown key `fsync_batch_byte` in [recv]"),
            "{e}"
        );
        assert!(e.to_string().contains("fsync_batch_bytes"), "{e}");
        let e = apply_str(cli(), Path::new("t.toml"), "[rcv]\n").unwrap_err();
        assert!(matches!(e, ConfigError::UnknownSection { .. }), "{e}");
        let e = apply_str(cli(), Path::new("t.toml"), "[recv]\ndir = [1]\n").unwrap_err();
        assert!(matches!(e, ConfigError::BadValue { .. }), "{e}");
        assert!(apply_str(cli(), Path::new("t.toml"), "[recv\n").is_err());
    }

    #[test]
    fn finds_the_config_flag() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            config_path(&a(&["w", "--config", "x.toml", "recv"])),
            Some(PathBuf::from("x.toml"))
        );
        assert_eq!(
            config_path(&a(&["w", "recv", "--config=y.toml"])),
            Some(PathBuf::from("y.toml"))
        );
    }
}
