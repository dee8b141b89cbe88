//! The steering programs run through a cBPF interpreter, and on real SO_REUSEPORT groups:
//! `interp` the interpreter (what the kernel lets a program see, and how it runs it),
//! `programs` every builder checked exhaustively through it, `groups` the programs attached
//! to real groups of listeners.

use super::bpf::*;
use super::programs::*;
use super::*;
use std::io;
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;

use socket2::{Domain, Socket, Type};

mod groups;
mod interp;
mod programs;
