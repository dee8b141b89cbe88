//! The pump threads: `log-out` and `log-err`, each an epoll loop over the worker pipes handed to
//! it (and, for `log-err`, the launcher's own log queue), writing whole lines to fd 1 or 2.

use super::lines::{Out, Stream};
use super::*;

/// A pump thread's state.
struct PumpThread {
    epoll: Epoll,
    wake: Arc<EventFd>,
    rx: Receiver<Msg>,
    /// `log-err` only: the launcher's own log lines.
    own: Option<Receiver<Vec<u8>>>,
    streams: HashMap<u64, Stream>,
    next_token: u64,
    out: Out<FdSink>,
    /// Finishing: stop at this instant, or when every stream reached EOF.
    finish_at: Option<Instant>,
    buf: Vec<u8>,
}

impl Pump {
    pub(super) fn start(name: &str, sink: FdSink, own: Option<Receiver<Vec<u8>>>) -> io::Result<Pump> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let wake = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?);
        epoll.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let mut t = PumpThread {
            epoll,
            wake: wake.clone(),
            rx,
            own,
            streams: HashMap::new(),
            next_token: 0,
            out: Out::new(sink),
            finish_at: None,
            buf: vec![0; READ_CHUNK],
        };
        std::thread::Builder::new().name(name.into()).spawn(move || {
            t.run();
            let _ = done_tx.send(());
        })?;
        Ok(Pump { tx, wake, done })
    }
}

impl PumpThread {
    fn run(&mut self) {
        let mut events = [EpollEvent::empty(); 64];
        loop {
            let timeout = match self.finish_at {
                None => EpollTimeout::NONE,
                Some(at) => {
                    let ms = at.saturating_duration_since(Instant::now()).as_millis().min(1000) as u16;
                    EpollTimeout::from(ms)
                }
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => {
                    direct(format!("reuse-launch: error: log thread: epoll_wait: {e}\n").as_bytes());
                    std::thread::sleep(Duration::from_millis(100));
                    0
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    WAKE => {
                        let _ = self.wake.read();
                    }
                    token => self.read(token),
                }
            }
            self.take_messages();
            self.out.flush();
            if let Some(at) = self.finish_at {
                if self.streams.is_empty() || Instant::now() >= at {
                    for (_, mut s) in self.streams.drain() {
                        s.end(&mut self.out);
                    }
                    self.take_messages();
                    self.out.flush();
                    return;
                }
            }
        }
    }

    /// One read from the stream `token`; at EOF (or an error) its last line and its end.
    fn read(&mut self, token: u64) {
        let Some(s) = self.streams.get_mut(&token) else { return };
        let Some(fd) = s.fd.as_ref() else { return };
        match nix::unistd::read(fd, &mut self.buf) {
            Ok(0) => {}
            Ok(n) => return s.feed(&self.buf[..n], &mut self.out),
            Err(Errno::EAGAIN | Errno::EINTR) => return,
            Err(_) => {}
        }
        let _ = self.epoll.delete(fd);
        forget(fd.as_raw_fd());
        s.end(&mut self.out);
        self.streams.remove(&token);
    }

    /// New pipes, the finish order, and the launcher's own log lines.
    fn take_messages(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Pipe(stream) => {
                    let token = self.next_token;
                    self.next_token += 1;
                    let Some(fd) = stream.fd.as_ref() else { continue };
                    match self.epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token)) {
                        Ok(()) => {
                            self.streams.insert(token, stream);
                        }
                        Err(e) => direct(format!("reuse-launch: error: log thread: epoll_ctl: {e}\n").as_bytes()),
                    }
                }
                Msg::Finish => self.finish_at = Some(Instant::now() + DRAIN),
            }
        }
        if let Some(own) = &self.own {
            while let Ok(line) = own.try_recv() {
                self.out.line(&[&line]);
            }
            if let Some(counter) = OWN.get() {
                let dropped = counter.dropped.swap(0, Ordering::Relaxed);
                if dropped > 0 {
                    let note = format!(
                        "reuse-launch: warn: {dropped} log lines of the launcher were dropped: its stderr was not being read\n"
                    );
                    self.out.line(&[note.as_bytes()]);
                }
            }
        }
    }
}
