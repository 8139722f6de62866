//! Progress of long operations (scrub, resync): a bar redrawn in place on
//! a terminal, a plain line per tenth of the way otherwise.

use std::io::{IsTerminal, Write};

/// Reports `done` of `total` units on stderr.
pub struct Progress {
    label: &'static str,
    terminal: bool,
    /// The last tenth printed as a plain line.
    last_tenth: Option<u64>,
    drawn: bool,
}

impl Progress {
    pub fn new(label: &'static str) -> Progress {
        Progress {
            label,
            terminal: std::io::stderr().is_terminal(),
            last_tenth: None,
            drawn: false,
        }
    }

    /// Shows `done` of `total`, with a note (what was found so far).
    pub fn show(&mut self, done: u64, total: u64, note: &str) {
        let total = total.max(1);
        let done = done.min(total);
        let percent = done * 100 / total;
        let mut err = std::io::stderr().lock();
        if self.terminal {
            const WIDTH: u64 = 30;
            let filled = (done * WIDTH / total) as usize;
            let bar = format!(
                "{}{}",
                "#".repeat(filled),
                "-".repeat(WIDTH as usize - filled)
            );
            let _ = write!(
                err,
                "\r\x1b[2K{} [{bar}] {percent:>3}% {done}/{total} {note}",
                self.label
            );
            let _ = err.flush();
            self.drawn = true;
        } else {
            let tenth = percent / 10;
            if self.last_tenth != Some(tenth) {
                self.last_tenth = Some(tenth);
                let _ = writeln!(err, "{}: {percent}% ({done}/{total}) {note}", self.label);
            }
        }
    }

    /// Ends the bar's line.
    pub fn finish(&mut self) {
        if self.terminal && self.drawn {
            let _ = writeln!(std::io::stderr());
            self.drawn = false;
        }
    }
}
