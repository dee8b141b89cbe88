//! The ground floor: what the launcher reads from and sets on the OS for measuring and fd
//! hygiene, written once so that `status`, `/metrics`, the stall watch and steering cannot
//! disagree. It owns:
//!
//! - `fd`: the close-on-exec and non-blocking flags of an fd;
//! - `tcp`: the one `getsockopt(TCP_INFO)` (a listener's accept-queue length and backlog);
//! - `proc`: a process's /proc/PID/stat (state, CPU ticks) and resident memory (statm), the
//!   page size and the clock tick.
//!
//! Nothing here imports anything else of the crate, so any module may build on it.

mod fd;
mod proc;
mod tcp;

pub use fd::{set_cloexec, set_nonblock};
pub use proc::{clock_ticks_per_second, group_rss, page_size, read_ticks, resident_pages, stat};
pub use tcp::{listener_queue, queue_len};
