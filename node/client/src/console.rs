//! `keel vm console`: attaches the terminal to a VM's serial console through the admin
//! socket's WebSocket route. On a terminal it switches to raw mode (so keys like Ctrl-C
//! reach the guest) and detaches on Ctrl-]; with a pipe on stdin it forwards the pipe and
//! keeps printing until the console closes.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The byte that detaches a terminal from the console (Ctrl-]), as with `virsh console`.
const DETACH: u8 = 0x1d;

/// Restores the terminal's mode when dropped.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> Result<Self> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).context("read the terminal mode")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).context("switch the terminal to raw mode")?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

/// Attaches stdin/stdout to the serial console of `vm`.
pub async fn attach(socket: &Path, vm: &str) -> Result<()> {
    if vm.is_empty()
        || !vm
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("{vm:?} is not a VM name or id");
    }
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot reach the node service at {}", socket.display()))?;
    let mut request = format!("ws://localhost{}", crate::paths::vm_console(vm, "serial"))
        .into_client_request()
        .context("build the console request")?;
    request.headers_mut().insert(
        "sec-websocket-protocol",
        keel_api_types::CONSOLE_PROTOCOL
            .parse()
            .context("console protocol header")?,
    );
    let (ws, _) = match tokio_tungstenite::client_async(request, stream).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(String::from))
                .unwrap_or(body);
            bail!("{message}");
        }
        Err(e) => return Err(e).context("console connection failed"),
    };
    let (mut sink, mut source) = ws.split();
    let tty = std::io::stdin().is_terminal();
    let _raw = if tty {
        eprintln!("keel: attached to {vm}'s serial console; press Ctrl-] to detach\r");
        Some(RawMode::enter()?)
    } else {
        None
    };
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let mut buf = vec![0u8; 4096];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => {
                let n = n.context("read stdin")?;
                if n == 0 {
                    stdin_open = false;
                    continue;
                }
                let data = &buf[..n];
                if tty {
                    if let Some(pos) = data.iter().position(|b| *b == DETACH) {
                        if pos > 0 {
                            sink.send(Message::Binary(data[..pos].to_vec().into())).await?;
                        }
                        break;
                    }
                }
                sink.send(Message::Binary(data.to_vec().into())).await.context("send to the console")?;
            }
            msg = source.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    stdout.write_all(&b).await?;
                    stdout.flush().await?;
                }
                Some(Ok(Message::Text(t))) => {
                    stdout.write_all(t.as_bytes()).await?;
                    stdout.flush().await?;
                }
                Some(Ok(Message::Close(frame))) => {
                    if let Some(f) = frame.filter(|f| !f.reason.is_empty()) {
                        drop(_raw);
                        bail!("the console closed: {}", f.reason);
                    }
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("console connection broke"),
                None => break,
            },
        }
    }
    let _ = sink.send(Message::Close(None)).await;
    if tty {
        eprintln!("\r\nkeel: detached");
    }
    Ok(())
}
