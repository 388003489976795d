//! The JSON header of a safetensors file, read without its data: the
//! tensors' names and shapes, and the file's `__metadata__`.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Largest header accepted (a header is JSON of names, dtypes and shapes).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: not a safetensors file ({reason})", path.display())]
    Invalid { path: PathBuf, reason: String },
}

impl HeaderError {
    /// Why the file is not a safetensors file, or why it cannot be read.
    pub fn reason(&self) -> String {
        match self {
            HeaderError::Read { source, .. } => source.to_string(),
            HeaderError::Invalid { reason, .. } => reason.clone(),
        }
    }
}

/// The header of the safetensors file at `path`.
pub fn read_header(path: &Path) -> Result<Map<String, Value>, HeaderError> {
    let invalid = |reason: String| HeaderError::Invalid { path: path.to_path_buf(), reason };
    let mut f = std::fs::File::open(path).map_err(|source| HeaderError::Read { path: path.to_path_buf(), source })?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| invalid("shorter than the 8-byte header length".into()))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        return Err(invalid(format!("header claims {len} bytes, above the {MAX_HEADER_BYTES}-byte limit")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|_| invalid(format!("header claims {len} bytes, more than the file holds")))?;
    match serde_json::from_slice(&header) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid("header is not a JSON object".into())),
        Err(e) => Err(invalid(format!("header is not JSON: {e}"))),
    }
}

/// Every tensor's name and shape in `header` (a tensor without a readable
/// shape is left out).
pub fn shapes(header: &Map<String, Value>) -> HashMap<String, Vec<usize>> {
    header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(k, v)| {
            let shape = v.get("shape")?.as_array()?.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>()?;
            Some((k.clone(), shape))
        })
        .collect()
}

/// The file's `__metadata__` (string to string, as safetensors writes it), empty when absent.
pub fn metadata(header: &Map<String, Value>) -> Map<String, Value> {
    match header.get("__metadata__") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_shapes_and_metadata_and_refuses_what_is_not_a_header() {
        let d = mora_test_support::Scratch::new("st-header");
        let json = br#"{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json);
        bytes.extend_from_slice(&[0u8; 24]);
        let p = d.join("m.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        let h = read_header(&p).unwrap();
        assert_eq!(shapes(&h), HashMap::from([("a".to_string(), vec![2, 3])]));
        assert_eq!(metadata(&h)["k"], "v");
        std::fs::write(&p, b"abc").unwrap();
        assert!(read_header(&p).unwrap_err().to_string().contains("not a safetensors file (shorter than the 8-byte header length)"));
        std::fs::write(&p, [&5u64.to_le_bytes()[..], b"[1,2]"].concat()).unwrap();
        assert!(read_header(&p).unwrap_err().to_string().contains("header is not a JSON object"));
        assert!(matches!(read_header(&d.join("gone")), Err(HeaderError::Read { .. })));
    }
}
