//! The cluster's certificate authority and node identities.
//!
//! Every node-to-node connection is QUIC with mutual TLS 1.3: both ends
//! present a certificate signed by the cluster CA and check the other's.
//! A node from another cluster, or a client without a certificate, fails
//! the handshake and never reaches Raft.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol of the cluster transport.
pub const ALPN: &[u8] = b"fabric-cluster/1";

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot create a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("invalid PEM in {what}: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("TLS configuration refused: {0}")]
    Config(String),
    #[error("cannot {action} {path}: {source}")]
    File {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The cluster CA: signs node certificates. The node that creates the
/// cluster makes it and hands it to every node it promotes to voter
/// ([`CaSlot`]), so that any voter can admit nodes when the first is gone.
#[derive(Clone)]
pub struct ClusterCa {
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("fingerprint", &fingerprint(&self.cert_pem))
            .finish_non_exhaustive()
    }
}

/// The CA's certificate and key, as sent to a new voter over the cluster
/// transport (mutual TLS; never over the API).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct CaBundle {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaBundle")
            .field("fingerprint", &fingerprint(&self.cert_pem))
            .finish_non_exhaustive()
    }
}

/// This node's copy of the cluster CA, if it holds one, and where it is
/// kept (`cluster/ca/`).
#[derive(Debug)]
pub struct CaSlot {
    dir: PathBuf,
    /// Fingerprint of the CA this node trusts (its `tls/ca.pem`): the only
    /// CA it will take.
    trusted: Option<String>,
    ca: Mutex<Option<ClusterCa>>,
}

impl CaSlot {
    /// The slot of a node that trusts `trusted_ca_pem`, with the CA in
    /// `dir` if it is there.
    pub fn load(dir: &Path, trusted_ca_pem: &str) -> CaSlot {
        let trusted = fingerprint(trusted_ca_pem);
        // A CA that is not the trusted one, or a key cut short by a crash
        // while it was being written, is no CA.
        let ca = ClusterCa::load(dir).ok().filter(|ca| {
            trusted.is_some()
                && fingerprint(&ca.cert_pem) == trusted
                && KeyPair::from_pem(&ca.key_pem).is_ok()
        });
        CaSlot {
            dir: dir.to_owned(),
            trusted,
            ca: Mutex::new(ca),
        }
    }

    /// The CA, if this node holds it.
    pub fn get(&self) -> Option<ClusterCa> {
        self.ca.lock().expect("CA lock poisoned").clone()
    }

    /// Stores `bundle` as this node's CA. Refuses a CA other than the one
    /// this node trusts, and a key that does not parse. Returns whether
    /// it was new here.
    pub fn install(&self, bundle: CaBundle) -> Result<bool, TlsError> {
        if fingerprint(&bundle.cert_pem).is_none() || fingerprint(&bundle.cert_pem) != self.trusted
        {
            return Err(TlsError::Config(
                "the offered CA is not the CA this node trusts".into(),
            ));
        }
        KeyPair::from_pem(&bundle.key_pem).map_err(|e| TlsError::Pem {
            what: "the offered CA key",
            reason: e.to_string(),
        })?;
        let mut slot = self.ca.lock().expect("CA lock poisoned");
        if slot.is_some() {
            return Ok(false);
        }
        let ca = ClusterCa {
            cert_pem: bundle.cert_pem,
            key_pem: bundle.key_pem,
        };
        std::fs::create_dir_all(&self.dir).map_err(|source| TlsError::File {
            action: "create",
            path: self.dir.clone(),
            source,
        })?;
        ca.save(&self.dir)?;
        *slot = Some(ca);
        Ok(true)
    }
}

/// A node's TLS identity: the CA certificate it trusts, and its own
/// certificate and key.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub ca_pem: String,
    pub cert_pem: String,
    key_pem: String,
}

