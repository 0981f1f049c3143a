//! A batch's input file, line by line: the reader (bounded lines, never the whole file in
//! memory) and the validation that runs when a batch is created. Each problem is reported with
//! its 1-based line number and a stable code (docs/batch.md):
//!
//! | code | the line |
//! |---|---|
//! | `invalid_json_line` | is not a JSON object (or not UTF-8) |
//! | `line_too_long` | is longer than `[batch] line_bytes_max` |
//! | `missing_field` | lacks `custom_id`, `method`, `url`, `body` or `body.model` (`param` names it) |
//! | `invalid_method` | has a `method` other than `POST` |
//! | `url_mismatch` | has a `url` other than the batch's `endpoint` |
//! | `duplicate_custom_id` | repeats an earlier line's `custom_id` |
//! | `mixed_models` | names another `body.model` than the first line |
//! | `too_many_lines` | is past `[batch] batch_lines_max` |
//! | `empty_file` | (no line number) the file has no request at all |

use std::collections::HashSet;
use std::path::Path;

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use utoipa::ToSchema;

/// Most validation errors reported for one batch; the first ones, in line order.
pub(crate) const VALIDATION_ERRORS_MAX: usize = 100;

/// One validation error, OpenAI's `errors.data[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub(crate) struct LineError {
    pub(crate) code: String,
    pub(crate) message: String,
    pub(crate) param: Option<String>,
    pub(crate) line: Option<u64>,
}

impl LineError {
    fn at(line: u64, code: &str, param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            param: param.map(str::to_owned),
            line: Some(line),
        }
    }
}

/// What validation found.
#[derive(Debug, Default)]
pub(crate) struct Validated {
    /// Requests in the file (non-blank lines).
    pub(crate) total: u64,
    /// The model every line names.
    pub(crate) model: Option<String>,
    pub(crate) errors: Vec<LineError>,
}

/// One request line as parsed.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) number: u64,
    pub(crate) custom_id: String,
    pub(crate) body: serde_json::Map<String, serde_json::Value>,
}

/// A line the reader could not deliver.
#[derive(Debug)]
pub(crate) enum ReadError {
    TooLong { number: u64 },
    Unreadable { number: u64, reason: String },
}

/// Reads a file's non-blank lines with their 1-based numbers, each at most `line_bytes_max`.
pub(crate) struct LineReader {
    lines: FramedRead<tokio::fs::File, LinesCodec>,
    number: u64,
}

impl LineReader {
    pub(crate) async fn open(path: &Path, line_bytes_max: u64) -> std::io::Result<Self> {
        let file = tokio::fs::File::open(path).await?;
        let max = usize::try_from(line_bytes_max).unwrap_or(usize::MAX);
        Ok(Self {
            lines: FramedRead::new(file, LinesCodec::new_with_max_length(max)),
            number: 0,
        })
    }

    /// The next non-blank line; `None` at the end (or after an unreadable line).
    pub(crate) async fn next(&mut self) -> Option<Result<(u64, String), ReadError>> {
        loop {
            let item = self.lines.next().await?;
            self.number = self.number.saturating_add(1);
            match item {
                Ok(line) if line.trim().is_empty() => {}
                Ok(line) => return Some(Ok((self.number, line))),
                Err(LinesCodecError::MaxLineLengthExceeded) => {
                    return Some(Err(ReadError::TooLong {
                        number: self.number,
                    }));
                }
                Err(LinesCodecError::Io(error)) => {
                    return Some(Err(ReadError::Unreadable {
                        number: self.number,
                        reason: error.to_string(),
                    }));
                }
            }
        }
    }
}

