//! The JSON-lines file `records sync` writes: one record per line, `{"key": ..., "version": N, "items":
//! {...}}`, in key order, so a sync that stopped continues after the last complete line's key.
//!
//! A run that was killed may leave a partial last line (the buffered writer flushed part of it): the
//! bytes after the last newline are dropped before continuing. Every line before it is complete, since
//! lines are only ever appended.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use exchange_proto::v1::Record;
use serde::{Deserialize, Serialize};

/// One line of the file.
#[derive(Debug, Serialize)]
struct Line<'a> {
    key: &'a str,
    version: u64,
    items: BTreeMap<&'a str, &'a str>,
}

/// The line for `record` (without the newline); items in name order, so equal records give equal lines.
pub fn record_line(record: &Record) -> String {
    let line = Line {
        key: &record.key,
        version: record.version,
        items: record.items.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
    };
    serde_json::to_string(&line).expect("a record serializes")
}

/// Where an existing file leaves off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumePoint {
    /// Complete (newline-terminated), non-blank lines: the records already synced.
    pub records: u64,
    /// Bytes of the complete lines; a partial last line starts here.
    pub complete_len: u64,
    /// Bytes after the last newline, left by an interrupted run: dropped before continuing.
    pub partial_len: u64,
    /// The key of the last complete line: the sync continues after it ("" = from the start).
    pub last_key: String,
}

#[derive(Deserialize)]
struct KeyOnly {
    key: String,
}

/// Reads a file's lines from the start and says where a sync continues.
pub fn scan(mut reader: impl Read) -> Result<ResumePoint, String> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut current: Vec<u8> = Vec::new(); // the line being read
    let mut last: Vec<u8> = Vec::new(); // the last complete non-blank line
    let (mut records, mut offset, mut complete_len) = (0u64, 0u64, 0u64);
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        let chunk = &buf[..n];
        let mut start = 0;
        while let Some(i) = chunk[start..].iter().position(|&b| b == b'\n') {
            let end = start + i;
            current.extend_from_slice(&chunk[start..end]);
            if !current.iter().all(u8::is_ascii_whitespace) {
                records += 1;
                std::mem::swap(&mut last, &mut current);
            }
            current.clear();
            start = end + 1;
            complete_len = offset + start as u64;
        }
        current.extend_from_slice(&chunk[start..]);
        offset += n as u64;
    }
    let last_key = if records == 0 {
        String::new()
    } else {
        serde_json::from_slice::<KeyOnly>(&last).map(|k| k.key).map_err(|e| {
            format!(
                "the last complete line (line {records}) is not a synced record ({e}); \
                 pass --restart to start over, or write to another file"
            )
        })?
    };
    Ok(ResumePoint { records, complete_len, partial_len: offset - complete_len, last_key })
}

/// Opens the output file for appending: new (or emptied, with `restart`), or continued after its last
/// complete line, a partial last line cut off first.
pub fn open(path: &Path, restart: bool) -> Result<(File, ResumePoint), String> {
    if restart || !path.exists() {
        let file = File::create(path).map_err(|e| e.to_string())?;
        return Ok((file, ResumePoint::default()));
    }
    let mut file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| e.to_string())?;
    let point = scan(io::BufReader::new(&mut file))?;
    if point.partial_len > 0 {
        file.set_len(point.complete_len).map_err(|e| format!("cannot cut off the partial last line: {e}"))?;
    }
    file.seek(SeekFrom::Start(point.complete_len)).map_err(|e| e.to_string())?;
    Ok((file, point))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn rec(key: &str, version: u64) -> Record {
        Record {
            key: key.into(),
            version,
            items: [("企业名称", "某某公司"), ("登记状态", "存续")].into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
            updated_at_unix_ms: 5,
        }
    }

    fn lines(keys: &[&str]) -> String {
        keys.iter().enumerate().map(|(i, k)| record_line(&rec(k, i as u64 + 1)) + "\n").collect()
    }

    /// Hands out one byte per read, so lines straddle every possible chunk boundary.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.split_first() {
                Some((b, rest)) if !buf.is_empty() => {
                    buf[0] = *b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn lines_are_deterministic_and_readable_by_records_put() {
        let line = record_line(&rec("91350100M000100Y43", 2503));
        assert_eq!(line, r#"{"key":"91350100M000100Y43","version":2503,"items":{"企业名称":"某某公司","登记状态":"存续"}}"#);
        let back = super::super::records_cmd::parse_records(&line).unwrap();
        assert_eq!(back[0].key, "91350100M000100Y43");
        assert_eq!(back[0].items["登记状态"], "存续");
    }

    #[test]
    fn the_last_complete_line_gives_the_key_to_continue_after() {
        assert_eq!(scan(&b""[..]).unwrap(), ResumePoint::default());
        let text = lines(&["A", "B", "C"]);
        let p = scan(text.as_bytes()).unwrap();
        assert_eq!((p.records, p.last_key.as_str(), p.partial_len), (3, "C", 0));
        assert_eq!(p.complete_len, text.len() as u64);
        assert_eq!(scan(Trickle(text.as_bytes())).unwrap(), p, "chunk boundaries do not matter");
        // Blank lines are not records.
        let p = scan(format!("\n{}\n  \n", lines(&["A", "B"]).trim_end()).as_bytes()).unwrap();
        assert_eq!((p.records, p.last_key.as_str()), (2, "B"));
    }

    #[test]
    fn a_partial_last_line_is_dropped_not_fatal() {
        let complete = lines(&["A", "B"]);
        let cut = record_line(&rec("C", 3));
        for partial in [&cut[..10], &cut[..cut.len() - 1], cut.as_str(), "{"] {
            let text = format!("{complete}{partial}");
            for p in [scan(text.as_bytes()).unwrap(), scan(Trickle(text.as_bytes())).unwrap()] {
                assert_eq!((p.records, p.last_key.as_str()), (2, "B"), "{partial}");
                assert_eq!(p.complete_len, complete.len() as u64);
                assert_eq!(p.partial_len, partial.len() as u64);
            }
        }
        // Only a partial line: start from the beginning.
        let p = scan(&cut.as_bytes()[..7]).unwrap();
        assert_eq!((p.records, p.last_key.as_str(), p.complete_len, p.partial_len), (0, "", 0, 7));
    }

    #[test]
    fn a_broken_complete_line_is_an_error() {
        let text = format!("{}not json\n", lines(&["A"]));
        let err = scan(text.as_bytes()).unwrap_err();
        assert!(err.contains("line 2") && err.contains("--restart"), "{err}");
    }

    #[test]
    fn open_cuts_the_partial_line_and_appends_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let complete = lines(&["A", "B"]);
        let partial = r#"{"key":"C","ver"#;
        std::fs::write(&path, format!("{complete}{partial}")).unwrap();
        let (mut file, point) = open(&path, false).unwrap();
        assert_eq!((point.records, point.last_key.as_str(), point.partial_len), (2, "B", partial.len() as u64));
        writeln!(file, "{}", record_line(&rec("C", 3))).unwrap();
        drop(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, lines(&["A", "B", "C"]));
        let (_, point) = open(&path, false).unwrap();
        assert_eq!((point.records, point.last_key.as_str(), point.partial_len), (3, "C", 0));
        // --restart empties it; a missing file is created.
        let (_, point) = open(&path, true).unwrap();
        assert_eq!(point, ResumePoint::default());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        let (_, point) = open(&dir.path().join("new.jsonl"), false).unwrap();
        assert_eq!(point, ResumePoint::default());
    }
}
