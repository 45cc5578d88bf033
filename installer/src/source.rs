//! Where an unattended install finds its answer file, in this order:
//!
//! 1. `keel.answer=URL` on the kernel command line (`http://`, `https://` or `file://`;
//!    `keel.answer=none` turns unattended mode off and starts the dialog);
//! 2. a filesystem labelled `KEEL-ANSWER` (a USB stick, a partition, a second CD) holding
//!    `answer.toml`;
//! 3. `/keel/answer.toml` on the installer medium itself (added by remastering the ISO).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long the installer keeps trying to fetch an answer file while the network is not
/// there yet (DHCP still running, a switch port still coming up).
const FETCH_PATIENCE: Duration = Duration::from_secs(120);
const FETCH_RETRY_PAUSE: Duration = Duration::from_secs(3);

/// Whether a curl exit status means "the network or the server is not reachable yet" (worth
/// another try) rather than a definite answer such as an HTTP error or a malformed URL.
fn curl_exit_is_transient(code: i32) -> bool {
    // 6: cannot resolve the host, 7: cannot connect, 28: timeout, 35: TLS handshake,
    // 52: empty reply, 55/56: send/receive failure
    matches!(code, 6 | 7 | 28 | 35 | 52 | 55 | 56)
}

pub const ANSWER_LABEL: &str = "KEEL-ANSWER";
pub const ANSWER_NAME: &str = "answer.toml";
pub const LIVE_MEDIUM: &str = "/run/live/medium";

/// What the kernel command line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdlineAnswer {
    /// Nothing: look on a labelled filesystem, then on the medium.
    Search,
    /// `keel.answer=none`: interactive only.
    Disabled,
    Url(String),
}

