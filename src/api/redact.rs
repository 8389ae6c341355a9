//! `Debug` for the messages that carry values (build.rs skips deriving it).
#![forbid(unsafe_code)]

use std::fmt;

use super::pb::{GetSecretResponse, PutSecretRequest, put_secret_request::Source};

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Value(v) => write!(f, "Value(<{} bytes redacted>)", v.len()),
            Source::GenerateLength(n) => write!(f, "GenerateLength({n})"),
        }
    }
}

impl fmt::Debug for PutSecretRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutSecretRequest")
            .field("path", &self.path)
            .field("mode", &self.mode)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Debug for GetSecretResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetSecretResponse")
            .field("meta", &self.meta)
            .field("value", &format_args!("<{} bytes redacted>", self.value.len()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_never_reach_debug_output() {
        let put = PutSecretRequest {
            path: "a".into(),
            mode: 1,
            source: Some(Source::Value(b"s3cr3t-v4lue".to_vec())),
            if_version: None,
        };
        let get = GetSecretResponse { meta: None, value: b"s3cr3t-v4lue".to_vec() };
        for s in [format!("{put:?}"), format!("{get:?}"), format!("{:?}", put.source)] {
            assert!(!s.contains("s3cr3t") && !s.contains("115, 51"), "{s}");
        }
    }
}
