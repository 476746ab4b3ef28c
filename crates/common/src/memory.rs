//! Gives the memory the allocator holds free back to the operating system, so an idle process is as small as
//! what it uses.
//!
//! glibc's malloc keeps what a process frees in its heaps (one arena per thread that allocates, up to eight
//! per core) and by itself returns only the top of the main heap, past 128 KB (`M_TRIM_THRESHOLD`). A service
//! frees most of what it allocates while it starts (settings, descriptors, Kafka's topic and group set-up) and
//! what a burst of calls allocated; without a trim all of it stays resident. `malloc_trim(3)` with a pad of 0
//! releases the free pages of every arena (`madvise(MADV_DONTNEED)`), which measured 0.25–0.5 MB of an idle
//! service of the `make up` cluster. [`spawn_trimmer`] does it [`FIRST_TRIM`] after start and every
//! [`TRIM_INTERVAL`] after: a walk of the free lists, well under a millisecond for a service's heaps.
//!
//! Elsewhere (musl, other systems) nothing is done: [`release_free_memory`] says so.

use std::time::Duration;

/// When the first trim runs, counted from [`spawn_trimmer`]: once the server is up and what starting freed is
/// free.
pub const FIRST_TRIM: Duration = Duration::from_secs(1);

/// How often the trimmer runs after the first trim.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Whether this build can give memory back (glibc on Linux).
pub const SUPPORTED: bool = cfg!(all(target_os = "linux", target_env = "gnu"));

/// Releases the allocator's free pages to the operating system now. Returns [`SUPPORTED`]; the allocator's
/// own answer (whether any memory was released) is not a failure.
#[allow(
    unsafe_code,
    reason = "the workspace's one exception: glibc's malloc_trim, no maintained crate wraps it"
)]
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes the arenas' locks itself and only releases free chunks; a pad of 0 keeps
        // nothing spare at the top of the heap.
        unsafe {
            libc::malloc_trim(0);
        }
        true
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Spawns a task that calls [`release_free_memory`] [`FIRST_TRIM`] from now, then every [`TRIM_INTERVAL`],
/// until the runtime stops. Runs on the runtime's threads: a trim is shorter than a call (module docs), and a
/// blocking thread for it would cost more memory than it gives back.
pub fn spawn_trimmer() {
    if !SUPPORTED {
        return;
    }
    tokio::spawn(async {
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + FIRST_TRIM, TRIM_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            release_free_memory();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `VmRSS` of this process, bytes.
    fn rss() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        kib * 1024
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_in_the_middle_of_the_heap_goes_back_to_the_system() {
        // 64 MB in 4 KB blocks, touched, then every block freed but the last: the heap's top stays in use,
        // so glibc returns none of it by itself.
        let mut blocks: Vec<Vec<u8>> = (0..16_384).map(|_| vec![1u8; 4096]).collect();
        let pin = blocks.pop();
        drop(blocks);
        let held = rss();
        assert!(release_free_memory());
        let after = rss();
        drop(pin);
        assert!(
            held.saturating_sub(after) > 32 << 20,
            "RSS {held} before the trim, {after} after: less than 32 MB given back"
        );
    }
}
