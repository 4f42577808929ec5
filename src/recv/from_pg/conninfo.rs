//! `--from-postgres CONNINFO`: libpq's `key=value` connection string or `postgresql://` URI (the
//! keywords a physical replication client needs), with libpq's fallbacks: PGHOST, PGPORT, PGUSER,
//! PGPASSWORD, the password file (PGPASSFILE, else ~/.pgpass), PGSSLMODE and PGSSLROOTCERT (else
//! ~/.postgresql/root.crt).

use std::path::{Path, PathBuf};

/// TLS towards the server, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Where and as whom to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// A host name or address, or (starting with '/') a Unix socket directory.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub sslmode: SslMode,
    /// The PEM CA certificates the server's certificate is checked against (sslrootcert,
    /// PGSSLROOTCERT, else ~/.postgresql/root.crt, which need not exist).
    pub sslrootcert: Option<PathBuf>,
    /// Whether sslrootcert was named (sslrootcert= or PGSSLROOTCERT): then it must exist.
    pub sslrootcert_given: bool,
    /// Overrides `--application-name` when the conninfo names one.
    pub application_name: Option<String>,
    pub connect_timeout_s: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnInfoError {
    #[error("--from-postgres: {0}")]
    Syntax(String),
    #[error("--from-postgres: unknown keyword {0:?} (known: host, hostaddr, port, user, password, passfile, sslmode, sslrootcert, application_name, connect_timeout, dbname)")]
    UnknownKeyword(String),
    #[error("--from-postgres: {keyword}={value:?}: {why}")]
    BadValue { keyword: String, value: String, why: String },
}

/// Splits `key=value` pairs; values may be single-quoted with `\'` and `\\` escapes.
fn pairs(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ConnInfoError::Syntax(format!("expected \"=\" after {key:?} (the form is key=value key=value ...)")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(ConnInfoError::Syntax(format!("unterminated quoted value of {key:?}"))),
                    Some('\\') => value.push(chars.next().ok_or_else(|| ConnInfoError::Syntax(format!("value of {key:?} ends in a backslash")))?),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.push(chars.next().ok_or_else(|| ConnInfoError::Syntax(format!("value of {key:?} ends in a backslash")))?);
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// `[user[:password]@][host][:port][/dbname][?keyword=value&...]` (after the scheme) as
/// keyword pairs; every part percent-decoded. One host only.
fn uri_pairs(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let (main, query) = s.split_once('?').unwrap_or((s, ""));
    let (authority, dbname) = main.split_once('/').unwrap_or((main, ""));
    let mut out = Vec::new();
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.push(("user".to_string(), percent_decode(user)?));
            }
            if let Some(p) = password {
                out.push(("password".to_string(), percent_decode(p)?));
            }
            hostport
        }
        None => authority,
    };
    if hostport.contains(',') {
        return Err(ConnInfoError::Syntax("a URI with several hosts; walship connects to one".into()));
    }
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(|| ConnInfoError::Syntax(format!("unterminated IPv6 address in {hostport:?}")))?;
        (h, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if !host.is_empty() {
        out.push(("host".to_string(), percent_decode(host)?));
    }
    if let Some(p) = port.filter(|p| !p.is_empty()) {
        out.push(("port".to_string(), percent_decode(p)?));
    }
    if !dbname.is_empty() {
        out.push(("dbname".to_string(), percent_decode(dbname)?));
    }
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or_else(|| ConnInfoError::Syntax(format!("URI parameter {kv:?} without \"=\"")))?;
        let (k, v) = (percent_decode(k)?, percent_decode(v)?);
        // libpq takes the JDBC spelling ssl=true as sslmode=require.
        if k == "ssl" && v == "true" {
            out.push(("sslmode".to_string(), "require".to_string()));
        } else {
            out.push((k, v));
        }
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, ConnInfoError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or_else(|| ConnInfoError::Syntax(format!("bad percent-encoding in {s:?}")))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConnInfoError::Syntax(format!("{s:?} decodes to bytes that are not UTF-8")))
}

/// What the process environment supplies (a seam for the tests).
pub struct Env {
    pub var: fn(&str) -> Option<String>,
    pub os_user: Option<String>,
    pub home: Option<PathBuf>,
}

impl Env {
    pub fn process() -> Env {
        let os_user = nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten().map(|u| u.name);
        Env { var: |k| std::env::var(k).ok(), os_user, home: std::env::var_os("HOME").map(PathBuf::from) }
    }
}

