//! The object store: `object_store`'s S3 client, create-only uploads that carry a SHA-256 of the
//! content, and reads that verify it. [`Store`] is async (the archiver's runtime drives it);
//! [`BlockingStore`] wraps it with a runtime of its own for callers outside any runtime.
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{
    Attribute, AttributeValue, Attributes, BackoffConfig, ClientOptions, GetOptions, ObjectStore, PutMode, PutOptions,
    PutPayload, RetryConfig,
};
use sha2::{Digest, Sha256};

use super::compress::{Compression, COMPRESSION_META, OBJECT_BYTES_MAX};
use super::settings::ArchiveSettings;
use super::ArchiveError;

/// The object metadata key (`x-amz-meta-walship-sha256`) holding the hex SHA-256 of the content.
pub const CHECKSUM_META: &str = "walship-sha256";

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// What an upload found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was created by this call.
    Uploaded,
    /// The key already held exactly these bytes (same checksum): nothing to do.
    AlreadyThere,
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key, relative to the bucket.
    pub key: String,
    pub size: u64,
    /// The store's entity tag: changes whenever the object is written again.
    pub e_tag: Option<String>,
    /// When the object was written (by the store's clock).
    pub last_modified: std::time::SystemTime,
}

/// One bucket of an S3-compatible store (cheap to clone).
#[derive(Clone)]
pub struct Store {
    s3: Arc<AmazonS3>,
    settings: Arc<ArchiveSettings>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// Tries of one create-only PUT whose request failed (HEAD first each time; see put_create_body).
const PUT_CREATE_TRIES: u32 = 3;

fn store_err<'a>(op: &'static str, key: &'a str) -> impl FnOnce(object_store::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Store { op, key: key.to_string(), source: Box::new(source) }
}

