//! File digests, read in chunks (an agent binary is tens of megabytes).

use std::io::Read as _;
use std::path::Path;

use sha2::{Digest, Sha256};

/// The SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The SHA-256 of bytes, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_file_and_its_bytes_give_the_same_digest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let body = vec![7u8; 200_000];
        std::fs::write(&p, &body).unwrap();
        assert_eq!(super::sha256_file(&p).unwrap(), super::sha256_hex(&body));
        assert_eq!(
            super::sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
