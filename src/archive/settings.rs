//! Where the archive is and how to reach it: `s3://BUCKET/PREFIX` plus endpoint, region and credentials.
use std::fmt;
use std::net::IpAddr;

use super::ArchiveError;

/// A secret (secret access key, session token): its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    /// The secret itself, for the one place that signs requests with it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `s3://BUCKET/PREFIX`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveUrl {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
}

impl ArchiveUrl {
    pub fn parse(url: &str) -> Result<ArchiveUrl, ArchiveError> {
        let bad = |why: &str| ArchiveError::BadUrl { url: url.to_string(), why: why.to_string() };
        let rest = url.strip_prefix("s3://").ok_or_else(|| bad("must start with s3://, e.g. s3://my-bucket/walship"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // S3's bucket naming rules (3..=63 characters, lower case, digits, '.', '-').
        let ok_chars = bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if bucket.len() < 3 || bucket.len() > 63 || !ok_chars {
            return Err(bad("the bucket name must be 3 to 63 characters of a-z, 0-9, '.' and '-'"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|part| part == "." || part == "..") || prefix.contains("//") {
            return Err(bad("the prefix must not contain empty, '.' or '..' parts"));
        }
        Ok(ArchiveUrl { bucket: bucket.to_string(), prefix: prefix.to_string() })
    }
}

impl fmt::Display for ArchiveUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// Everything needed to reach the store. Build it from flags ([`ArchiveSettings::new`]) or from the
/// standard AWS variables ([`ArchiveSettings::from_env`]); then [`ArchiveSettings::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSettings {
    pub url: ArchiveUrl,
    /// `AWS_ENDPOINT_URL`: a custom endpoint (SeaweedFS, MinIO, ...); None = AWS itself.
    pub endpoint: Option<String>,
    /// `AWS_REGION` (default `us-east-1`).
    pub region: String,
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<Secret>,
    /// `AWS_SESSION_TOKEN`.
    pub session_token: Option<Secret>,
    /// `AWS_ALLOW_HTTP=true`: plain http to a non-loopback endpoint.
    pub allow_http: bool,
}

/// The region when none is given.
pub const DEFAULT_REGION: &str = "us-east-1";

fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

impl ArchiveSettings {
    pub fn new(url: &str) -> Result<ArchiveSettings, ArchiveError> {
        Ok(ArchiveSettings {
            url: ArchiveUrl::parse(url)?,
            endpoint: None,
            region: DEFAULT_REGION.to_string(),
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            allow_http: false,
        })
    }

    /// `url` plus `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN` and `AWS_ALLOW_HTTP` from this process's environment; validated.
    pub fn from_env(url: &str) -> Result<ArchiveSettings, ArchiveError> {
        let var = |k: &str| non_empty(std::env::var(k).ok());
        let mut s = ArchiveSettings::new(url)?;
        s.endpoint = var("AWS_ENDPOINT_URL");
        s.region = var("AWS_REGION").unwrap_or_else(|| DEFAULT_REGION.to_string());
        s.access_key_id = var("AWS_ACCESS_KEY_ID");
        s.secret_access_key = var("AWS_SECRET_ACCESS_KEY").map(Secret);
        s.session_token = var("AWS_SESSION_TOKEN").map(Secret);
        s.allow_http = var("AWS_ALLOW_HTTP").is_some_and(|v| parse_bool(&v));
        s.validate()?;
        Ok(s)
    }

    /// Checks that need no network: endpoint scheme and host, plain http only when allowed,
    /// credentials complete.
    pub fn validate(&self) -> Result<(), ArchiveError> {
        if let Some(endpoint) = &self.endpoint {
            let bad = |why: String| ArchiveError::BadEndpoint { endpoint: endpoint.clone(), why };
            let (scheme, rest) = endpoint.split_once("://").ok_or_else(|| bad("must be http://HOST[:PORT] or https://HOST[:PORT]".into()))?;
            let host = host_of(rest);
            if host.is_empty() {
                return Err(bad("has no host".into()));
            }
            match scheme {
                "https" => {}
                "http" if self.allow_http || is_loopback_host(host) => {}
                "http" => {
                    return Err(bad(format!(
                        "plain http to {host}, which is not a loopback address: credentials and WAL would cross the network \
                         unencrypted; use https, or set AWS_ALLOW_HTTP=true (--archive-allow-http) on a trusted network"
                    )))
                }
                other => return Err(bad(format!("unknown scheme {other:?}; use https:// (or http:// for a loopback endpoint)"))),
            }
        }
        if self.region.is_empty() {
            return Err(ArchiveError::Credentials("the region (AWS_REGION / --archive-region) is empty".into()));
        }
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(_), None) => Err(ArchiveError::Credentials(
                "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not (--archive-secret-access-key)".into(),
            )),
            (None, Some(_)) => Err(ArchiveError::Credentials(
                "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not (--archive-access-key-id)".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Whether requests go to a custom endpoint with path-style addressing (`ENDPOINT/BUCKET/KEY`).
    pub fn path_style(&self) -> bool {
        self.endpoint.is_some()
    }
}

/// `true`, `1`, `yes`, `on` (any case).
pub fn parse_bool(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes" | "on")
}

/// The host part of `HOST[:PORT][/...]` (IPv6 in brackets).
fn host_of(rest: &str) -> &str {
    let authority = rest.split('/').next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or("");
    }
    authority.split(':').next().unwrap_or("")
}

/// `localhost`, 127.0.0.0/8 or ::1.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = ArchiveUrl::parse("s3://wal-archive/prod/db1/").unwrap();
        assert_eq!(u, ArchiveUrl { bucket: "wal-archive".into(), prefix: "prod/db1".into() });
        assert_eq!(u.to_string(), "s3://wal-archive/prod/db1");
        assert_eq!(ArchiveUrl::parse("s3://bkt").unwrap().prefix, "");
        for bad in ["http://b/x", "s3://", "s3://ab", "s3://Upper/x", "s3://b_c/x", "s3://bkt/a//b", "s3://bkt/../x"] {
            assert!(ArchiveUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn http_only_to_loopback_unless_allowed() {
        let mut s = ArchiveSettings::new("s3://bkt/p").unwrap();
        for ok in ["http://127.0.0.1:8333", "http://localhost:9000", "http://[::1]:9000/", "https://s3.example.com"] {
            s.endpoint = Some(ok.into());
            assert!(s.validate().is_ok(), "{ok} refused");
        }
        s.endpoint = Some("http://10.1.2.3:8333".into());
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("AWS_ALLOW_HTTP"), "{e}");
        s.allow_http = true;
        assert!(s.validate().is_ok());
        s.endpoint = Some("ftp://x".into());
        assert!(s.validate().is_err());
        s.endpoint = Some("http://:80".into());
        assert!(s.validate().is_err());
    }

    #[test]
    fn credentials_complete_and_secrets_redacted() {
        let mut s = ArchiveSettings::new("s3://bkt/p").unwrap();
        s.access_key_id = Some("AKIDEXAMPLE".into());
        assert!(s.validate().is_err());
        s.secret_access_key = Some(Secret::new("wJalrXUtnFEMI-very-secret"));
        s.session_token = Some(Secret::new("token-very-secret"));
        assert!(s.validate().is_ok());
        let shown = format!("{s:?} {}", s.secret_access_key.as_ref().unwrap());
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(shown.contains("AKIDEXAMPLE"));
    }
}