impl Store {
    /// A client for `settings` (validated here too). Makes no request.
    pub fn new(settings: &ArchiveSettings) -> Result<Store, ArchiveError> {
        settings.validate()?;
        // object_store retries a failed request itself (connection refused or reset, 5xx, 429) for
        // up to 20 s (at most 30 tries; jittered backoff from 0.1 s growing to 2 s): a restarted
        // SeaweedFS answers 500 for a few seconds before its volumes are back. So a store restarting under `verify`, `prune`, `restore` or the archiver is ridden
        // through rather than failed; the archiver then retries a failed upload with a backoff of its
        // own, forever, so a store that is down for longer is waited for without any request hanging
        // for minutes. (A retried conditional PUT whose first attempt landed gets 412; the archiver
        // then compares checksums and counts the same bytes as done.)
        let retry = RetryConfig {
            backoff: BackoffConfig { init_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(2), base: 2.0 },
            max_retries: 30,
            retry_timeout: Duration::from_secs(20),
        };
        let client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(120))
            .with_allow_http(settings.endpoint.as_deref().is_some_and(|e| e.starts_with("http://")));
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&settings.url.bucket)
            .with_region(&settings.region)
            .with_virtual_hosted_style_request(false)
            .with_retry(retry)
            .with_client_options(client);
        if let Some(endpoint) = &settings.endpoint {
            // Custom endpoints are addressed path-style: ENDPOINT/BUCKET/KEY.
            b = b.with_endpoint(endpoint.trim_end_matches('/'));
        }
        if let (Some(id), Some(secret)) = (&settings.access_key_id, &settings.secret_access_key) {
            b = b.with_access_key_id(id).with_secret_access_key(secret.expose());
        }
        if let Some(token) = &settings.session_token {
            b = b.with_token(token.expose());
        }
        let s3 = b.build().map_err(|e| ArchiveError::Client(e.to_string()))?;
        Ok(Store { s3: Arc::new(s3), settings: Arc::new(settings.clone()) })
    }

    pub fn settings(&self) -> &ArchiveSettings {
        &self.settings
    }

    /// `s3://BUCKET/KEY`, for messages.
    pub fn describe(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.settings.url.bucket)
    }

    /// The checksum recorded with `key`, `None` if there is no such object.
    pub async fn head_checksum(&self, key: &str) -> Result<Option<String>, ArchiveError> {
        let opts = GetOptions { head: true, ..Default::default() };
        match self.s3.get_opts(&ObjPath::from(key), opts).await {
            Ok(r) => checksum_of(&r.attributes, &self.describe(key)).map(Some),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err("HEAD", key)(e)),
        }
    }

    /// Create `key` holding `data` unless it exists (`If-None-Match: *`). An existing object with the
    /// same checksum counts as done; one with another checksum is [`ArchiveError::Conflict`]. The
    /// store is asked first, so a store that ignored `If-None-Match` still never overwrites an
    /// object this way (but two writers racing there could: S3, SeaweedFS and moto honour it).
    pub async fn put_create(&self, key: &str, data: bytes::Bytes, local: &str) -> Result<PutOutcome, ArchiveError> {
        let ours = sha256_hex(&data);
        self.put_create_body(key, data, &ours, Compression::None, local).await
    }

    /// [`Store::put_create`] of an already compressed `body`; `sha256_raw` is the checksum of the
    /// uncompressed file, which is what the metadata carries and what is compared.
    pub async fn put_create_body(
        &self,
        key: &str,
        body: bytes::Bytes,
        sha256_raw: &str,
        compression: Compression,
        local: &str,
    ) -> Result<PutOutcome, ArchiveError> {
        // object_store does not retry a create-only PUT whose connection broke mid-request (it may
        // have landed: not idempotent in general). Here it is safe to: the next try HEADs first and
        // compares checksums, so the same bytes count as done and other bytes as a conflict. Only a
        // try that failed quickly is repeated (a connection reset, a store killed mid-request); one
        // that used up the request's own retries (a store down for 20 s) is reported at once.
        let mut tries = 0;
        loop {
            tries += 1;
            let t0 = std::time::Instant::now();
            match self.put_create_once(key, body.clone(), sha256_raw, compression, local).await {
                // An earlier try of ours broke after the store took the bytes: they are ours.
                Ok(PutOutcome::AlreadyThere) if tries > 1 => return Ok(PutOutcome::Uploaded),
                Err(ArchiveError::Store { .. }) if tries < PUT_CREATE_TRIES && t0.elapsed() < Duration::from_secs(2) => {
                    tokio::time::sleep(Duration::from_millis(250 << tries)).await;
                }
                other => return other,
            }
        }
    }

    async fn put_create_once(
        &self,
        key: &str,
        body: bytes::Bytes,
        sha256_raw: &str,
        compression: Compression,
        local: &str,
    ) -> Result<PutOutcome, ArchiveError> {
        let ours = sha256_raw.to_string();
        if let Some(theirs) = self.head_checksum(key).await? {
            return self.same_or_conflict(key, local, ours, theirs);
        }
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::Metadata(CHECKSUM_META.into()), AttributeValue::from(ours.clone()));
        attributes.insert(Attribute::Metadata(COMPRESSION_META.into()), AttributeValue::from(compression.as_str()));
        attributes.insert(Attribute::ContentType, AttributeValue::from("application/octet-stream"));
        let opts = PutOptions { mode: PutMode::Create, attributes, ..Default::default() };
        match self.s3.put_opts(&ObjPath::from(key), PutPayload::from(body), opts).await {
            Ok(_) => Ok(PutOutcome::Uploaded),
            Err(object_store::Error::AlreadyExists { .. }) => match self.head_checksum(key).await? {
                Some(theirs) => self.same_or_conflict(key, local, ours, theirs),
                None => Err(ArchiveError::Vanished { object: self.describe(key) }),
            },
            Err(e) => Err(store_err("PUT", key)(e)),
        }
    }

    /// Write `key` whatever is there (the `.partial` objects only, which are replaced as the
    /// segment grows); the metadata carries the SHA-256 of `body` like every object's.
    pub async fn put_replace(&self, key: &str, body: bytes::Bytes) -> Result<(), ArchiveError> {
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::Metadata(CHECKSUM_META.into()), AttributeValue::from(sha256_hex(&body)));
        attributes.insert(Attribute::Metadata(COMPRESSION_META.into()), AttributeValue::from(Compression::None.as_str()));
        attributes.insert(Attribute::ContentType, AttributeValue::from("application/octet-stream"));
        let opts = PutOptions { mode: PutMode::Overwrite, attributes, ..Default::default() };
        self.s3.put_opts(&ObjPath::from(key), PutPayload::from(body), opts).await.map(|_| ()).map_err(store_err("PUT", key))
    }

    fn same_or_conflict(&self, key: &str, local: &str, ours: String, theirs: String) -> Result<PutOutcome, ArchiveError> {
        if ours == theirs {
            Ok(PutOutcome::AlreadyThere)
        } else {
            Err(ArchiveError::Conflict { object: self.describe(key), local: local.to_string(), ours, theirs })
        }
    }

    /// The content of `key`, verified against its recorded checksum. `None` if there is no such object.
    pub async fn get_verified(&self, key: &str) -> Result<Option<bytes::Bytes>, ArchiveError> {
        let r = match self.s3.get(&ObjPath::from(key)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(store_err("GET", key)(e)),
        };
        let object = self.describe(key);
        let expected = checksum_of(&r.attributes, &object)?;
        let compression = compression_of(&r.attributes, &object)?;
        let body = r.bytes().await.map_err(store_err("GET", key))?;
        let data = match compression {
            Compression::None => body,
            c => {
                let why = |e: std::io::Error| ArchiveError::Undecodable {
                    object: object.clone(),
                    compression: c.to_string(),
                    why: e.to_string(),
                    expected: expected.clone(),
                };
                // Inline: at most one segment's CPU; callers run on runtimes of their own, never the receiver's loop.
                let raw = c.decompress(&body, OBJECT_BYTES_MAX).map_err(why)?;
                bytes::Bytes::from(raw)
            }
        };
        let actual = sha256_hex(&data);
        if actual != expected {
            return Err(ArchiveError::Corrupt { object, expected, actual });
        }
        Ok(Some(data))
    }

    /// Every object directly under `folder` (a key prefix ending in `/`).
    pub async fn list(&self, folder: &str) -> Result<Vec<ObjectInfo>, ArchiveError> {
        let p = ObjPath::from(folder.trim_end_matches('/'));
        let r = self.s3.list_with_delimiter(Some(&p)).await.map_err(store_err("LIST", folder))?;
        Ok(r.objects.into_iter().map(|o| ObjectInfo { key: o.location.to_string(), size: o.size, e_tag: o.e_tag, last_modified: o.last_modified.into() }).collect())
    }

    /// Delete `key` (`walship prune`); deleting a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        match self.s3.delete(&ObjPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err("DELETE", key)(e)),
        }
    }

    /// The sub-folders directly under `folder` (each ending in `/`).
    pub async fn list_folders(&self, folder: &str) -> Result<Vec<String>, ArchiveError> {
        let trimmed = folder.trim_end_matches('/');
        let p = if trimmed.is_empty() { None } else { Some(ObjPath::from(trimmed)) };
        let r = self.s3.list_with_delimiter(p.as_ref()).await.map_err(store_err("LIST", folder))?;
        Ok(r.common_prefixes.into_iter().map(|p| format!("{p}/")).collect())
    }
}