/// Parses one line against the batch's endpoint: the request, or the line's first problem.
#[expect(
    clippy::too_many_lines,
    reason = "one check per field, in the order reported"
)]
pub(crate) fn parse_line(number: u64, text: &str, endpoint: &str) -> Result<Request, LineError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|error| {
        LineError::at(
            number,
            "invalid_json_line",
            None,
            format!("line {number} is not valid JSON: {error}"),
        )
    })?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(LineError::at(
            number,
            "invalid_json_line",
            None,
            format!("line {number} is not a JSON object"),
        ));
    };
    let missing = |param: &str| {
        LineError::at(
            number,
            "missing_field",
            Some(param),
            format!("line {number} has no `{param}` (or it has the wrong type)"),
        )
    };
    let custom_id = match object.remove("custom_id") {
        Some(serde_json::Value::String(id)) if !id.is_empty() => id,
        _ => return Err(missing("custom_id")),
    };
    if custom_id.len() > tidepool_ledger::BATCH_TEXT_BYTES_MAX {
        return Err(missing("custom_id"));
    }
    match object.get("method").and_then(serde_json::Value::as_str) {
        None => return Err(missing("method")),
        Some("POST") => {}
        Some(other) => {
            return Err(LineError::at(
                number,
                "invalid_method",
                Some("method"),
                format!(
                    "line {number} has method `{}`; only POST is supported",
                    other.escape_debug()
                ),
            ));
        }
    }
    match object.get("url").and_then(serde_json::Value::as_str) {
        None => return Err(missing("url")),
        Some(url) if url == endpoint => {}
        Some(url) => {
            return Err(LineError::at(
                number,
                "url_mismatch",
                Some("url"),
                format!(
                    "line {number} has url `{}` but the batch's endpoint is `{endpoint}`",
                    url.escape_debug()
                ),
            ));
        }
    }
    let Some(serde_json::Value::Object(body)) = object.remove("body") else {
        return Err(missing("body"));
    };
    if !body.get("model").is_some_and(serde_json::Value::is_string) {
        return Err(missing("body.model"));
    }
    Ok(Request {
        number,
        custom_id,
        body,
    })
}

#[expect(
    clippy::too_many_lines,
    reason = "one pass over the file, read top to bottom"
)]
/// Validates a whole input file, streaming it: at most `lines_max` requests, each well-formed
/// for `endpoint`, unique `custom_id`s, one model.
pub(crate) async fn validate(
    path: &Path,
    endpoint: &str,
    lines_max: u64,
    line_bytes_max: u64,
) -> std::io::Result<Validated> {
    let mut reader = LineReader::open(path, line_bytes_max).await?;
    let mut validated = Validated::default();
    let mut seen: HashSet<String> = HashSet::new();
    let report = |validated: &mut Validated, error: LineError| {
        if validated.errors.len() < VALIDATION_ERRORS_MAX {
            validated.errors.push(error);
        }
    };
    while let Some(item) = reader.next().await {
        let (number, text) = match item {
            Ok(line) => line,
            Err(ReadError::TooLong { number }) => {
                validated.total = validated.total.saturating_add(1);
                let error = LineError::at(
                    number,
                    "line_too_long",
                    None,
                    format!("line {number} is longer than {line_bytes_max} bytes"),
                );
                report(&mut validated, error);
                continue;
            }
            Err(ReadError::Unreadable { number, reason }) => {
                let error = LineError::at(
                    number,
                    "invalid_json_line",
                    None,
                    format!("line {number} cannot be read: {reason}"),
                );
                report(&mut validated, error);
                break;
            }
        };
        validated.total = validated.total.saturating_add(1);
        if validated.total > lines_max {
            let error = LineError::at(
                number,
                "too_many_lines",
                None,
                format!("the file has more than {lines_max} requests (the limit)"),
            );
            report(&mut validated, error);
            break;
        }
        let request = match parse_line(number, &text, endpoint) {
            Ok(request) => request,
            Err(error) => {
                report(&mut validated, error);
                continue;
            }
        };
        let model = request
            .body
            .get("model")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default();
        match &validated.model {
            None => validated.model = Some(model.to_owned()),
            Some(first) if first != model => {
                let error = LineError::at(
                    number,
                    "mixed_models",
                    Some("body.model"),
                    format!(
                        "line {number} names model `{}` but earlier lines name `{first}`; a batch uses one model",
                        model.escape_debug()
                    ),
                );
                report(&mut validated, error);
            }
            Some(_) => {}
        }
        if !seen.insert(request.custom_id) {
            let error = LineError::at(
                number,
                "duplicate_custom_id",
                Some("custom_id"),
                format!("line {number} repeats an earlier line's custom_id"),
            );
            report(&mut validated, error);
        }
    }
    if validated.total == 0 && validated.errors.is_empty() {
        validated.errors.push(LineError {
            code: "empty_file".to_owned(),
            message: "the input file has no request".to_owned(),
            param: None,
            line: None,
        });
    }
    Ok(validated)
}
