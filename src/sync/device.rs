//! A machine's identity on a drive: its id and its signing key.
//!
//! Each device signs what it writes (its log records and its head) with
//! its own Ed25519 key, so a server, which holds no key, cannot forge or
//! alter them, and one device cannot write as another. The key is made
//! known by the device's first log record, whose enrolment is
//! authenticated with a MAC keyed by the root capability: only a holder
//! of the drive's secret can add a device. Ed25519 comes from `ring`,
//! already built into cairn through the S3 client's TLS.

use hmac::{Hmac, Mac};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use sha2::Sha256;

use super::merge::DeviceId;
use crate::namespace::RootCap;

pub const PUBLIC_LEN: usize = 32;
pub const SIGNATURE_LEN: usize = 64;

pub type PublicKey = [u8; PUBLIC_LEN];

/// This machine, as it signs.
pub struct Identity {
    pub id: DeviceId,
    key: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({:032x}, ..)", self.id)
    }
}

impl Identity {
    /// A new device: a random id and a fresh key pair.
    pub fn generate() -> Identity {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .expect("the system's random source works")
            .as_ref()
            .to_vec();
        Identity::from_pkcs8(rand::random(), &pkcs8).expect("a key ring made is one ring reads")
    }

    /// The identity kept in the catalog (the key as PKCS#8).
    pub fn from_pkcs8(id: DeviceId, pkcs8: &[u8]) -> Result<Identity, String> {
        let key = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| format!("device key: {e}"))?;
        Ok(Identity {
            id,
            key,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// The private key, to keep in the (owner-only) catalog.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn public(&self) -> PublicKey {
        self.key
            .public_key()
            .as_ref()
            .try_into()
            .expect("Ed25519 keys are 32 bytes")
    }

    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.key
            .sign(message)
            .as_ref()
            .try_into()
            .expect("Ed25519 signatures are 64 bytes")
    }
}

/// Whether `signature` is `key`'s over `message`.
pub fn verify(key: &PublicKey, message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, key).verify(message, signature).is_ok()
}

/// The MAC that makes a device's key one of the drive's.
fn enrolment_mac(root: &RootCap, device: DeviceId, key: &PublicKey) -> Hmac<Sha256> {
    let mac_key = root.derive(b"cairn-v1-enrol-mac", &[]);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&mac_key).expect("any key length");
    mac.update(&device.to_be_bytes());
    mac.update(key);
    mac
}

pub fn enrol(root: &RootCap, device: DeviceId, key: &PublicKey) -> [u8; 32] {
    enrolment_mac(root, device, key).finalize().into_bytes().into()
}

/// Whether `tag` enrols `key` as `device` on this drive (in constant time).
pub fn enrolled(root: &RootCap, device: DeviceId, key: &PublicKey, tag: &[u8]) -> bool {
    enrolment_mac(root, device, key).verify_slice(tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_key_and_message() {
        let a = Identity::generate();
        let b = Identity::generate();
        let sig = a.sign(b"record");
        assert!(verify(&a.public(), b"record", &sig));
        assert!(!verify(&b.public(), b"record", &sig));
        assert!(!verify(&a.public(), b"recore", &sig));
        let again = Identity::from_pkcs8(a.id, a.pkcs8()).unwrap();
        assert_eq!(again.public(), a.public());
        assert!(Identity::from_pkcs8(1, b"not a key").is_err());
    }

    #[test]
    fn only_the_drives_secret_enrols_a_key() {
        let root = RootCap::generate();
        let me = Identity::generate();
        let tag = enrol(&root, me.id, &me.public());
        assert!(enrolled(&root, me.id, &me.public(), &tag));
        assert!(!enrolled(&RootCap::generate(), me.id, &me.public(), &tag));
        assert!(!enrolled(&root, me.id ^ 1, &me.public(), &tag));
        assert!(!enrolled(&root, me.id, &Identity::generate().public(), &tag));
    }
}