fn checksum_of(attributes: &Attributes, object: &str) -> Result<String, ArchiveError> {
    attributes
        .get(&Attribute::Metadata(CHECKSUM_META.into()))
        .map(|v| v.as_ref().to_string())
        .ok_or_else(|| ArchiveError::NoChecksum { object: object.to_string() })
}

/// The `walship-compression` metadata; absent = none (objects written before compression existed).
fn compression_of(attributes: &Attributes, object: &str) -> Result<Compression, ArchiveError> {
    match attributes.get(&Attribute::Metadata(COMPRESSION_META.into())) {
        None => Ok(Compression::None),
        Some(v) => Compression::parse(v.as_ref()).ok_or_else(|| ArchiveError::UnknownCompression { object: object.to_string(), value: v.as_ref().to_string() }),
    }
}

/// [`Store`] with a current-thread runtime of its own: for callers on plain threads (tests, tools).
pub struct BlockingStore {
    store: Store,
    rt: tokio::runtime::Runtime,
}

impl BlockingStore {
    pub fn new(settings: &ArchiveSettings) -> Result<BlockingStore, ArchiveError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ArchiveError::Runtime)?;
        Ok(BlockingStore { store: Store::new(settings)?, rt })
    }
    pub fn store(&self) -> &Store {
        &self.store
    }
    pub fn head_checksum(&self, key: &str) -> Result<Option<String>, ArchiveError> {
        self.rt.block_on(self.store.head_checksum(key))
    }
    pub fn put_create(&self, key: &str, data: Vec<u8>, local: &str) -> Result<PutOutcome, ArchiveError> {
        self.rt.block_on(self.store.put_create(key, data.into(), local))
    }
    pub fn put_create_compressed(&self, key: &str, data: &[u8], compression: Compression, local: &str) -> Result<PutOutcome, ArchiveError> {
        let body = compression.compress(data).map_err(|source| ArchiveError::Local { path: local.into(), source })?;
        self.rt.block_on(self.store.put_create_body(key, body.into(), &sha256_hex(data), compression, local))
    }
    pub fn get_verified(&self, key: &str) -> Result<Option<bytes::Bytes>, ArchiveError> {
        self.rt.block_on(self.store.get_verified(key))
    }
    pub fn list(&self, folder: &str) -> Result<Vec<ObjectInfo>, ArchiveError> {
        self.rt.block_on(self.store.list(folder))
    }
    pub fn list_folders(&self, folder: &str) -> Result<Vec<String>, ArchiveError> {
        self.rt.block_on(self.store.list_folders(folder))
    }
    pub fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        self.rt.block_on(self.store.delete(key))
    }
}
