//! A throw-away PKI in a temporary directory, made with the same code as `exchangectl pki`.

use std::path::{Path, PathBuf};

use client_sdk::identity::Role;
use client_sdk::pki::{self, LeafRequest};
use client_sdk::tls::{TlsIdentity, TlsPaths};

/// A CA in `dir`, with helpers to issue and load identities.
pub struct TestPki {
    pub dir: PathBuf,
}

impl TestPki {
    pub fn new(dir: &Path) -> Self {
        pki::init_ca(dir, "gov-exchange test CA", 30).expect("init CA");
        TestPki { dir: dir.to_path_buf() }
    }

    /// Issues `NAME` (if not yet issued) and returns its file paths.
    pub fn issue(&self, dept: &str, role: Role, name: &str) -> TlsPaths {
        let paths = TlsPaths::in_dir(&self.dir, name);
        if !paths.cert.exists() {
            pki::issue(&self.dir, &LeafRequest::new(dept, role, name)).expect("issue certificate");
        }
        paths
    }

    pub fn identity(&self, dept: &str, role: Role, name: &str) -> TlsIdentity {
        TlsIdentity::load(&self.issue(dept, role, name)).expect("load identity")
    }
}
