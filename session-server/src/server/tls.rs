//! TLS on the gRPC port, reloaded from disk without a restart: the
//! certificate, key and client CA files are read again every
//! [`RELOAD_INTERVAL`], and when they change (cert-manager renewed the
//! Secret, the kubelet swapped the mounted files) the next handshake uses
//! the new pair. Connections already open keep the pair they shook hands
//! with until they close (MAX_CONNECTION_AGE bounds that).
//!
//! Polling, not file notifications: a Kubernetes Secret volume is updated by
//! swapping a symlink (`..data`), which inotify watches on the files
//! themselves miss, and reading three small files every few seconds costs
//! nothing. The handshakes run here, not in tonic (whose `ServerTlsConfig`
//! is fixed once built), each in its own task under the handshake timeout,
//! so a slow peer never holds up accepting the next one.

use std::{
    path::PathBuf,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::{Stream, StreamExt};

use crate::secret_file::{self, SecretFile};

/// How often the TLS files are read again to see whether they changed. The
/// kubelet refreshes a Secret volume about once a minute, so a few seconds
/// here adds little to how long a renewal takes to be served.
pub(crate) const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Reads of the files in a row that may find one changing before a reload
/// gives up until the next interval (a swap takes microseconds).
const READ_ATTEMPTS: usize = 4;

/// The TLS settings' files, read when the server starts and again every few
/// seconds (`RELOAD_INTERVAL`).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// TLS_CERT: the PEM certificate chain.
    pub cert: PathBuf,
    /// TLS_KEY: the PEM private key.
    pub key: PathBuf,
    /// TLS_CLIENT_CA: when set, callers must present a client certificate
    /// signed by one of its CAs (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The files' contents, read together as every secret file is
    /// ([`crate::secret_file`]), so a read that straddles the kubelet's swap
    /// (a new certificate with the old key) is read again rather than taken
    /// for a broken pair.
    fn read(&self) -> Result<Contents, String> {
        let mut files = vec![
            SecretFile {
                variable: "TLS_CERT",
                path: &self.cert,
            },
            SecretFile {
                variable: "TLS_KEY",
                path: &self.key,
            },
        ];
        if let Some(path) = &self.client_ca {
            files.push(SecretFile {
                variable: "TLS_CLIENT_CA",
                path,
            });
        }
        let mut reads = secret_file::read_settled(&files, READ_ATTEMPTS)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|read| read.bytes);
        let mut next = || reads.next().unwrap_or_default();
        Ok(Contents {
            cert: next(),
            key: next(),
            client_ca: self.client_ca.is_some().then(next),
        })
    }
}

/// What the TLS files held when read.
#[derive(Clone, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Contents {
    /// The server configuration these files make, and when the certificate
    /// expires (seconds since the Unix epoch).
    fn server_config(&self) -> Result<(ServerConfig, i64), String> {
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("TLS_CERT: {e}"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| "TLS_CERT holds no PEM certificate".to_string())?;
        let not_after = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| format!("TLS_CERT: {e}"))?
            .1
            .validity()
            .not_after
            .timestamp();
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| format!("TLS_KEY: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    let cert = cert.map_err(|e| format!("TLS_CLIENT_CA: {e}"))?;
                    roots.add(cert).map_err(|e| format!("TLS_CLIENT_CA: {e}"))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| format!("TLS_CLIENT_CA: {e}"))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        // Checks that the key is the certificate's.
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("TLS_CERT/TLS_KEY: {e}"))?;
        // gRPC is HTTP/2 only.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok((config, not_after))
    }
}

/// The TLS configuration in use, swapped whole when the files change.
#[derive(Clone)]
pub(crate) struct ReloadingTls {
    files: TlsFiles,
    current: Arc<RwLock<Arc<ServerConfig>>>,
    loaded: Arc<RwLock<Contents>>,
}

impl std::fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ReloadingTls {
    /// Reads the files once, before the server listens.
    ///
    /// # Errors
    ///
    /// A message naming the setting whose file cannot be read or used.
    pub(crate) fn load(files: TlsFiles) -> Result<Self, String> {
        let contents = files.read()?;
        let (config, not_after) = contents.server_config()?;
        record_expiry(not_after);
        Ok(Self {
            files,
            current: Arc::new(RwLock::new(Arc::new(config))),
            loaded: Arc::new(RwLock::new(contents)),
        })
    }

    /// The acceptor for the next handshake.
    fn acceptor(&self) -> TlsAcceptor {
        // A poisoned lock still holds a whole configuration (it is swapped
        // in one assignment), so it is used as it is.
        let config = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        TlsAcceptor::from(Arc::clone(&config))
    }

