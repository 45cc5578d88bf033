//! Progress output of an unattended install: the journal (stdout) and every active system
//! console (VGA and serial alike), so whoever watches whichever screen sees it.

use std::fs::{File, OpenOptions};
use std::io::Write;

pub struct Console {
    ttys: Vec<File>,
}

impl Console {
    /// Standard output only.
    pub fn stdout() -> Self {
        Self { ttys: Vec::new() }
    }

    /// Standard output and the consoles in `/sys/class/tty/console/active`.
    pub fn live() -> Self {
        let active = std::fs::read_to_string("/sys/class/tty/console/active").unwrap_or_default();
        let ttys = active
            .split_whitespace()
            .filter_map(|name| {
                OpenOptions::new()
                    .write(true)
                    .open(format!("/dev/{name}"))
                    .ok()
            })
            .collect();
        Self { ttys }
    }

    pub fn say(&mut self, text: &str) {
        println!("{text}");
        let _ = std::io::stdout().flush();
        for t in &mut self.ttys {
            let _ = writeln!(t, "{text}");
        }
    }
}