impl ConnInfo {
    /// Parses `s`, filling what it leaves out from `env` as libpq does.
    pub fn parse(s: &str, env: &Env) -> Result<ConnInfo, ConnInfoError> {
        let pairs = match s.strip_prefix("postgresql://").or_else(|| s.strip_prefix("postgres://")) {
            Some(rest) => uri_pairs(rest)?,
            None => pairs(s)?,
        };
        let mut host = None;
        let mut port = None;
        let mut user = None;
        let mut password = None;
        let mut passfile = None;
        let mut sslmode = None;
        let mut application_name = None;
        let mut connect_timeout_s = None;
        let mut sslrootcert = None;
        for (k, v) in pairs {
            let bad = |why: &str| ConnInfoError::BadValue { keyword: k.clone(), value: v.clone(), why: why.into() };
            match k.as_str() {
                "host" | "hostaddr" => host = Some(v.clone()),
                "port" => port = Some(v.parse::<u16>().map_err(|_| bad("expected a TCP port 1..=65535"))?),
                "user" => user = Some(v.clone()),
                "password" => password = Some(v.clone()),
                "passfile" => passfile = Some(PathBuf::from(&v)),
                "sslmode" => sslmode = Some(parse_sslmode(&v).ok_or_else(|| bad("expected disable, allow, prefer, require, verify-ca or verify-full"))?),
                "sslrootcert" => sslrootcert = Some(PathBuf::from(&v)),
                "application_name" => application_name = Some(v.clone()),
                "connect_timeout" => connect_timeout_s = Some(v.parse::<u64>().map_err(|_| bad("expected whole seconds"))?),
                // A physical replication connection is to no database; libpq ignores dbname then too.
                "dbname" | "replication" => {}
                _ => return Err(ConnInfoError::UnknownKeyword(k)),
            }
        }
        let var = env.var;
        let host = host.or_else(|| var("PGHOST")).unwrap_or_else(|| "localhost".into());
        let port = match port {
            Some(p) => p,
            None => match var("PGPORT") {
                Some(p) => p.parse().map_err(|_| ConnInfoError::BadValue { keyword: "PGPORT".into(), value: p, why: "expected a TCP port".into() })?,
                None => 5432,
            },
        };
        let user = user.or_else(|| var("PGUSER")).or_else(|| env.os_user.clone()).ok_or_else(|| ConnInfoError::Syntax("no user= given and no PGUSER or OS user name".into()))?;
        let sslmode = match sslmode {
            Some(m) => m,
            None => var("PGSSLMODE").and_then(|v| parse_sslmode(&v)).unwrap_or(SslMode::Prefer),
        };
        let sslrootcert = sslrootcert.or_else(|| var("PGSSLROOTCERT").map(PathBuf::from));
        let sslrootcert_given = sslrootcert.is_some();
        let sslrootcert = sslrootcert.or_else(|| env.home.as_ref().map(|h| h.join(".postgresql/root.crt")));
        let password = password.or_else(|| var("PGPASSWORD")).or_else(|| {
            let file = passfile.or_else(|| var("PGPASSFILE").map(PathBuf::from)).or_else(|| env.home.as_ref().map(|h| h.join(".pgpass")))?;
            password_from_file(&file, &host, port, &user)
        });
        Ok(ConnInfo { host, port, user, password, sslmode, sslrootcert, sslrootcert_given, application_name, connect_timeout_s })
    }

    /// The Unix socket path when `host` names a socket directory.
    pub fn unix_socket(&self) -> Option<PathBuf> {
        self.host.starts_with('/').then(|| Path::new(&self.host).join(format!(".s.PGSQL.{}", self.port)))
    }

    /// `host:port` (or the socket path) for messages.
    pub fn describe(&self) -> String {
        match self.unix_socket() {
            Some(p) => p.display().to_string(),
            None => format!("{}:{}", self.host, self.port),
        }
    }
}

fn parse_sslmode(v: &str) -> Option<SslMode> {
    Some(match v {
        "disable" => SslMode::Disable,
        "allow" => SslMode::Allow,
        "prefer" => SslMode::Prefer,
        "require" => SslMode::Require,
        "verify-ca" => SslMode::VerifyCa,
        "verify-full" => SslMode::VerifyFull,
        _ => return None,
    })
}

/// The password of the first matching `host:port:database:user:password` line (`*` matches
/// anything; the database of a replication connection is `replication`). libpq ignores a file
/// that group or others can read; so does this.
fn password_from_file(path: &Path, host: &str, port: u16, user: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.permissions().mode() & 0o077 != 0 {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let host = if host.starts_with('/') { "localhost" } else { host };
    let port = port.to_string();
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let fields = split_passfile_line(line)?;
        let want = [host, port.as_str(), "replication", user];
        fields[..4].iter().zip(want).all(|(f, w)| f == "*" || f == w).then(|| fields[4].clone())
    })
}

