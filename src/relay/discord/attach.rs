//! A message's attachments: images become the job's `attachments` (image
//! content blocks for Claude), text files part of the prompt; anything
//! else, or too big, is left out and said so. Downloads are bounded in
//! time and size.

use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use twilight_model::channel::Attachment;

use crate::protocol::{
    AttachmentKind, AttachmentV1, ImageMediaType, MAX_ATTACHMENTS, MAX_ATTACHMENT_BASE64,
    MAX_PROMPT_BYTES,
};

/// The largest image taken: what fits in the protocol's base64 limit.
pub const MAX_IMAGE_BYTES: u64 = (MAX_ATTACHMENT_BASE64 / 4 * 3) as u64;

/// The largest text file taken into the prompt.
pub const MAX_TEXT_BYTES: u64 = 100_000;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// Fetches attachments from Discord's CDN (https) or, in tests, a loopback
/// server (http).
#[derive(Clone)]
pub struct Downloader {
    client: Client<Https, Empty<Bytes>>,
    timeout: Duration,
}

/// What a message's attachments add to its job.
#[derive(Debug, Default, PartialEq)]
pub struct Collected {
    pub images: Vec<AttachmentV1>,
    /// Text files, each under a header line, for the end of the prompt.
    pub text: String,
    /// File names left out, with why (shown to the user).
    pub skipped: Vec<String>,
}

/// What to do with one attachment, from its declared type and size.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    Image(ImageMediaType),
    Text,
    Skip(&'static str),
}

/// Decides from the attachment's metadata alone (pure).
pub fn plan(content_type: Option<&str>, size: u64, images_so_far: usize) -> Plan {
    let mime = content_type.unwrap_or("");
    if let Some(t) = ImageMediaType::parse(mime) {
        return match () {
            _ if images_so_far >= MAX_ATTACHMENTS => Plan::Skip("too many images"),
            _ if size > MAX_IMAGE_BYTES => Plan::Skip("image too large"),
            _ => Plan::Image(t),
        };
    }
    if mime.starts_with("text/") || mime.starts_with("application/json") {
        return if size > MAX_TEXT_BYTES {
            Plan::Skip("text file too large")
        } else {
            Plan::Text
        };
    }
    Plan::Skip("not an image or text file")
}

/// Appends a text file to `out` under a header, if the prompt stays
/// within the protocol's limit.
pub fn append_text(out: &mut String, prompt_len: usize, name: &str, body: &str) -> bool {
    let block = format!("\n\n--- {name} ---\n{body}");
    if prompt_len + out.len() + block.len() > MAX_PROMPT_BYTES {
        return false;
    }
    out.push_str(&block);
    true
}

impl Downloader {
    pub fn new(timeout: Duration) -> Downloader {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Downloader {
            client: Client::builder(TokioExecutor::new()).build(https),
            timeout,
        }
    }

    /// GETs `url`, at most `limit` bytes, within the timeout.
    async fn get(&self, url: &str, limit: u64) -> Option<Bytes> {
        let uri: hyper::Uri = url.parse().ok()?;
        let work = async {
            let resp = self.client.get(uri).await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let body = Limited::new(resp.into_body(), limit as usize);
            Some(body.collect().await.ok()?.to_bytes())
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .ok()
            .flatten()
    }

    /// Downloads what the plan takes; the prompt's length bounds the text.
    pub async fn collect(&self, attachments: &[Attachment], prompt_len: usize) -> Collected {
        let mut c = Collected::default();
        for a in attachments {
            let why = match plan(a.content_type.as_deref(), a.size, c.images.len()) {
                Plan::Skip(why) => why,
                Plan::Image(media_type) => match self.get(&a.url, MAX_IMAGE_BYTES).await {
                    Some(bytes) => {
                        c.images.push(AttachmentV1 {
                            kind: AttachmentKind::Image,
                            media_type,
                            data: base64::engine::general_purpose::STANDARD.encode(&bytes),
                        });
                        continue;
                    }
                    None => "could not be downloaded",
                },
                Plan::Text => match self.get(&a.url, MAX_TEXT_BYTES).await {
                    Some(bytes) => {
                        let body = String::from_utf8_lossy(&bytes);
                        if append_text(&mut c.text, prompt_len, &a.filename, &body) {
                            continue;
                        }
                        "over the prompt limit"
                    }
                    None => "could not be downloaded",
                },
            };
            c.skipped.push(format!("{} ({why})", a.filename));
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_and_text_are_taken_within_limits() {
        assert_eq!(
            plan(Some("image/png"), 10, 0),
            Plan::Image(ImageMediaType::Png)
        );
        assert_eq!(
            plan(Some("image/jpeg"), MAX_IMAGE_BYTES + 1, 0),
            Plan::Skip("image too large")
        );
        assert_eq!(
            plan(Some("image/webp"), 1, 4),
            Plan::Skip("too many images")
        );
        assert_eq!(
            plan(Some("image/tiff"), 1, 0),
            Plan::Skip("not an image or text file")
        );
        assert_eq!(plan(Some("text/plain; charset=utf-8"), 10, 0), Plan::Text);
        assert_eq!(
            plan(Some("text/x-rust"), MAX_TEXT_BYTES + 1, 0),
            Plan::Skip("text file too large")
        );
        assert_eq!(plan(None, 1, 0), Plan::Skip("not an image or text file"));
    }

    #[test]
    fn the_largest_image_fits_the_protocol() {
        let b64 = MAX_IMAGE_BYTES.div_ceil(3) * 4;
        assert!(b64 as usize <= MAX_ATTACHMENT_BASE64);
    }

    #[test]
    fn text_files_stay_within_the_prompt_limit() {
        let mut out = String::new();
        assert!(append_text(&mut out, 10, "a.txt", "hello"));
        assert_eq!(out, "\n\n--- a.txt ---\nhello");
        assert!(!append_text(&mut out, MAX_PROMPT_BYTES - 10, "b.txt", "x"));
        assert_eq!(out, "\n\n--- a.txt ---\nhello");
    }
}
