//! TLS material: a CA generated on first start and kept in the data directory, and a
//! serving certificate issued by it at every start for the names and addresses the server
//! answers on.
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing the files failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Generating or parsing a key or certificate failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
}

/// The CA and the serving certificate, PEM-encoded.
pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

const CA_NAME: &str = "capstan-ca";

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    Ok(p)
}

fn write_private(path: &Path, text: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)
}

fn read(path: &Path) -> Result<Option<String>, PkiError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PkiError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl Pki {
    /// Loads (or creates) the CA under `dir` and issues a serving certificate for
    /// `names` and `addresses`.
    pub fn load_or_create(
        dir: &Path,
        names: &[String],
        addresses: &[IpAddr],
    ) -> Result<Pki, PkiError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| PkiError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
        let params = ca_params()?;
        let (ca_pem, key) = match (read(&ca_crt)?, read(&ca_key)?) {
            (Some(cert), Some(key)) => (cert, KeyPair::from_pem(&key)?),
            _ => {
                let key = KeyPair::generate()?;
                let cert = params.self_signed(&key)?;
                write_private(&ca_key, &key.serialize_pem())?;
                write_private(&ca_crt, &cert.pem())?;
                (cert.pem(), key)
            }
        };
        let issuer = Issuer::new(params, key);
        let mut sp = CertificateParams::new(names.to_vec())?;
        for a in addresses {
            sp.subject_alt_names.push(SanType::IpAddress(*a));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "kube-apiserver");
        sp.distinguished_name = dn;
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        sp.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        sp.not_before = rcgen::date_time_ymd(2024, 1, 1);
        sp.not_after = rcgen::date_time_ymd(2035, 1, 1);
        let skey = KeyPair::generate()?;
        let cert = sp.signed_by(&skey, &issuer)?;
        let server_key_pem = skey.serialize_pem();
        write_private(&dir.join("server.key"), &server_key_pem)?;
        write_private(&dir.join("server.crt"), &cert.pem())?;
        Ok(Pki {
            ca_pem,
            server_cert_pem: cert.pem(),
            server_key_pem,
        })
    }

    /// A rustls server configuration serving the certificate (HTTP/2 and HTTP/1.1).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.server_cert_pem.as_bytes())
                .chain(CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes())
            .map_err(|e| e.to_string())?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| e.to_string())?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_kept_and_files_are_private() {
        let dir = std::env::temp_dir().join(format!("capstan-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Pki::load_or_create(&dir, &["localhost".into()], &["127.0.0.1".parse().unwrap()])
            .unwrap();
        let b = Pki::load_or_create(&dir, &["localhost".into()], &[]).unwrap();
        assert_eq!(a.ca_pem, b.ca_pem, "the CA survives a restart");
        assert_ne!(a.server_key_pem, b.server_key_pem);
        assert!(a.server_config().is_ok());
        use std::os::unix::fs::PermissionsExt;
        for f in ["ca.key", "server.key"] {
            let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
