//! The QUIC listener's TLS certificate: the configured one, or a self-signed development
//! certificate kept in the data dir (made on first start, reused afterwards), whose
//! SHA-256 fingerprint is logged so a client can pin it (`parley connect --quic --pin`).
//!
//! BoringSSL (the `boring` crate quiche itself links) makes the key and certificate, so
//! TLS needs no second library.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use boring::asn1::Asn1Time;
use boring::bn::BigNum;
use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::PKey;
use boring::x509::extension::SubjectAlternativeName;
use boring::x509::{X509NameBuilder, X509};

/// Files of the development certificate, under the data dir.
pub const DEV_CERT_FILE: &str = "quic-dev-cert.pem";
pub const DEV_KEY_FILE: &str = "quic-dev-key.pem";
/// Lifetime of a generated development certificate.
const DEV_CERT_DAYS: u32 = 825;

/// Why the certificate could not be used or made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(
        "quic_cert and quic_key must be set together (got quic_cert={cert:?}, quic_key={key:?})"
    )]
    HalfConfigured { cert: PathBuf, key: PathBuf },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("making the development certificate: {0}")]
    Generate(#[from] boring::error::ErrorStack),
}

/// The certificate and key the QUIC listener serves, and how they were obtained.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// SHA-256 of the leaf certificate (DER), as colon-separated hex.
    pub fingerprint: String,
    pub generated: bool,
}

/// The configured pair, or the development pair in `data_dir` (created when absent).
/// Empty paths mean "not configured".
pub fn load_or_create(data_dir: &Path, cert: &Path, key: &Path) -> Result<TlsFiles, CertError> {
    let configured = (!cert.as_os_str().is_empty(), !key.as_os_str().is_empty());
    let (cert, key, generated) = match configured {
        (true, true) => (cert.to_path_buf(), key.to_path_buf(), false),
        (false, false) => {
            let (cert, key) = (data_dir.join(DEV_CERT_FILE), data_dir.join(DEV_KEY_FILE));
            let generated = !cert.exists() || !key.exists();
            if generated {
                create_dev_pair(&cert, &key)?;
            }
            (cert, key, generated)
        }
        _ => {
            return Err(CertError::HalfConfigured {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            })
        }
    };
    let pem = std::fs::read(&cert).map_err(|error| CertError::File {
        path: cert.clone(),
        reason: error.to_string(),
    })?;
    let leaf = X509::from_pem(&pem).map_err(|error| CertError::File {
        path: cert.clone(),
        reason: format!("not a PEM certificate: {error}"),
    })?;
    Ok(TlsFiles {
        fingerprint: fingerprint(&leaf.to_der()?),
        cert,
        key,
        generated,
    })
}

/// SHA-256 of a DER certificate as `AB:CD:...`, the form browsers and openssl print.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = boring::hash::hash(MessageDigest::sha256(), der)
        .map_or_else(|_| Vec::new(), |digest| digest.to_vec());
    digest
        .iter()
        .map(|byte| format!("{byte:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A P-256 key and a self-signed certificate for localhost, 127.0.0.1 and ::1.
fn create_dev_pair(cert_path: &Path, key_path: &Path) -> Result<(), CertError> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let key = PKey::from_ec_key(EcKey::generate(&group)?)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("CN", "parleyd development certificate")?;
    let name = name.build();
    let mut serial = BigNum::new()?;
    serial.rand(127, boring::bn::MsbOption::MAYBE_ZERO, false)?;
    let mut builder = X509::builder()?;
    builder.set_version(2)?;
    let serial = serial.to_asn1_integer()?;
    builder.set_serial_number(&serial)?;
    builder.set_subject_name(&name)?;
    builder.set_issuer_name(&name)?;
    builder.set_pubkey(&key)?;
    let (not_before, not_after) = (
        Asn1Time::days_from_now(0)?,
        Asn1Time::days_from_now(DEV_CERT_DAYS)?,
    );
    builder.set_not_before(&not_before)?;
    builder.set_not_after(&not_after)?;
    let names = SubjectAlternativeName::new()
        .dns("localhost")
        .ip("127.0.0.1")
        .ip("::1")
        .build(&builder.x509v3_context(None, None))?;
    builder.append_extension(names)?;
    builder.sign(&key, MessageDigest::sha256())?;
    let cert = builder.build();
    // The key first and private: a crash between the two leaves no certificate without
    // its key, and the next start makes a fresh pair.
    write_new(key_path, &key.private_key_to_pem_pkcs8()?, 0o600)?;
    write_new(cert_path, &cert.to_pem()?, 0o644)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let error = |error: std::io::Error| CertError::File {
        path: path.to_path_buf(),
        reason: error.to_string(),
    };
    let temporary = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .map_err(error)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(error)?;
    std::fs::rename(&temporary, path).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_pair_is_made_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path(), Path::new(""), Path::new("")).unwrap();
        assert!(first.generated);
        assert_eq!(first.fingerprint.len(), 32 * 3 - 1);
        let again = load_or_create(dir.path(), Path::new(""), Path::new("")).unwrap();
        assert!(!again.generated);
        assert_eq!(first.fingerprint, again.fingerprint);
    }

    #[test]
    fn half_a_pair_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let error = load_or_create(dir.path(), Path::new("/x.pem"), Path::new("")).unwrap_err();
        assert!(
            error.to_string().contains("must be set together"),
            "{error}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bogus = dir.path().join("cert.pem");
        std::fs::write(&bogus, "hello").unwrap();
        let error = load_or_create(dir.path(), &bogus, &bogus).unwrap_err();
        assert!(
            error.to_string().contains("not a PEM certificate"),
            "{error}"
        );
    }
}
