//! The `metrics-render` thread and the batches of scrapes it serves: `/metrics` reads /proc
//! and a socket option per listener, which the event loop ([`super::server`]) must not wait
//! for. The loop asks for a page for each scrape ([`Renderer::want`]); when the thread is free,
//! every scrape waiting gets the next page ([`Renderer::kick`]), one render for all of them,
//! shared without a copy; the thread wakes the loop through an eventfd when it is done
//! ([`Renderer::pages`]). A render that panics answers 500, and the thread goes on.

use std::io;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::http::Response;

/// The loop's end of the render thread (see the module docs).
pub struct Renderer {
    wake: Arc<EventFd>,
    jobs: Sender<()>,
    done: Receiver<Arc<[u8]>>,
    /// Connection tokens waiting for the next render, and those of the render under way.
    waiting: Vec<u64>,
    under_way: Option<Vec<u64>>,
}

impl Renderer {
    /// Start the thread, which answers each job with `render()`, encoded.
    pub fn start(render: impl Fn() -> Response + Send + 'static) -> io::Result<Renderer> {
        let wake = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?);
        let (jobs, job_rx) = crossbeam_channel::unbounded::<()>();
        let (page_tx, done) = crossbeam_channel::unbounded::<Arc<[u8]>>();
        let waker = wake.clone();
        std::thread::Builder::new().name("metrics-render".into()).spawn(move || {
            for () in job_rx {
                let page = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&render))
                    .unwrap_or_else(|_| Response::text(500, "rendering /metrics failed\n".into()));
                if page_tx.send(page.encode().into()).is_err() {
                    return;
                }
                let _ = waker.write(1);
            }
        })?;
        Ok(Renderer { wake, jobs, done, waiting: Vec::new(), under_way: None })
    }

    /// Readable when a page is done (for the loop's epoll set).
    pub fn fd(&self) -> &EventFd {
        &self.wake
    }

    /// Connection `token` wants the next page.
    pub fn want(&mut self, token: u64) {
        self.waiting.push(token);
    }

    /// If the thread is free, start a render for every waiting token that `still` wants one.
    /// Err: the thread is gone; these tokens will get no page.
    pub fn kick(&mut self, still: impl Fn(u64) -> bool) -> Result<(), Vec<u64>> {
        if self.under_way.is_some() || self.waiting.is_empty() {
            return Ok(());
        }
        let batch: Vec<u64> = self.waiting.drain(..).filter(|t| still(*t)).collect();
        if batch.is_empty() {
            return Ok(());
        }
        if self.jobs.send(()).is_err() {
            return Err(batch);
        }
        self.under_way = Some(batch);
        Ok(())
    }

    /// The pages done since the last call, each with the tokens it is for.
    pub fn pages(&mut self) -> Vec<(Arc<[u8]>, Vec<u64>)> {
        let _ = self.wake.read();
        let mut out = Vec::new();
        while let Ok(page) = self.done.try_recv() {
            out.push((page, self.under_way.take().unwrap_or_default()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    fn pages_within(r: &mut Renderer, timeout: Duration) -> Vec<(Arc<[u8]>, Vec<u64>)> {
        let end = Instant::now() + timeout;
        loop {
            let p = r.pages();
            if !p.is_empty() || Instant::now() > end {
                return p;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn one_render_for_every_scrape_waiting_and_the_next_for_later_ones() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let mut r = Renderer::start(move || {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            Response::text(200, format!("render {n}\n"))
        })
        .unwrap();
        for t in 10..15 {
            r.want(t);
        }
        r.kick(|t| t != 12).unwrap();
        r.want(20);
        r.kick(|_| true).unwrap(); // busy: 20 waits for the next render
        let got = pages_within(&mut r, Duration::from_secs(10));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, vec![10, 11, 13, 14], "12 no longer wanted one");
        assert!(got[0].0.ends_with(b"render 1\n"));
        r.kick(|_| true).unwrap();
        let got = pages_within(&mut r, Duration::from_secs(10));
        assert_eq!(got[0].1, vec![20]);
        assert!(got[0].0.ends_with(b"render 2\n"));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_render_that_panics_answers_500_and_the_thread_goes_on() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let mut r = Renderer::start(move || {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("a bug in a render");
            }
            Response::text(200, "fine\n".into())
        })
        .unwrap();
        r.want(1);
        r.kick(|_| true).unwrap();
        let got = pages_within(&mut r, Duration::from_secs(10));
        assert!(got[0].0.starts_with(b"HTTP/1.1 500 "));
        r.want(2);
        r.kick(|_| true).unwrap();
        assert!(pages_within(&mut r, Duration::from_secs(10))[0].0.starts_with(b"HTTP/1.1 200 "));
    }
}
