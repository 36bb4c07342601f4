//! What this machine charges for the kernel work every Fluxbase path is made of, so that a
//! change in a benchmark's ratio can be told apart from a change in the host (docs/benchmarks.md,
//! "The host"). No Fluxbase code runs here; it takes a few seconds.
//!
//! - **Wake-up round trip**: two threads pinned to one core, then to two, pass a byte back and
//!   forth over a Unix socket pair; µs per round trip. Across cores each hop wakes a thread whose
//!   core went idle: on a virtual machine that is an interrupt to a halted virtual CPU.
//! - **Small messages, one `send()` each** (how a walsender sends changes, one per row): a
//!   writer thread sends `HOST_MESSAGES` 80-byte messages to a reader pinned to the other core,
//!   over loopback TCP (`TCP_NODELAY`, as PostgreSQL sets it) and over a Unix socket pair, with a
//!   gap of 0 or 20 µs (spun) between messages, the reader either waiting on the socket (woken as
//!   messages come) or draining it every millisecond (never waiting on it). Printed: the writer's
//!   and the reader's CPU per message (from `/proc/thread-self/schedstat`).
//!
//! Needs two cores; with one, the cross-core lines are skipped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fluxbase_bench::env_or;

const MESSAGE: usize = 80;

fn pin(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    // Unpinned, the figures are only less sharp: not a reason to stop.
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

/// Nanoseconds this thread has run (the first field of its schedstat).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn wake_round_trip(a: usize, b: usize, trips: usize) -> Result<f64> {
    let (mut left, mut right) = UnixStream::pair()?;
    let echo = thread::spawn(move || -> std::io::Result<()> {
        pin(b);
        let mut byte = [0u8; 1];
        for _ in 0..trips {
            right.read_exact(&mut byte)?;
            right.write_all(&byte)?;
        }
        Ok(())
    });
    pin(a);
    let mut byte = [7u8; 1];
    let start = Instant::now();
    for _ in 0..trips {
        left.write_all(&byte)?;
        left.read_exact(&mut byte)?;
    }
    let per = start.elapsed().as_secs_f64() * 1e6 / trips as f64;
    echo.join().expect("echo thread")?;
    Ok(per)
}

trait Pipe: Read + Write + Send + 'static {
    fn nonblocking(&self, on: bool) -> std::io::Result<()>;
}
impl Pipe for TcpStream {
    fn nonblocking(&self, on: bool) -> std::io::Result<()> {
        self.set_nonblocking(on)
    }
}
impl Pipe for UnixStream {
    fn nonblocking(&self, on: bool) -> std::io::Result<()> {
        self.set_nonblocking(on)
    }
}

/// Writer's and reader's CPU µs per message.
fn stream_of_messages<P: Pipe>(
    mut writer: P,
    mut reader: P,
    messages: usize,
    gap: Duration,
    drain: bool,
) -> Result<(f64, f64)> {
    let total = messages * MESSAGE;
    let read = thread::spawn(move || -> std::io::Result<u64> {
        pin(1);
        let cpu = thread_cpu_ns();
        reader.nonblocking(drain)?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        while got < total {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(1))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(thread_cpu_ns() - cpu)
    });
    pin(0);
    let message = [b'x'; MESSAGE];
    let cpu = thread_cpu_ns();
    let mut spun = Duration::ZERO;
    for _ in 0..messages {
        writer.write_all(&message)?;
        if !gap.is_zero() {
            let start = Instant::now();
            while start.elapsed() < gap {}
            spun += start.elapsed();
        }
    }
    let writer_ns = (thread_cpu_ns() - cpu).saturating_sub(spun.as_nanos() as u64);
    let reader_ns = read.join().expect("reader thread")?;
    let per = |ns: u64| ns as f64 / 1e3 / messages as f64;
    Ok((per(writer_ns), per(reader_ns)))
}

fn tcp_pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    server.set_nodelay(true)?;
    client.set_nodelay(true)?;
    Ok((server, client))
}

fn main() -> Result<()> {
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let trips = env_or("HOST_TRIPS", 50_000) as usize;
    let messages = env_or("HOST_MESSAGES", 100_000) as usize;
    println!("host: {cores} cores; {trips} round trips, {messages} messages of {MESSAGE} bytes");
    println!("wake-up round trip (Unix socket pair, µs):");
    println!(
        "  one core            : {:7.2}",
        wake_round_trip(0, 0, trips)?
    );
    if cores < 2 {
        println!("  (one core: the cross-core figures need two)");
        return Ok(());
    }
    println!(
        "  two cores           : {:7.2}",
        wake_round_trip(0, 1, trips)?
    );
    println!("small messages, one send() each, reader on the other core (CPU µs per message):");
    println!("  transport  gap    reader               writer   reader");
    for gap_us in [0u64, 20] {
        let gap = Duration::from_micros(gap_us);
        for drain in [false, true] {
            let how = if drain {
                "drains every 1 ms"
            } else {
                "woken per message"
            };
            let (w, r) = {
                let (a, b) = tcp_pair().context("loopback TCP")?;
                stream_of_messages(a, b, messages, gap, drain)?
            };
            println!("  tcp      {gap_us:3} µs   {how:18}  {w:7.2}  {r:7.2}");
            let (a, b) = UnixStream::pair()?;
            let (w, r) = stream_of_messages(a, b, messages, gap, drain)?;
            println!("  unix     {gap_us:3} µs   {how:18}  {w:7.2}  {r:7.2}");
        }
    }
    Ok(())
}
