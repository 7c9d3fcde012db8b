//! `fwagent sign` and `fwagent verify`: the vendor's side of signed images,
//! and an offline check of one. The format is [`crate::signature`]'s.
//!
//! Exit codes: `sign` 0 written, 2 usage (an unreadable key or image);
//! `verify` 0 valid, 1 not (no signature, a malformed one, or one by no
//! trusted key of this name, size and content), 2 usage.

use super::exit;
use crate::signature::{self, SignaturePolicy};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args, Debug, Clone)]
pub struct SignArgs {
    /// The Ed25519 private key (PKCS#8 PEM, as `openssl genpkey -algorithm
    /// ed25519` writes it).
    #[arg(long, value_name = "PRIVATE.pem")]
    pub key: PathBuf,
    /// The image; its signature goes to IMAGE.sig.
    pub image: PathBuf,
    /// The firmwareName the image is signed for [default: IMAGE's file name].
    #[arg(long)]
    pub name: Option<String>,
    /// Where to write the signature [default: IMAGE.sig].
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct VerifyArgs {
    /// A trusted Ed25519 public key (PEM, as `openssl pkey -pubout` writes
    /// it); repeatable.
    #[arg(long, value_name = "PUBLIC.pem", required = true)]
    pub trust_key: Vec<PathBuf>,
    /// The image.
    pub image: PathBuf,
    /// Its signature [default: IMAGE.sig].
    pub sig: Option<PathBuf>,
    /// The firmwareName the image must be signed for [default: IMAGE's file name].
    #[arg(long)]
    pub name: Option<String>,
}

/// `fwagent sign --key PRIVATE.pem IMAGE`: writes IMAGE.sig.
pub fn sign(args: SignArgs) -> ExitCode {
    match sign_inner(&args) {
        Ok(out) => {
            println!("{}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fwagent sign: {e}");
            ExitCode::from(exit::USAGE)
        }
    }
}

fn sign_inner(args: &SignArgs) -> Result<PathBuf, signature::SignatureError> {
    let key = signature::load_private_key(&args.key)?;
    let name = signature::name_of(&args.image, args.name.as_deref())?;
    let (sha, size) = signature::sha256_file(&args.image)?;
    let text = signature::statement(&name, size, &sha);
    let sig = key.sign(text.as_bytes());
    let out = args
        .output
        .clone()
        .unwrap_or_else(|| signature::sig_path_of(&args.image));
    std::fs::write(&out, sig.as_ref()).map_err(|source| signature::SignatureError::Write {
        path: out.clone(),
        source,
    })?;
    Ok(out)
}

/// `fwagent verify --trust-key PUBLIC.pem IMAGE [SIG]`.
pub fn verify(args: VerifyArgs) -> ExitCode {
    let policy = match SignaturePolicy::load(&args.trust_key, true) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("fwagent verify: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let name = match signature::name_of(&args.image, args.name.as_deref()) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("fwagent verify: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let (sha, size) = match signature::sha256_file(&args.image) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("fwagent verify: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let sig_path = args
        .sig
        .clone()
        .unwrap_or_else(|| signature::sig_path_of(&args.image));
    match check(&policy, &sig_path, &name, size, &sha) {
        Ok(key) => {
            println!(
                "valid: {name} ({size} bytes, sha256 {}) signed by {} ({})",
                hex::encode(&sha),
                key.0,
                key.1.display()
            );
            ExitCode::SUCCESS
        }
        Err(why) => {
            println!("invalid: {why}");
            ExitCode::from(exit::REJECTED)
        }
    }
}

/// The id and file of the key that signed, or why none did.
fn check(
    policy: &SignaturePolicy,
    sig_path: &Path,
    name: &str,
    size: u64,
    sha: &[u8],
) -> Result<(String, PathBuf), String> {
    let bytes = std::fs::read(sig_path)
        .map_err(|e| format!("cannot read the signature {}: {e}", sig_path.display()))?;
    let sig = signature::parse_sig(&bytes).map_err(|e| format!("{}: {e}", sig_path.display()))?;
    let text = signature::statement(name, size, sha);
    policy
        .signer(text.as_bytes(), &sig)
        .map(|k| (k.id(), k.path.clone()))
        .ok_or_else(|| {
            format!(
                "{} is not a signature by a trusted key of {name} ({size} bytes, sha256 {})",
                sig_path.display(),
                hex::encode(sha)
            )
        })
}