pub fn parse_cmdline(cmdline: &str) -> Result<CmdlineAnswer, SourceError> {
    let mut found = CmdlineAnswer::Search;
    for word in cmdline.split_whitespace() {
        if let Some(v) = word.strip_prefix("keel.answer=") {
            found = match v {
                "none" | "off" => CmdlineAnswer::Disabled,
                url if ["http://", "https://", "file://"]
                    .iter()
                    .any(|s| url.starts_with(s)) =>
                {
                    CmdlineAnswer::Url(url.to_string())
                }
                other => return Err(SourceError::BadUrl(other.to_string())),
            };
        }
    }
    Ok(found)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerSource {
    Url(String),
    Label(String),
    Medium(PathBuf),
    File(PathBuf),
}

impl fmt::Display for AnswerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnswerSource::Url(u) => write!(f, "{u} (kernel command line)"),
            AnswerSource::Label(l) => write!(f, "{ANSWER_NAME} on the filesystem labelled {l}"),
            AnswerSource::Medium(p) => write!(f, "{} on the installer medium", p.display()),
            AnswerSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SourceError {
    #[error("keel.answer={0} on the kernel command line is not a URL: use http://, https://, file:// or none")]
    BadUrl(String),
    #[error("cannot fetch the answer file {url}: {detail}")]
    Fetch { url: String, detail: String },
    #[error("the filesystem labelled {label} ({device}) cannot be read: {detail}")]
    Label {
        label: String,
        device: String,
        detail: String,
    },
}

/// The outside world an answer search looks at.
pub trait SourceEnv {
    fn fetch(&self, url: &str) -> Result<String, String>;
    /// Device of the filesystem with this label, if any.
    fn device_by_label(&self, label: &str) -> Option<String>;
    /// Reads `name` from the filesystem on `device`.
    fn read_from_device(&self, device: &str, name: &str) -> Result<Option<String>, String>;
    fn read_file(&self, path: &Path) -> Option<String>;
}

/// Finds the answer file; `Ok(None)` means interactive.
pub fn find_answer(
    cmdline: &str,
    env: &dyn SourceEnv,
) -> Result<Option<(AnswerSource, String)>, SourceError> {
    match parse_cmdline(cmdline)? {
        CmdlineAnswer::Disabled => return Ok(None),
        CmdlineAnswer::Url(url) => {
            let text = env.fetch(&url).map_err(|detail| SourceError::Fetch {
                url: url.clone(),
                detail,
            })?;
            return Ok(Some((AnswerSource::Url(url), text)));
        }
        CmdlineAnswer::Search => {}
    }
    if let Some(device) = env.device_by_label(ANSWER_LABEL) {
        match env.read_from_device(&device, ANSWER_NAME) {
            Ok(Some(text)) => {
                return Ok(Some((AnswerSource::Label(ANSWER_LABEL.to_string()), text)))
            }
            Ok(None) => {}
            Err(detail) => {
                return Err(SourceError::Label {
                    label: ANSWER_LABEL.to_string(),
                    device,
                    detail,
                })
            }
        }
    }
    let on_medium = Path::new(LIVE_MEDIUM).join("keel").join(ANSWER_NAME);
    Ok(env
        .read_file(&on_medium)
        .map(|text| (AnswerSource::Medium(on_medium), text)))
}

/// The live system: curl for URLs, blkid and a read-only mount for labelled filesystems.
#[derive(Debug, Default)]
pub struct LiveEnv;

impl SourceEnv for LiveEnv {
    fn fetch(&self, url: &str) -> Result<String, String> {
        if let Some(path) = url.strip_prefix("file://") {
            return std::fs::read_to_string(path).map_err(|e| e.to_string());
        }
        // The live system's DHCP may still be running when the installer starts: curl's own
        // --retry does not count "no route" or "network unreachable" as transient, so the
        // installer keeps trying through those for a while itself.
        let started = Instant::now();
        loop {
            let out = Command::new("curl")
                .args([
                    "--fail",
                    "--silent",
                    "--show-error",
                    "--location",
                    "--max-time",
                    "60",
                    url,
                ])
                .output()
                .map_err(|e| format!("cannot run curl: {e}"))?;
            if out.status.success() {
                return String::from_utf8(out.stdout)
                    .map_err(|_| "the answer file is not UTF-8".to_string());
            }
            let error = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let transient = out.status.code().is_some_and(curl_exit_is_transient);
            if !transient || started.elapsed() >= FETCH_PATIENCE {
                return Err(error);
            }
            std::thread::sleep(FETCH_RETRY_PAUSE);
        }
    }

    fn device_by_label(&self, label: &str) -> Option<String> {
        let by_label = Path::new("/dev/disk/by-label").join(label);
        if by_label.exists() {
            return Some(by_label.display().to_string());
        }
        let out = Command::new("blkid").args(["-L", label]).output().ok()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !dev.is_empty()).then_some(dev)
    }

    fn read_from_device(&self, device: &str, name: &str) -> Result<Option<String>, String> {
        let mnt = Path::new("/run/keel/answer-media");
        std::fs::create_dir_all(mnt).map_err(|e| e.to_string())?;
        let st = Command::new("mount")
            .args(["-o", "ro", device, &mnt.display().to_string()])
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("mount failed ({st})"));
        }
        let text = std::fs::read_to_string(mnt.join(name)).ok();
        let _ = Command::new("umount").arg(mnt).status();
        Ok(text)
    }

    fn read_file(&self, path: &Path) -> Option<String> {
        std::fs::read_to_string(path).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::curl_exit_is_transient;

    #[test]
    fn only_unreachable_networks_and_servers_are_retried() {
        for code in [6, 7, 28, 56] {
            assert!(curl_exit_is_transient(code), "{code}");
        }
        // 22: an HTTP error (404, 403) with --fail; 3: a malformed URL; 1: unsupported protocol
        for code in [22, 3, 1] {
            assert!(!curl_exit_is_transient(code), "{code}");
        }
    }

    use super::*;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Fake {
        urls: BTreeMap<String, String>,
        label: Option<(String, Option<String>)>,
        files: BTreeMap<PathBuf, String>,
    }

    impl SourceEnv for Fake {
        fn fetch(&self, url: &str) -> Result<String, String> {
            self.urls.get(url).cloned().ok_or_else(|| "404".into())
        }
        fn device_by_label(&self, _label: &str) -> Option<String> {
            self.label.as_ref().map(|(d, _)| d.clone())
        }
        fn read_from_device(&self, _d: &str, _n: &str) -> Result<Option<String>, String> {
            Ok(self.label.as_ref().and_then(|(_, t)| t.clone()))
        }
        fn read_file(&self, path: &Path) -> Option<String> {
            self.files.get(path).cloned()
        }
    }

    fn medium() -> PathBuf {
        PathBuf::from("/run/live/medium/keel/answer.toml")
    }

    #[test]
    fn cmdline() {
        assert_eq!(parse_cmdline("boot=live quiet"), Ok(CmdlineAnswer::Search));
        assert_eq!(
            parse_cmdline("boot=live keel.answer=none"),
            Ok(CmdlineAnswer::Disabled)
        );
        assert_eq!(
            parse_cmdline("keel.answer=http://10.0.0.1/a.toml console=ttyS0"),
            Ok(CmdlineAnswer::Url("http://10.0.0.1/a.toml".into()))
        );
        assert!(matches!(
            parse_cmdline("keel.answer=ftp://x"),
            Err(SourceError::BadUrl(_))
        ));
    }

    #[test]
    fn url_wins_then_label_then_medium() {
        let mut env = Fake::default();
        env.urls.insert("http://h/a".into(), "U".into());
        env.label = Some(("/dev/sdb1".into(), Some("L".into())));
        env.files.insert(medium(), "M".into());
        let got = |cmd: &str, env: &Fake| find_answer(cmd, env).ok().flatten().map(|(_, t)| t);
        assert_eq!(got("keel.answer=http://h/a", &env).as_deref(), Some("U"));
        assert_eq!(got("boot=live", &env).as_deref(), Some("L"));
        env.label = Some(("/dev/sdb1".into(), None));
        assert_eq!(got("boot=live", &env).as_deref(), Some("M"));
        env.label = None;
        assert_eq!(got("boot=live", &env).as_deref(), Some("M"));
        assert_eq!(got("boot=live keel.answer=none", &env), None);
        env.files.clear();
        assert_eq!(got("boot=live", &env), None);
    }

    #[test]
    fn a_failed_fetch_is_an_error_not_a_silent_fallback() {
        let env = Fake::default();
        let e = find_answer("keel.answer=http://h/missing", &env).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot fetch the answer file http://h/missing: 404"),
            "{e}"
        );
    }

    #[test]
    fn file_urls_read_local_files() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("a.toml");
        std::fs::write(&p, "x = 1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            LiveEnv.fetch(&format!("file://{}", p.display())).as_deref(),
            Ok("x = 1")
        );
    }
}
