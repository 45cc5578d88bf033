//! Running the host tools (`ip`, `nft`, `tc`) the harness drives, with errors that say
//! which command failed and what it printed.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A host tool that exited non-zero or could not be started.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed: {detail}")]
pub struct CmdError {
    pub command: String,
    pub detail: String,
    /// What the command wrote to stderr (empty when it could not start).
    pub stderr: String,
}

pub(crate) fn display<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

/// Runs `program args…`, feeding `stdin` when given; returns stdout on success.
pub fn run_with_input<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    stdin: Option<&str>,
) -> Result<String, CmdError> {
    let command = display(program, args);
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| CmdError {
        command: command.clone(),
        detail: format!("cannot start: {e}"),
        stderr: String::new(),
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A short script; the child reads it all before writing much, so no deadlock.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| CmdError {
        command: command.clone(),
        detail: format!("cannot wait: {e}"),
        stderr: String::new(),
    })?;
    check(command, out)
}

pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String, CmdError> {
    run_with_input(program, args, None)
}

fn check(command: String, out: Output) -> Result<String, CmdError> {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let detail = if stderr.is_empty() {
            format!("{}", out.status)
        } else {
            format!("{}: {stderr}", out.status)
        };
        Err(CmdError {
            command,
            detail,
            stderr,
        })
    }
}

/// The full path of `tool` on `PATH` (plus the sbin directories a non-login root shell
/// may lack).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
