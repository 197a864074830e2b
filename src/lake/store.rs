//! The sink: where the lake lives (`file://`, `s3://`, `memory://`) as an `ObjectStore`.
//!
//! Every table of one source database lives under one URL prefix. slotlake builds the object
//! store itself (AWS credential chain from the environment, S3-compatible endpoints, retries)
//! and hands Delta its own log store over it: commits are conditional puts
//! (`PutMode::Create`, `If-None-Match: *` on S3), so two writers can never both win a version.

use std::sync::Arc;
use std::time::Duration;

use deltalake::logstore::{default_logstore, LogStoreRef, StorageConfig};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, RetryConfig};
use url::Url;

/// How many times object_store retries a transient error (5xx, timeouts, connection resets)
/// within one request before the error reaches slotlake's own retry loop.
const STORE_RETRIES: usize = 4;
const STORE_RETRY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("invalid --sink URL {0:?}: expected file:///path, s3://bucket/prefix or memory://")]
    InvalidUrl(String),
    #[error("unsupported --sink scheme {0:?}: use file://, s3:// or memory://")]
    UnsupportedScheme(String),
    #[error("cannot set up the object store for {url}")]
    Store {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot create the sink directory {path}")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// S3 settings beyond the credential chain.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// An S3-compatible endpoint (MinIO, moto, ...); `None` for AWS.
    pub endpoint: Option<String>,
    /// Allow plain HTTP to the endpoint.
    pub allow_http: bool,
    /// Region; otherwise `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
}

/// The lake root: an object store and the prefix under which every table lives.
#[derive(Clone)]
pub struct Sink {
    root: Arc<dyn ObjectStore>,
    /// Prefix of the lake inside `root`.
    base: Path,
    /// URL of `root`'s top (`file:///`, `s3://bucket/`, `memory:///`).
    root_url: Url,
    display: String,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

impl Sink {
    /// Opens `url`. Credentials for S3 come from the standard AWS chain (environment, web
    /// identity / IRSA, ECS and EC2 instance metadata).
    pub fn open(url: &str, s3: &S3Options) -> Result<Sink, SinkError> {
        let parsed = Url::parse(url).map_err(|_| SinkError::InvalidUrl(url.to_string()))?;
        let retry = RetryConfig {
            max_retries: STORE_RETRIES,
            retry_timeout: STORE_RETRY_TIMEOUT,
            ..Default::default()
        };
        match parsed.scheme() {
            "file" => {
                let path = parsed
                    .to_file_path()
                    .map_err(|_| SinkError::InvalidUrl(url.to_string()))?;
                std::fs::create_dir_all(&path).map_err(|source| SinkError::CreateDir {
                    path: path.display().to_string(),
                    source,
                })?;
                let base = Path::from_absolute_path(&path).map_err(|e| SinkError::Store {
                    url: url.to_string(),
                    source: e.into(),
                })?;
                Ok(Sink {
                    root: Arc::new(LocalFileSystem::new()),
                    base,
                    root_url: Url::parse("file:///")
                        .map_err(|_| SinkError::InvalidUrl(url.to_string()))?,
                    display: url.to_string(),
                })
            }
            "s3" | "s3a" => {
                let bucket = parsed
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| SinkError::InvalidUrl(url.to_string()))?;
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry);
                if let Some(ep) = &s3.endpoint {
                    b = b.with_endpoint(ep).with_virtual_hosted_style_request(false);
                }
                if s3.allow_http {
                    b = b.with_allow_http(true);
                }
                let region = s3
                    .region
                    .clone()
                    .or_else(|| std::env::var("AWS_REGION").ok())
                    .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
                    .unwrap_or_else(|| "us-east-1".into());
                b = b.with_region(region);
                let store = b.build().map_err(|source| SinkError::Store {
                    url: url.to_string(),
                    source,
                })?;
                let root_url = Url::parse(&format!("s3://{bucket}/"))
                    .map_err(|_| SinkError::InvalidUrl(url.to_string()))?;
                Ok(Sink {
                    root: Arc::new(store),
                    base: Path::from(parsed.path().trim_matches('/')),
                    root_url,
                    display: url.to_string(),
                })
            }
            "memory" => Ok(Sink {
                root: Arc::new(InMemory::new()),
                base: Path::from(
                    format!("{}{}", parsed.host_str().unwrap_or(""), parsed.path())
                        .trim_matches('/'),
                ),
                root_url: Url::parse("memory:///")
                    .map_err(|_| SinkError::InvalidUrl(url.to_string()))?,
                display: url.to_string(),
            }),
            other => Err(SinkError::UnsupportedScheme(other.to_string())),
        }
    }

    /// A sink over an existing store (tests: fault-injecting wrappers).
    pub fn from_store(root: Arc<dyn ObjectStore>, base: &str, root_url: Url) -> Sink {
        Sink {
            root,
            base: Path::from(base),
            display: format!("{root_url}{base}"),
            root_url,
        }
    }

    pub fn root(&self) -> &Arc<dyn ObjectStore> {
        &self.root
    }

    /// The path of a table: the lake prefix followed by `parts` (each part one path segment,
    /// percent-encoded by `object_store` where needed).
    pub fn table_path(&self, parts: &[&str]) -> Path {
        let mut p = self.base.clone();
        for part in parts {
            p = p.join(*part);
        }
        p
    }

    /// The Delta log store and the object store rooted at the table at `path`.
    pub fn table_store(&self, path: &Path) -> (LogStoreRef, Arc<dyn ObjectStore>, Url) {
        let prefixed: Arc<dyn ObjectStore> =
            Arc::new(PrefixStore::new(self.root.clone(), path.clone()));
        let mut location = self.root_url.clone();
        // Url::join would re-encode; build it from the already-encoded object_store path.
        location.set_path(&format!("/{}/", path.as_ref()));
        let log_store = default_logstore(
            prefixed.clone(),
            self.root.clone(),
            &location,
            &StorageConfig::default(),
        );
        (log_store, prefixed, location)
    }
}

impl std::fmt::Display for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// True when the Delta table at `table` (a path inside `store`) has a `_delta_log` entry; a
/// missing table is an ordinary answer, not an error.
pub async fn has_delta_log(
    store: &dyn ObjectStore,
    table: &Path,
) -> Result<bool, object_store::Error> {
    use futures::StreamExt;
    match store
        .list(Some(&table.clone().join("_delta_log")))
        .next()
        .await
    {
        None | Some(Err(object_store::Error::NotFound { .. })) => Ok(false),
        Some(Ok(_)) => Ok(true),
        Some(Err(e)) => Err(e),
    }
}
