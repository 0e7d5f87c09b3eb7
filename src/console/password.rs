//! Console passwords: Argon2id with the argon2 crate's defaults (19 MiB, 2 passes, 1 lane — the
//! OWASP minimum), a random salt per password, stored as a PHC string. Hashing and checking
//! take tens of milliseconds on purpose: call them on a blocking thread.

use std::sync::LazyLock;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password accepted (a bound on the work one login attempt can ask for).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// The PHC string of `password`, or why it is refused.
pub fn hash(password: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        password.chars().count() >= MIN_PASSWORD_CHARS,
        "the password must have at least {MIN_PASSWORD_CHARS} characters"
    );
    anyhow::ensure!(
        password.len() <= MAX_PASSWORD_BYTES,
        "the password must have at most {MAX_PASSWORD_BYTES} bytes"
    );
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| anyhow::anyhow!("cannot hash the password: {error}"))
}

/// Whether `password` is the one `phc` was made from (false for an unreadable `phc`).
pub fn verify(password: &str, phc: &str) -> bool {
    if password.len() > MAX_PASSWORD_BYTES {
        return false;
    }
    PasswordHash::new(phc).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// A hash no password matches in practice, checked when the login does not exist, so that an
/// unknown login takes as long to refuse as a wrong password (no way to probe for logins).
static NO_SUCH_LOGIN: LazyLock<String> = LazyLock::new(|| {
    hash(&format!("no such login {}", crate::new_secret())).expect("hashing a long string")
});

/// Spends the time of one check, for an unknown login.
pub fn verify_nothing(password: &str) {
    let _ = verify(password, &NO_SUCH_LOGIN);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_verifies_against_its_own_hash_only() {
        let phc = hash("correct horse battery").unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(verify("correct horse battery", &phc));
        assert!(!verify("correct horse batterx", &phc));
        assert!(!verify("correct horse battery", "not a phc string"));
        let again = hash("correct horse battery").unwrap();
        assert_ne!(phc, again, "every hash has its own salt");
    }

    #[test]
    fn short_and_huge_passwords_are_refused() {
        assert!(hash("too short")
            .unwrap_err()
            .to_string()
            .contains("at least 12"));
        let huge = "x".repeat(MAX_PASSWORD_BYTES + 1);
        assert!(hash(&huge).is_err());
        let phc = hash("a good long password").unwrap();
        assert!(!verify(&huge, &phc));
    }
}