/// Five `:`-separated fields with `\:` and `\\` escapes.
fn split_passfile_line(line: &str) -> Option<Vec<String>> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut()?.push(chars.next()?),
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut()?.push(c),
        }
    }
    (fields.len() == 5).then_some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Env {
        Env { var: |_| None, os_user: Some("osuser".into()), home: None }
    }

    #[test]
    fn keywords_quotes_and_defaults() {
        let ci = ConnInfo::parse("host=db.example port=5433 user=rep password='it''s' sslmode=disable", &no_env());
        assert!(ci.is_err(), "a quote inside quotes must be escaped with a backslash");
        let ci = ConnInfo::parse(r"host=db.example port = 5433 user=rep password='it\'s a secret' sslmode=disable application_name=arch", &no_env()).unwrap();
        assert_eq!(ci.host, "db.example");
        assert_eq!(ci.port, 5433);
        assert_eq!(ci.password.as_deref(), Some("it's a secret"));
        assert_eq!(ci.sslmode, SslMode::Disable);
        assert_eq!(ci.application_name.as_deref(), Some("arch"));
        let ci = ConnInfo::parse("", &no_env()).unwrap();
        assert_eq!((ci.host.as_str(), ci.port, ci.user.as_str(), ci.sslmode), ("localhost", 5432, "osuser", SslMode::Prefer));
        let ci = ConnInfo::parse("host=/run/pg port=6000", &no_env()).unwrap();
        assert_eq!(ci.unix_socket(), Some(PathBuf::from("/run/pg/.s.PGSQL.6000")));
    }

    #[test]
    fn bad_input_is_named() {
        let e = ConnInfo::parse("host=a bogus=1", &no_env()).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = ConnInfo::parse("port=99999", &no_env()).unwrap_err().to_string();
        assert!(e.contains("port"), "{e}");
        assert!(ConnInfo::parse("host", &no_env()).is_err());
        assert!(ConnInfo::parse("password='open", &no_env()).is_err());
        assert!(ConnInfo::parse("postgresql://a,b/x", &no_env()).is_err(), "several hosts");
        assert!(ConnInfo::parse("postgresql://x/?sslmode=sometimes", &no_env()).is_err());
        assert!(ConnInfo::parse("postgresql://x/?bogus=1", &no_env()).is_err());
    }

    #[test]
    fn uris_as_libpq() {
        let ci = ConnInfo::parse("postgresql://rep:s%40cret@db.example:5433/postgres?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=arch", &no_env()).unwrap();
        assert_eq!((ci.host.as_str(), ci.port, ci.user.as_str()), ("db.example", 5433, "rep"));
        assert_eq!(ci.password.as_deref(), Some("s@cret"));
        assert_eq!(ci.sslmode, SslMode::VerifyFull);
        assert_eq!(ci.sslrootcert, Some(PathBuf::from("/etc/ca.pem")));
        assert!(ci.sslrootcert_given);
        assert_eq!(ci.application_name.as_deref(), Some("arch"));
        let ci = ConnInfo::parse("postgres://[::1]:6000", &no_env()).unwrap();
        assert_eq!((ci.host.as_str(), ci.port, ci.user.as_str()), ("::1", 6000, "osuser"));
        let ci = ConnInfo::parse("postgresql://%2Frun%2Fpg/?ssl=true", &no_env()).unwrap();
        assert_eq!(ci.unix_socket(), Some(PathBuf::from("/run/pg/.s.PGSQL.5432")));
        assert_eq!(ci.sslmode, SslMode::Require);
        let ci = ConnInfo::parse("postgresql://", &no_env()).unwrap();
        assert_eq!((ci.host.as_str(), ci.port), ("localhost", 5432));
        assert!(!ci.sslrootcert_given);
    }

    #[test]
    fn the_password_file_matches_host_port_replication_and_user_and_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pgpass");
        std::fs::write(&f, "# comment\nother:5432:*:rep:wrong\ndb:5432:replication:rep:pa\\:ss\n*:*:*:*:fallback\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let conninfo = format!("host=db user=rep passfile={}", f.display());
        assert_eq!(ConnInfo::parse(&conninfo, &no_env()).unwrap().password.as_deref(), Some("pa:ss"));
        let conninfo = format!("host=elsewhere user=rep passfile={}", f.display());
        assert_eq!(ConnInfo::parse(&conninfo, &no_env()).unwrap().password.as_deref(), Some("fallback"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(ConnInfo::parse(&conninfo, &no_env()).unwrap().password, None, "a readable password file is ignored, as libpq does");
    }
}
