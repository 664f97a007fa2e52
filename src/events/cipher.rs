//! Feishu's event encryption: AES-256-CBC, key = SHA-256(Encrypt Key), random 16-byte IV
//! prepended, PKCS#7, standard base64 (protocol.md §1).
//!
//! Pure and strict: no IO, no clock, lengths checked before any slicing, strict base64 (standard
//! alphabet, canonical `=` padding, no whitespace), strict PKCS#7, strict UTF-8. The several ways
//! decryption can fail are kept apart in [`DecryptError`] for tests and debugging only; the HTTP
//! layer maps every one of them to the same `bad_payload` answer so that nothing outside can tell
//! a padding failure from any other (no padding oracle).

use std::fmt;

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, InnerIvInit, KeyInit};
use aes::Aes256;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use sha2::{Digest, Sha256};

/// AES block and IV size in bytes.
pub const BLOCK_BYTES: usize = 16;

/// Standard alphabet, `=` padding required and canonical: what Feishu sends, and nothing else.
const STRICT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
);

/// Why a blob did not decrypt. Never shown outside the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecryptError {
    Empty,
    Base64,
    TooShort,
    NotBlockAligned,
    Padding,
    Utf8,
}

impl fmt::Display for DecryptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DecryptError::Empty => "empty encrypt field",
            DecryptError::Base64 => "not standard padded base64",
            DecryptError::TooShort => "shorter than IV + one block",
            DecryptError::NotBlockAligned => "ciphertext not a multiple of 16 bytes",
            DecryptError::Padding => "bad PKCS#7 padding",
            DecryptError::Utf8 => "plaintext is not UTF-8",
        };
        f.write_str(s)
    }
}

impl std::error::Error for DecryptError {}

/// The cipher for one Encrypt Key, with the AES key schedule computed once.
#[derive(Clone)]
pub struct EventCipher {
    aes: Aes256,
}

impl fmt::Debug for EventCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EventCipher([redacted])")
    }
}

impl EventCipher {
    /// Derive the AES-256 key from an Encrypt Key: SHA-256 of its UTF-8 bytes.
    pub fn new(encrypt_key: &str) -> Self {
        let key = Sha256::digest(encrypt_key.as_bytes());
        EventCipher {
            aes: Aes256::new(&key),
        }
    }

    /// Decrypt the value of an `encrypt` field to its UTF-8 plaintext.
    pub fn decrypt(&self, encrypt: &str) -> Result<String, DecryptError> {
        if encrypt.is_empty() {
            return Err(DecryptError::Empty);
        }
        let mut raw = STRICT_BASE64
            .decode(encrypt)
            .map_err(|_| DecryptError::Base64)?;
        if raw.len() < 2 * BLOCK_BYTES {
            return Err(DecryptError::TooShort);
        }
        if raw.len() % BLOCK_BYTES != 0 {
            return Err(DecryptError::NotBlockAligned);
        }
        let (iv, ciphertext) = raw.split_at_mut(BLOCK_BYTES);
        let iv = aes::cipher::generic_array::GenericArray::clone_from_slice(iv);
        let decryptor = cbc::Decryptor::<Aes256>::inner_iv_init(self.aes.clone(), &iv);
        let plaintext_len = decryptor
            .decrypt_padded_mut::<Pkcs7>(ciphertext)
            .map_err(|_| DecryptError::Padding)?
            .len();
        raw.copy_within(BLOCK_BYTES..BLOCK_BYTES + plaintext_len, 0);
        raw.truncate(plaintext_len);
        String::from_utf8(raw).map_err(|_| DecryptError::Utf8)
    }

    /// Encrypt `plaintext` the way Feishu does, with the given IV (callers pass a random one;
    /// tests pass a fixed one).
    pub fn encrypt(&self, plaintext: &[u8], iv: [u8; BLOCK_BYTES]) -> String {
        let iv_array = aes::cipher::generic_array::GenericArray::from(iv);
        let encryptor = cbc::Encryptor::<Aes256>::inner_iv_init(self.aes.clone(), &iv_array);
        let ciphertext = encryptor.encrypt_padded_vec_mut::<Pkcs7>(plaintext);
        let mut raw = Vec::with_capacity(BLOCK_BYTES + ciphertext.len());
        raw.extend_from_slice(&iv);
        raw.extend_from_slice(&ciphertext);
        STRICT_BASE64.encode(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_vector_hello_world() {
        let c = EventCipher::new("test key");
        assert_eq!(
            c.decrypt("P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=")
                .unwrap(),
            "hello world"
        );
    }

    #[test]
    fn round_trip_with_fixed_iv() {
        let c = EventCipher::new("k");
        for len in [0usize, 1, 15, 16, 17, 100] {
            let pt = "x".repeat(len);
            let blob = c.encrypt(pt.as_bytes(), [7; 16]);
            assert_eq!(c.decrypt(&blob).unwrap(), pt);
        }
    }

    #[test]
    fn short_and_misaligned_inputs_fail_without_panicking() {
        let c = EventCipher::new("k");
        assert_eq!(c.decrypt(""), Err(DecryptError::Empty));
        assert_eq!(c.decrypt("AAAA"), Err(DecryptError::TooShort));
        let iv_only = STRICT_BASE64.encode([0u8; 16]);
        assert_eq!(c.decrypt(&iv_only), Err(DecryptError::TooShort));
        let misaligned = STRICT_BASE64.encode([0u8; 33]);
        assert_eq!(c.decrypt(&misaligned), Err(DecryptError::NotBlockAligned));
        assert_eq!(c.decrypt("!!!!"), Err(DecryptError::Base64));
    }
}
