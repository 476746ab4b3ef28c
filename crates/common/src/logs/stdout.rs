//! JSON lines to stdout through a writer thread: a logging call never waits for a `write(2)` nor for the
//! stdout lock, and the lines of one round leave in one write. The queue is bounded (`log.buffer_lines`): a
//! reader too slow for it loses the newest lines, counted in [`ShipperStats::stdout_full`] (and so in
//! `telemetry.logs_dropped`).
//!
//! tracing-appender's non-blocking writer did this job before; it wakes its thread for every line (a futex
//! wake per logged call) and allocates its whole queue at start (~320 KB of an idle process at 10,000 lines).
//! This one takes its queue every [`super::DRAIN_INTERVAL`], and its queue ([`LineQueue`]) holds the lines
//! themselves, copied into one buffer: no allocation per line, no slot allocated before a line needs it.

use std::{
    io::Write,
    sync::{Arc, atomic::Ordering},
};

use super::{ShipperStats, Worker, drain, queue::LineQueue};

/// Bytes the writer thread gathers before a `write(2)`; what a round took is written at its end anyway.
const WRITE_BUFFER: usize = 64 * 1024;

/// The logging side of the stdout writer: a bounded queue of lines.
pub(super) struct Stdout {
    queue: LineQueue,
    stats: Arc<ShipperStats>,
}

impl Stdout {
    /// Starts the writer thread (`keel-stdout`), writing to `out`, with room for `buffer_lines` lines waiting.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub(super) fn start(
        out: impl Write + Send + 'static,
        buffer_lines: usize,
        stats: Arc<ShipperStats>,
    ) -> std::io::Result<(Self, Worker)> {
        let queue = LineQueue::new(buffer_lines);
        let lines = queue.clone();
        let worker = Worker::spawn("keel-stdout", move |stop| {
            let mut out = std::io::BufWriter::with_capacity(WRITE_BUFFER, out);
            drain(
                &lines,
                stop,
                &mut out,
                |out, line, _| {
                    let _ = out.write_all(line);
                    let _ = out.write_all(b"\n");
                },
                |out| {
                    let _ = out.flush();
                },
            );
        })?;
        Ok((Self { queue, stats }, worker))
    }

    /// Queues a copy of `line` (one JSON line, without its newline); a full queue drops it, counted.
    pub(super) fn offer(&self, line: &[u8]) {
        if !self.queue.push(line, "") {
            self.stats.stdout_full.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    pub(in crate::logs) struct Buffer(pub(in crate::logs) Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_queue_drops_new_lines_and_counts_them() {
        let queue = LineQueue::new(3);
        let stats = Arc::new(ShipperStats::default());
        let stdout = Stdout {
            queue: queue.clone(),
            stats: stats.clone(),
        };
        for n in 0..5 {
            stdout.offer(n.to_string().as_bytes());
        }
        assert_eq!(stats.stdout_full.load(Ordering::Relaxed), 2);
        assert_eq!(stats.dropped(), 2, "in the total of lines lost");
        let mut round = super::super::queue::Lines::default();
        queue.take(&mut round);
        let kept: Vec<&[u8]> = round.iter().map(|(line, _)| line).collect();
        assert_eq!(kept, [b"0", b"1", b"2"]);
    }

    #[test]
    fn the_writer_thread_writes_every_line_in_order_and_what_is_queued_when_stopped() {
        let stats = Arc::new(ShipperStats::default());
        let buffer = Buffer::default();
        let (stdout, worker) = Stdout::start(buffer.clone(), 100, stats.clone()).unwrap();
        for n in 0..50 {
            stdout.offer(n.to_string().as_bytes());
        }
        worker.stop();
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let written: Vec<u32> = text.lines().map(|l| l.parse().unwrap()).collect();
        assert_eq!(written, (0..50).collect::<Vec<_>>());
        assert_eq!(stats.dropped(), 0);
    }
}
