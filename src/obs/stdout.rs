//! Standard output and error that a closed pipe cannot crash: `switchyard run | head -30` and the like end quietly,
//! as Unix tools do, instead of panicking in `println!` (exit 101) or hanging.
//!
//! Once a write to standard output fails, output stops and the `on_closed` handler runs: `run` stops reading its
//! source and settles what is in flight, so the position it stores is exact; other commands exit at once with 0
//! (a broken pipe: the reader stopped reading) or 1 (any other write error).

use std::io::{self, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);
static ON_CLOSED: OnceLock<Box<dyn Fn() + Send + Sync>> = OnceLock::new();

/// What to do once standard output is closed, instead of exiting (set once, by `run`).
pub fn on_closed(handler: impl Fn() + Send + Sync + 'static) {
    let _ = ON_CLOSED.set(Box::new(handler));
}

/// Whether standard output was found closed.
pub fn is_closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

fn closed(err: &io::Error) {
    if CLOSED.swap(true, Ordering::Relaxed) {
        return;
    }
    match ON_CLOSED.get() {
        Some(handler) => handler(),
        None if err.kind() == io::ErrorKind::BrokenPipe => std::process::exit(0),
        None => {
            let _ = writeln!(io::stderr(), "switchyard: cannot write to standard output: {err}");
            std::process::exit(1)
        }
    }
}

/// Writes `args` to standard output (and flushes, so a line reaches a pipe when it is printed); nothing once closed.
pub fn write_fmt(args: std::fmt::Arguments<'_>) {
    if is_closed() {
        return;
    }
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        drop(out);
        closed(&e);
    }
}

/// Writes `args` to standard error, ignoring a closed stream (there is nowhere left to say so).
pub fn write_err(args: std::fmt::Arguments<'_>) {
    let _ = io::stderr().lock().write_fmt(args);
}

/// Standard output as a `Write`, for code that writes to any writer (admin commands, `replay`).
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if is_closed() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        io::stdout().lock().write(buf).inspect_err(closed)
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush().inspect_err(closed)
    }
}

/// `print!` that a closed standard output cannot crash.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::obs::stdout::write_fmt(format_args!($($arg)*)) };
}

/// `println!` that a closed standard output cannot crash.
#[macro_export]
macro_rules! outln {
    () => { $crate::obs::stdout::write_fmt(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::obs::stdout::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `eprintln!` that a closed standard error cannot crash.
#[macro_export]
macro_rules! errln {
    () => { $crate::obs::stdout::write_err(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::obs::stdout::write_err(format_args!("{}\n", format_args!($($arg)*))) };
}