impl ClusterCa {
    /// A new CA for a cluster.
    pub fn generate(cluster_name: &str) -> Result<ClusterCa, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{cluster_name} cluster CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate for node `name`, valid for that name and the
    /// given addresses, usable as both client and server.
    pub fn issue(&self, name: &str, addresses: &[IpAddr]) -> Result<NodeIdentity, TlsError> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, KeyPair::from_pem(&self.key_pem)?)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params
            .subject_alt_names
            .extend(addresses.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &issuer)?;
        Ok(NodeIdentity {
            ca_pem: self.cert_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a node's certificate signing request. The CSR must name the
    /// node (`expected_name`); the certificate works as client and server.
    pub fn sign_request(&self, csr_pem: &str, expected_name: &str) -> Result<String, TlsError> {
        let mut request = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let named = request
            .params
            .subject_alt_names
            .iter()
            .any(|san| matches!(san, SanType::DnsName(name) if name.as_str() == expected_name));
        if !named {
            return Err(TlsError::Config(format!(
                "the signing request does not name node {expected_name:?}"
            )));
        }
        request.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        request.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        request.params.is_ca = IsCa::ExplicitNoCa;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, KeyPair::from_pem(&self.key_pem)?)?;
        Ok(request.signed_by(&issuer)?.pem())
    }

    /// Reads a CA written by [`ClusterCa::save`].
    pub fn load(dir: &Path) -> Result<ClusterCa, TlsError> {
        Ok(ClusterCa {
            cert_pem: read_file(&dir.join("ca.pem"))?,
            key_pem: read_file(&dir.join("ca.key"))?,
        })
    }

    /// The certificate and key, to hand to another voter.
    pub fn bundle(&self) -> CaBundle {
        CaBundle {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }

    /// Writes `ca.key` then `ca.pem` (mode 0600) into `dir`: `load` finds
    /// the pair only once both are written.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        write_file(&dir.join("ca.key"), &self.key_pem)?;
        write_file(&dir.join("ca.pem"), &self.cert_pem)
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file_error = |action, source| TlsError::File {
        action,
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_error("create", e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| file_error("write", e))?;
    file.sync_all().map_err(|e| file_error("sync", e))
}

fn read_file(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::File {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A key pair and signing request made by a node that wants to join.
#[derive(Debug, Clone)]
pub struct PendingIdentity {
    pub csr_pem: String,
    pub key_pem: String,
}

impl PendingIdentity {
    /// A new key and a request for a certificate naming `name` and `ip`.
    pub fn generate(name: &str, ip: IpAddr) -> Result<PendingIdentity, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.subject_alt_names.push(SanType::IpAddress(ip));
        params.distinguished_name.push(DnType::CommonName, name);
        let csr = params.serialize_request(&key)?;
        Ok(PendingIdentity {
            csr_pem: csr.pem()?,
            key_pem: key.serialize_pem(),
        })
    }

    /// The identity once the CA has signed the request.
    pub fn complete(self, ca_pem: String, cert_pem: String) -> NodeIdentity {
        NodeIdentity {
            ca_pem,
            cert_pem,
            key_pem: self.key_pem,
        }
    }
}

/// The SHA-256 of a PEM certificate's DER bytes, lowercase hex; `None` if
/// the PEM does not hold a certificate.
pub fn fingerprint(cert_pem: &str) -> Option<String> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    Some(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

impl NodeIdentity {
    /// The key of this node's QUIC stateless resets, derived from its
    /// private key, so the same after a restart: a restarted node ends its
    /// peers' connections to its former self at once (their next packet
    /// draws a reset they recognise) instead of leaving them to time out.
    pub fn reset_key(&self) -> Arc<dyn quinn::crypto::HmacKey> {
        let seed = ring::digest::digest(
            &ring::digest::SHA256,
            &[b"fabric quic stateless reset\0", self.key_pem.as_bytes()].concat(),
        );
        Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, seed.as_ref()))
    }

    /// Writes `ca.pem`, `node.pem` and `node.key` (mode 0600) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(|source| TlsError::File {
            action: "create",
            path: dir.to_owned(),
            source,
        })?;
        write_file(&dir.join("ca.pem"), &self.ca_pem)?;
        write_file(&dir.join("node.pem"), &self.cert_pem)?;
        write_file(&dir.join("node.key"), &self.key_pem)
    }

    /// Reads an identity written by [`NodeIdentity::save`].
    pub fn load(dir: &Path) -> Result<NodeIdentity, TlsError> {
        Ok(NodeIdentity {
            ca_pem: read_file(&dir.join("ca.pem"))?,
            cert_pem: read_file(&dir.join("node.pem"))?,
            key_pem: read_file(&dir.join("node.key"))?,
        })
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        let ca =
            CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).map_err(|e| TlsError::Pem {
                what: "the CA certificate",
                reason: e.to_string(),
            })?;
        roots.add(ca).map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(roots)
    }

    fn chain_and_key(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|e| {
            TlsError::Pem {
                what: "the node certificate",
                reason: e.to_string(),
            }
        })?;
        let key =
            PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| TlsError::Pem {
                what: "the node key",
                reason: e.to_string(),
            })?;
        Ok((vec![cert], key))
    }

    /// Server side: requires a client certificate from the cluster CA.
    pub fn server_config(
        &self,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig, TlsError> {
        let config_error = |e: rustls::Error| TlsError::Config(e.to_string());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let (chain, key) = self.chain_and_key()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(config_error)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto =
            QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport);
        Ok(config)
    }

    /// Client side: presents this node's certificate, trusts only the CA.
    pub fn client_config(
        &self,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let config_error = |e: rustls::Error| TlsError::Config(e.to_string());
        let (chain, key) = self.chain_and_key()?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)
            .map_err(config_error)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport);
        Ok(config)
    }
}

