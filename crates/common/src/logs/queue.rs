//! The queue between the logging calls and a writer thread (stdout's, the Kafka shipper's): lines copied one
//! after another into one byte buffer under a short lock, taken whole by the writer thread every
//! [`super::DRAIN_INTERVAL`] in exchange for its emptied buffer.
//!
//! A line costs the logging call a copy into that buffer and no allocation once the two buffers have grown to
//! a round's lines; the writer never frees memory a worker allocated (with glibc, a free from another thread
//! takes the allocating arena's lock, which the workers then wait on). Bounded in lines (`log.buffer_lines`):
//! a line that does not fit is refused, and the caller counts it.

use std::sync::{Arc, Mutex, PoisonError};

/// Lines in one buffer: `bytes`, and where each line ends in it with its level.
#[derive(Default)]
pub(super) struct Lines {
    bytes: Vec<u8>,
    ends: Vec<(usize, &'static str)>,
}

/// A round's buffers that grew past this are given back once written, so one burst does not keep its memory
/// for the life of the process (at 20,000 lines/s, a 10 ms round holds ~70 KB).
const KEPT_BYTES: usize = 256 * 1024;

impl Lines {
    /// Each line (without its newline) and its level, in the order they were queued.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&[u8], &'static str)> {
        let mut start = 0;
        self.ends.iter().map(move |&(end, level)| {
            let line = &self.bytes[start..end];
            start = end;
            (line, level)
        })
    }

    /// Empties it for the next round, keeping its memory unless a burst made it large.
    fn recycle(&mut self) {
        if self.bytes.capacity() > KEPT_BYTES {
            *self = Self::default();
        } else {
            self.bytes.clear();
            self.ends.clear();
        }
    }
}

/// The shared side: what the logging calls fill. Cloned into the layer and the writer thread; once only the
/// writer holds it, the logging side is gone.
#[derive(Clone)]
pub(super) struct LineQueue {
    lines: Arc<Mutex<Lines>>,
    max_lines: usize,
}

impl LineQueue {
    /// A queue holding at most `max_lines` lines (at least one).
    pub(super) fn new(max_lines: usize) -> Self {
        Self {
            lines: Arc::default(),
            max_lines: max_lines.max(1),
        }
    }

    /// Copies `line` in with its `level`; `false` (and nothing queued) when `max_lines` are waiting.
    pub(super) fn push(&self, line: &[u8], level: &'static str) -> bool {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.ends.len() >= self.max_lines {
            return false;
        }
        lines.bytes.extend_from_slice(line);
        let end = lines.bytes.len();
        lines.ends.push((end, level));
        true
    }

    /// Hands what has queued to the writer in `round`, which it has emptied (its buffers go back to the
    /// logging side for the next round).
    pub(super) fn take(&self, round: &mut Lines) {
        round.recycle();
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::swap(&mut *lines, round);
    }

    /// Whether the logging side still holds the queue (the writer's own handle aside).
    pub(super) fn has_writers(&self) -> bool {
        Arc::strong_count(&self.lines) > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_out_whole_in_order_with_their_levels() {
        let queue = LineQueue::new(10);
        assert!(queue.push(b"{\"a\":1}", "INFO"));
        assert!(queue.push(b"", "WARN"));
        assert!(queue.push("{\"b\":\"é\"}".as_bytes(), "ERROR"));
        let mut round = Lines::default();
        queue.take(&mut round);
        let got: Vec<(&[u8], &str)> = round.iter().collect();
        assert_eq!(
            got,
            [
                (&b"{\"a\":1}"[..], "INFO"),
                (&b""[..], "WARN"),
                ("{\"b\":\"é\"}".as_bytes(), "ERROR")
            ]
        );
        // The next round starts empty and does not see the last one's lines.
        assert!(queue.push(b"next", "INFO"));
        queue.take(&mut round);
        assert_eq!(round.iter().collect::<Vec<_>>(), [(&b"next"[..], "INFO")]);
        queue.take(&mut round);
        assert_eq!(round.iter().count(), 0);
    }

    #[test]
    fn a_full_queue_refuses_lines_until_the_writer_takes_them() {
        let queue = LineQueue::new(3);
        let pushed: Vec<bool> = (0..5)
            .map(|n| queue.push(n.to_string().as_bytes(), "INFO"))
            .collect();
        assert_eq!(pushed, [true, true, true, false, false]);
        let mut round = Lines::default();
        queue.take(&mut round);
        let kept: Vec<&[u8]> = round.iter().map(|(l, _)| l).collect();
        assert_eq!(kept, [b"0", b"1", b"2"]);
        assert!(queue.push(b"5", "INFO"), "room again once taken");
    }

    #[test]
    fn a_burst_does_not_keep_its_memory() {
        let queue = LineQueue::new(100);
        let big = vec![b'x'; KEPT_BYTES];
        assert!(queue.push(&big, "INFO") && queue.push(b"y", "INFO"));
        let mut round = Lines::default();
        queue.take(&mut round);
        assert!(round.bytes.capacity() > KEPT_BYTES);
        // The burst's buffer is given back when the writer brings it back empty.
        queue.take(&mut round);
        queue.take(&mut round);
        assert!(round.bytes.capacity() <= KEPT_BYTES);
        assert!(queue.lines.lock().unwrap().bytes.capacity() <= KEPT_BYTES);
    }

    #[test]
    fn the_writer_sees_when_the_logging_side_is_gone() {
        let queue = LineQueue::new(1);
        let writer = queue.clone();
        assert!(writer.has_writers());
        drop(queue);
        assert!(!writer.has_writers());
    }
}