    /// Reads the files again every `interval`, forever, and swaps in a new
    /// configuration when they changed and make a good one. Files that
    /// cannot be read or used keep the configuration in use, count a reload
    /// failure and log a warning (once per new content, not every tick).
    pub(crate) async fn watch(self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut failing: Option<Result<Contents, String>> = None;
        loop {
            ticker.tick().await;
            let files = self.files.clone();
            let read = match tokio::task::spawn_blocking(move || files.read()).await {
                Ok(read) => read,
                Err(err) => Err(format!("reading the TLS files: {err}")),
            };
            if failing
                .as_ref()
                .is_some_and(|previous| previous_matches(previous, &read))
            {
                continue;
            }
            let contents = match &read {
                Ok(contents) => contents,
                Err(err) => {
                    self.reload_failed(err);
                    failing = Some(read);
                    continue;
                }
            };
            let unchanged = *self
                .loaded
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                == *contents;
            if unchanged {
                failing = None;
                continue;
            }
            match contents.server_config() {
                Ok((config, not_after)) => {
                    *self
                        .current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
                    *self
                        .loaded
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = contents.clone();
                    record_expiry(not_after);
                    metrics::counter!(crate::metrics::TLS_RELOADS).increment(1);
                    tracing::info!(not_after, "TLS certificate reloaded: new handshakes use it");
                    failing = None;
                }
                Err(err) => {
                    self.reload_failed(&err);
                    failing = Some(read);
                }
            }
        }
    }

    fn reload_failed(&self, err: &str) {
        metrics::counter!(crate::metrics::TLS_RELOAD_FAILURES).increment(1);
        tracing::warn!(
            error = %err,
            "TLS files changed but cannot be used: still serving the certificate loaded before"
        );
    }
}

/// Whether a read gives what the last failed one did (the same error, or the
/// same unusable contents), so it is not reported again.
fn previous_matches(previous: &Result<Contents, String>, now: &Result<Contents, String>) -> bool {
    match (previous, now) {
        (Ok(a), Ok(b)) => a == b,
        (Err(a), Err(b)) => a == b,
        _ => false,
    }
}

fn record_expiry(not_after: i64) {
    // Seconds since 1970 fit an f64 exactly for any real certificate.
    #[allow(clippy::cast_precision_loss)]
    metrics::gauge!(crate::metrics::TLS_CERT_EXPIRY).set(not_after as f64);
}

/// A connection whose MAX_CONNECTION_AGE grace is counted by the connection
/// itself (`Guarded` in `server.rs`).
pub(crate) trait AgeClock {
    /// Restarts the clock: called when the handshake is done and the
    /// connection is handed to tonic, which starts its own MAX_CONNECTION_AGE
    /// clock then.
    fn start_age_clock(&mut self);
}

/// The TLS connections made from `incoming`'s: each handshake runs in a task
/// of its own, dropped if not done within `handshake_timeout`, with the
/// configuration current when it starts. Accepting stops (and the listener
/// closes) when the returned stream is dropped, as tonic does at shutdown.
/// Accept errors are passed on to tonic as they come: `incoming` pauses
/// itself when accepts fail for want of file descriptors or memory, so this
/// loop never spins on them.
pub(crate) fn accept<S, IO>(
    mut incoming: S,
    tls: ReloadingTls,
    handshake_timeout: Duration,
) -> Handshaken<IO>
where
    S: Stream<Item = std::io::Result<IO>> + Unpin + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + AgeClock + Unpin + Send + 'static,
{
    // Room for handshakes finishing while tonic is busy; a full channel
    // makes a finished handshake wait, not fail.
    let (done, connections) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                () = done.closed() => return,
                next = incoming.next() => next,
            };
            let Some(accepted) = next else { return };
            let done = done.clone();
            match accepted {
                // An accept error goes to tonic, which decides as before.
                Err(err) => {
                    if done.send(Err(err)).await.is_err() {
                        return;
                    }
                }
                Ok(io) => {
                    let acceptor = tls.acceptor();
                    tokio::spawn(async move {
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(io)).await {
                            Ok(Ok(stream)) => {
                                let _ = done.send(Ok(stream)).await;
                            }
                            Ok(Err(err)) => {
                                tracing::debug!(error = %err, "TLS handshake failed");
                            }
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    Handshaken { connections }
}

/// The stream made by [`accept`].
#[derive(Debug)]
pub(crate) struct Handshaken<IO> {
    connections: mpsc::Receiver<std::io::Result<TlsStream<IO>>>,
}

impl<IO: AgeClock> Stream for Handshaken<IO> {
    type Item = std::io::Result<TlsStream<IO>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut next = std::task::ready!(self.get_mut().connections.poll_recv(cx));
        // tonic serves the connection from now on, and its MAX_CONNECTION_AGE
        // starts now: so does the grace (not at the TCP accept, which a slow
        // handshake would leave far behind).
        if let Some(Ok(stream)) = next.as_mut() {
            stream.get_mut().0.start_age_clock();
        }
        Poll::Ready(next)
    }
}
