//! A Chrome trace of the fusion engine (`OXCCL_TIMELINE`), viewable in
//! Perfetto or chrome://tracing: one process per rank (`pid` = rank), one
//! thread per tensor name, and on it the tensor's phases: `NEGOTIATE` (from
//! submission until every rank agreed to run it), then `PACK`, `COLLECTIVE`
//! and `UNPACK` of the bucket it rode in, with the fused buffer's size and
//! tensor count as arguments. Thread 0 (`engine`) shows coordination rounds.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Value, json};

use crate::{Error, Result};

/// The file a rank writes: `path` on rank 0, `path.r` on rank `r`.
pub(crate) fn rank_path(path: &Path, rank: usize) -> PathBuf {
    if rank == 0 {
        return path.to_path_buf();
    }
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{rank}"));
    PathBuf::from(s)
}

#[derive(Debug)]
pub(crate) struct Timeline {
    out: Option<BufWriter<File>>,
    path: PathBuf,
    rank: usize,
    start: Instant,
    tids: HashMap<String, usize>,
    first: bool,
}

impl Timeline {
    pub fn create(path: &Path, rank: usize, start: Instant) -> Result<Timeline> {
        let path = rank_path(path, rank);
        let file = File::create(&path).map_err(|e| Error::Config {
            variable: "OXCCL_TIMELINE".into(),
            reason: format!("cannot create {}: {e}", path.display()),
        })?;
        let mut t = Timeline {
            out: Some(BufWriter::new(file)),
            path,
            rank,
            start,
            tids: HashMap::new(),
            first: true,
        };
        t.raw("[\n");
        t.write(
            &json!({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
            "args": {"name": format!("rank {rank}")}}),
        );
        t.write(
            &json!({"name": "thread_name", "ph": "M", "pid": rank, "tid": 0,
            "args": {"name": "engine"}}),
        );
        Ok(t)
    }

    fn raw(&mut self, s: &str) {
        if let Some(out) = &mut self.out {
            if let Err(e) = out.write_all(s.as_bytes()) {
                tracing::warn!(
                    "rank {}: timeline {}: {e}; no more events are written",
                    self.rank,
                    self.path.display()
                );
                self.out = None;
            }
        }
    }

    fn write(&mut self, v: &Value) {
        let sep = if self.first { "" } else { ",\n" };
        self.first = false;
        self.raw(&format!("{sep}{v}"));
    }

    fn tid(&mut self, tensor: &str) -> usize {
        if let Some(t) = self.tids.get(tensor) {
            return *t;
        }
        let t = self.tids.len() + 1;
        self.tids.insert(tensor.to_string(), t);
        let pid = self.rank;
        self.write(
            &json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": t,
            "args": {"name": tensor}}),
        );
        t
    }

    fn us(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.start).as_secs_f64() * 1e6
    }

    /// A complete event `phase` on `tensor`'s thread (or the engine's, for `None`).
    pub fn span(
        &mut self,
        tensor: Option<&str>,
        phase: &str,
        from: Instant,
        to: Instant,
        args: Value,
    ) {
        let tid = tensor.map_or(0, |t| self.tid(t));
        let (ts, end) = (self.us(from), self.us(to));
        let pid = self.rank;
        self.write(&json!({"name": phase, "ph": "X", "pid": pid, "tid": tid,
            "ts": ts, "dur": (end - ts).max(0.0), "args": args}));
    }

    pub fn flush(&mut self) {
        if let Some(out) = &mut self.out {
            let _ = out.flush();
        }
    }

    /// Closes the JSON array.
    pub fn finish(&mut self) {
        self.raw("\n]\n");
        self.flush();
        self.out = None;
    }
}