/// The largest QUIC packet (UDP payload) the cluster sends or takes. Paths
/// with jumbo frames take it. Not the 8,952 bytes of a 9,000-byte packet:
/// quinn hands the kernel up to 10 packets in one segmentation-offload
/// call, the kernel refuses a call over 64 KiB, and quinn counts a refused
/// call as sent, so every packet in it was lost (a third of them, in a
/// flood of 1,500-byte frames between two nodes). 10 × 6,500 fits, with
/// IPv4's headers. (Ten is quinn 0.11.12's `MAX_TRANSMIT_SEGMENTS`: check
/// it when quinn is updated.)
pub(crate) const UDP_PAYLOAD_BYTES_MAX: u16 = 6_500;

/// Transport settings shared by all cluster connections.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    // A connection silent for 3 s is dead (keep-alives every 500 ms keep
    // a live one talking): a peer that restarted is reached on a new
    // connection within seconds, not after a long wait on the old one.
    transport.keep_alive_interval(Some(Duration::from_millis(500)));
    transport.max_idle_timeout(Some(
        Duration::from_secs(3)
            .try_into()
            .expect("3 s is a valid idle timeout"),
    ));
    transport.max_concurrent_bidi_streams(1024u32.into());
    // Packets up to UDP_PAYLOAD_BYTES_MAX where the path takes them
    // (discovery finds out; the default stops at 1452 bytes): a 4 KiB write
    // is then one packet, not three, each encrypted and sent on its own.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(UDP_PAYLOAD_BYTES_MAX);
    transport.mtu_discovery_config(Some(mtu));
    Arc::new(transport)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_slot_takes_only_the_trusted_ca_and_keeps_it() {
        let ours = ClusterCa::generate("ours").expect("ca");
        let theirs = ClusterCa::generate("theirs").expect("ca");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("ca");
        let slot = CaSlot::load(&ca_dir, &ours.cert_pem);
        assert!(slot.get().is_none());

        let error = slot.install(theirs.bundle()).expect_err("foreign CA");
        assert!(
            error.to_string().contains("not the CA this node trusts"),
            "{error}"
        );
        let mut broken = ours.bundle();
        broken.key_pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into();
        assert!(slot.install(broken).is_err());
        assert!(slot.get().is_none());

        assert!(slot.install(ours.bundle()).expect("install"));
        assert!(!slot.install(ours.bundle()).expect("again"));
        let reloaded = CaSlot::load(&ca_dir, &ours.cert_pem);
        let ca = reloaded.get().expect("kept on disk");
        assert_eq!(ca.cert_pem, ours.cert_pem);
        // It signs: a joining node's request is accepted.
        let pending =
            PendingIdentity::generate("n9", "127.0.0.1".parse().expect("ip")).expect("csr");
        ca.sign_request(&pending.csr_pem, "n9").expect("signs");
        // Debug output never shows the key.
        assert!(!format!("{ca:?}{:?}", ours.bundle()).contains("PRIVATE"));
    }
}
