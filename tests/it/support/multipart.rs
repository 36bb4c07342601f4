//! A multipart/form-data body built by hand, so tests choose the field order and can stream the
//! file part (the upload endpoint's contract is the guide's field order, file first).

use super::cluster::unique;

/// The parts of a body around its file part: `head`, the file's bytes, `tail`.
pub struct Form {
    pub boundary: String,
    pub head: Vec<u8>,
    pub tail: Vec<u8>,
}

impl Form {
    /// `before` fields, then the file part (if any), then `after` fields.
    pub fn new(
        before: &[(&str, &str)],
        file: Option<(&str, &str)>,
        after: &[(&str, &str)],
    ) -> Form {
        let boundary = format!("----fluxbase{}", unique("b"));
        let text = |out: &mut Vec<u8>, fields: &[(&str, &str)]| {
            for (k, v) in fields {
                out.extend_from_slice(
                    format!(
                        "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
                    )
                    .as_bytes(),
                );
            }
        };
        let mut head = Vec::new();
        text(&mut head, before);
        let mut tail = Vec::new();
        if let Some((filename, content_type)) = file {
            head.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n"
                )
                .as_bytes(),
            );
            tail.extend_from_slice(b"\r\n");
        }
        text(&mut tail, after);
        tail.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        Form {
            boundary,
            head,
            tail,
        }
    }

    pub fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    /// The whole body with `data` as the file's content.
    pub fn with_bytes(&self, data: &[u8]) -> Vec<u8> {
        [self.head.as_slice(), data, self.tail.as_slice()].concat()
    }
}
