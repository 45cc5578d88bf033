//! The host's systemd through its D-Bus API (zbus): the real [`UnitManager`]. Every zbus
//! call of Keel lives in this file; no `systemctl` subprocess.
//!
//! Keel uses two methods of `org.freedesktop.systemd1.Manager` on
//! `/org/freedesktop/systemd1` (org.freedesktop.systemd1(5)):
//!
//! * `LoadUnit(s name) → o unit`: the unit's object, loading its file if systemd has not
//!   yet. systemd answers for names it has no file for too, with an object whose
//!   `LoadState` is `not-found` (so does the stand-in of the tests below).
//! * `StartUnit(s name, s mode) → o job`: queues a start job and answers at once; mode
//!   `replace` replaces a conflicting queued job (a pending stop) instead of failing.
//!
//! and reads the `LoadState`, `ActiveState` and `SubState` properties of
//! `org.freedesktop.systemd1.Unit` on the unit's object
//! (`org.freedesktop.DBus.Properties.Get`, nothing cached: every read asks systemd).
//!
//! The bus connection is opened on first use and kept. A call that fails for any other
//! reason than an error reply (the bus restarted, the socket broke, a timeout) drops it,
//! so the next call connects again: the supervisor's next pass is the retry. Connecting and
//! every call time out after [`CALL_TIMEOUT`].

use std::time::Duration;

use zbus::proxy::CacheProperties;
use zbus::zvariant::OwnedObjectPath;

use crate::units::{UnitError, UnitManager, UnitState};

/// Longest a connection attempt or a call may take (libdbus's default reply timeout).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(25);

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1",
    gen_blocking = false
)]
trait Manager {
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1",
    gen_blocking = false
)]
trait Unit {
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
}

/// A zbus error as a source for [`UnitError`]. zbus's own messages already contain their
/// source's ("Failed to connect to address …: No such file or directory (os error 2)"), so
/// a chain of them would say it twice; this carries each part once.
fn dbus_error(e: &zbus::Error) -> Box<dyn std::error::Error + Send + Sync> {
    let mut text = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(source) = cur {
        let part = source.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cur = source.source();
    }
    text.into()
}

/// Which bus systemd is on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Bus {
    /// The system bus (`/run/dbus/system_bus_socket`, or `DBUS_SYSTEM_BUS_ADDRESS`).
    System,
    /// A D-Bus address (`unix:path=…`): a private bus with a stand-in, in tests.
    Address(String),
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bus::System => f.write_str("the system bus"),
            Bus::Address(a) => write!(f, "the bus at {a}"),
        }
    }
}

/// systemd over D-Bus. See the module documentation.
pub struct SystemdDbus {
    bus: Bus,
    conn: tokio::sync::Mutex<Option<zbus::Connection>>,
}

impl SystemdDbus {
    /// systemd on the system bus (PID 1's manager). Connects on first use.
    pub fn system() -> Self {
        Self::on(Bus::System)
    }

    /// A systemd (or a stand-in) on the bus at a D-Bus address such as
    /// `unix:path=/tmp/x/bus`. Connects on first use.
    pub fn at_address(address: &str) -> Self {
        Self::on(Bus::Address(address.to_string()))
    }

    fn on(bus: Bus) -> Self {
        Self {
            bus,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// The kept connection, or a new one.
    async fn connection(&self) -> Result<zbus::Connection, UnitError> {
        let mut kept = self.conn.lock().await;
        if let Some(conn) = kept.as_ref() {
            return Ok(conn.clone());
        }
        let connect_error = |source: Box<dyn std::error::Error + Send + Sync>| UnitError::Connect {
            bus: self.bus.to_string(),
            source,
        };
        let builder = match &self.bus {
            Bus::System => zbus::connection::Builder::system(),
            Bus::Address(a) => zbus::connection::Builder::address(a.as_str()),
        }
        .map_err(|e| connect_error(dbus_error(&e)))?
        .method_timeout(CALL_TIMEOUT);
        let conn = tokio::time::timeout(CALL_TIMEOUT, builder.build())
            .await
            .map_err(|_| {
                connect_error(format!("no answer in {} s", CALL_TIMEOUT.as_secs()).into())
            })?
            .map_err(|e| connect_error(dbus_error(&e)))?;
        tracing::debug!(bus = %self.bus, "connected to systemd's bus");
        *kept = Some(conn.clone());
        Ok(conn)
    }

    /// The error of a failed call; drops the connection unless systemd itself answered
    /// with an error (then the connection is fine).
    async fn call_failed(&self, operation: &'static str, unit: &str, e: zbus::Error) -> UnitError {
        if !matches!(e, zbus::Error::MethodError(..) | zbus::Error::FDO(_)) {
            tracing::debug!(bus = %self.bus, error = %e, "dropping the D-Bus connection after a failed call");
            *self.conn.lock().await = None;
        }
        UnitError::Call {
            operation,
            unit: unit.to_string(),
            source: dbus_error(&e),
        }
    }

    async fn manager(&self, conn: &zbus::Connection) -> zbus::Result<ManagerProxy<'static>> {
        ManagerProxy::builder(conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
    }
}

#[async_trait::async_trait]
impl UnitManager for SystemdDbus {
    async fn unit_state(&self, unit: &str) -> Result<UnitState, UnitError> {
        let conn = self.connection().await?;
        let path = async { self.manager(&conn).await?.load_unit(unit).await };
        let path = match path.await {
            Ok(path) => path,
            Err(e) => return Err(self.call_failed("LoadUnit", unit, e).await),
        };
        let read = async {
            let props = UnitProxy::builder(&conn)
                .path(path)?
                .cache_properties(CacheProperties::No)
                .build()
                .await?;
            Ok::<_, zbus::Error>(UnitState {
                load_state: props.load_state().await?,
                active_state: props.active_state().await?,
                sub_state: props.sub_state().await?,
            })
        };
        match read.await {
            Ok(state) => Ok(state),
            Err(e) => Err(self.call_failed("Properties.Get", unit, e).await),
        }
    }

    async fn start_unit(&self, unit: &str) -> Result<(), UnitError> {
        let conn = self.connection().await?;
        let job = async { self.manager(&conn).await?.start_unit(unit, "replace").await };
        match job.await {
            Ok(job) => {
                tracing::debug!(unit, job = %job.as_str(), "systemd queued a start job");
                Ok(())
            }
            Err(e) => Err(self.call_failed("StartUnit", unit, e).await),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The adapter against a minimal `org.freedesktop.systemd1` stand-in served with zbus on
    //! a private `dbus-daemon`: checks the wire names and signatures without systemd (the
    //! real one is exercised by the installer ISO's end-to-end test).

    use std::collections::BTreeMap;
    use std::io::{BufRead, Write};
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};

    use zbus::object_server::ObjectServer;

    use super::*;
    use crate::units::NOT_FOUND;

    type States = Arc<Mutex<BTreeMap<String, UnitState>>>;
    type Starts = Arc<Mutex<Vec<(String, String)>>>;

    #[derive(Debug, zbus::DBusError)]
    #[zbus(prefix = "org.freedesktop.systemd1")]
    enum StandInError {
        #[zbus(error)]
        ZBus(zbus::Error),
        NoSuchUnit(String),
    }

    /// `/org/freedesktop/systemd1/unit/<name, systemd's bus-label escaping>`.
    fn unit_path(name: &str) -> OwnedObjectPath {
        let label: String = name
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    char::from(b).to_string()
                } else {
                    format!("_{b:02x}")
                }
            })
            .collect();
        OwnedObjectPath::try_from(format!("/org/freedesktop/systemd1/unit/{label}"))
            .expect("object path")
    }

    struct StandInManager {
        states: States,
        starts: Starts,
    }

    #[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
    impl StandInManager {
        async fn load_unit(
            &self,
            name: &str,
            #[zbus(object_server)] server: &ObjectServer,
        ) -> zbus::fdo::Result<OwnedObjectPath> {
            let path = unit_path(name);
            // Like systemd: unknown names get an object too, whose LoadState is not-found.
            server
                .at(
                    path.clone(),
                    StandInUnit {
                        name: name.into(),
                        states: self.states.clone(),
                    },
                )
                .await?;
            Ok(path)
        }

        async fn start_unit(
            &self,
            name: &str,
            mode: &str,
        ) -> Result<OwnedObjectPath, StandInError> {
            self.starts
                .lock()
                .expect("lock")
                .push((name.into(), mode.into()));
            match self.states.lock().expect("lock").get_mut(name) {
                Some(state) => {
                    *state = UnitState::new("loaded", "active", "running");
                    Ok(
                        OwnedObjectPath::try_from("/org/freedesktop/systemd1/job/42")
                            .expect("object path"),
                    )
                }
                None => Err(StandInError::NoSuchUnit(format!("Unit {name} not found."))),
            }
        }
    }

    struct StandInUnit {
        name: String,
        states: States,
    }

    impl StandInUnit {
        fn state(&self) -> UnitState {
            self.states
                .lock()
                .expect("lock")
                .get(&self.name)
                .cloned()
                .unwrap_or_else(|| UnitState::new(NOT_FOUND, "inactive", "dead"))
        }
    }

    #[zbus::interface(name = "org.freedesktop.systemd1.Unit")]
    impl StandInUnit {
        #[zbus(property)]
        fn load_state(&self) -> String {
            self.state().load_state
        }
        #[zbus(property)]
        fn active_state(&self) -> String {
            self.state().active_state
        }
        #[zbus(property)]
        fn sub_state(&self) -> String {
            self.state().sub_state
        }
    }

    /// A private message bus: a `dbus-daemon` of this test's own, killed on drop.
    struct PrivateBus {
        child: std::process::Child,
        address: String,
    }

    impl Drop for PrivateBus {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn dbus_daemon() -> Option<PathBuf> {
        std::env::var_os("PATH")?
            .to_str()?
            .split(':')
            .map(|dir| Path::new(dir).join("dbus-daemon"))
            .find(|p| p.is_file())
    }

    /// Starts a bus listening on `dir/bus`; `None` (after saying so loudly) when
    /// `dbus-daemon` is not installed.
    fn private_bus(dir: &Path) -> Option<PrivateBus> {
        let Some(binary) = dbus_daemon() else {
            // Straight to stderr, past libtest's capture: a skipped test must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!! SKIPPED: dbus-daemon is not installed, so the D-Bus wire test of \
                 the systemd adapter did not run. Install it: `apt-get install dbus-daemon` \
                 (./scripts/install-deps does). !!!!!!!!\n"
            );
            return None;
        };
        let socket = dir.join("bus");
        let _ = std::fs::remove_file(&socket);
        let config = dir.join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .expect("write bus config");
        // Its complaints (it cannot raise its fd limit unprivileged, …) go to a file,
        // shown if it does not start.
        let log_path = dir.join("dbus-daemon.log");
        let log = std::fs::File::create(&log_path).expect("dbus-daemon log");
        let mut child = std::process::Command::new(binary)
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address=1"])
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start dbus-daemon");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the bus address");
        let address = line.trim().to_string();
        assert!(
            address.starts_with("unix:"),
            "dbus-daemon printed {line:?}; its log: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        Some(PrivateBus { child, address })
    }

    /// Serves the stand-in on the bus as `org.freedesktop.systemd1`.
    async fn stand_in(address: &str, states: &States, starts: &Starts) -> zbus::Connection {
        zbus::connection::Builder::address(address)
            .expect("address")
            .name("org.freedesktop.systemd1")
            .expect("name")
            .serve_at(
                "/org/freedesktop/systemd1",
                StandInManager {
                    states: states.clone(),
                    starts: starts.clone(),
                },
            )
            .expect("serve")
            .build()
            .await
            .expect("stand-in connects")
    }

    #[tokio::test]
    async fn talks_to_systemd_over_dbus() {
        let dir = tempfile::tempdir().expect("tmp");
        let Some(bus) = private_bus(dir.path()) else {
            return;
        };
        let states: States = Arc::default();
        let starts: Starts = Arc::default();
        states.lock().expect("lock").insert(
            "libvirtd.service".into(),
            UnitState::new("loaded", "inactive", "dead"),
        );
        let _systemd = stand_in(&bus.address, &states, &starts).await;
        let dbus = SystemdDbus::at_address(&bus.address);

        let state = dbus.unit_state("libvirtd.service").await.expect("state");
        assert_eq!(state, UnitState::new("loaded", "inactive", "dead"));

        dbus.start_unit("libvirtd.service").await.expect("start");
        assert_eq!(
            *starts.lock().expect("lock"),
            vec![("libvirtd.service".to_string(), "replace".to_string())]
        );
        let state = dbus.unit_state("libvirtd.service").await.expect("state");
        assert_eq!(state, UnitState::new("loaded", "active", "running"));

        // An unknown unit is a state, not an error; starting it is refused by "systemd".
        let state = dbus.unit_state("nosuch.service").await.expect("state");
        assert_eq!(state.load_state, NOT_FOUND);
        let err = dbus.start_unit("nosuch.service").await.unwrap_err();
        assert!(
            matches!(&err, UnitError::Call { operation: "StartUnit", unit, .. } if unit == "nosuch.service"),
            "{err:?}"
        );
        let chain = keel_base::error_chain(&err);
        assert!(
            chain.contains("org.freedesktop.systemd1.NoSuchUnit")
                && chain.contains("Unit nosuch.service not found."),
            "{chain}"
        );
        // A reply error keeps the connection.
        assert!(dbus.conn.lock().await.is_some());
    }

    #[tokio::test]
    async fn reconnects_when_the_bus_comes_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let address = format!("unix:path={}", dir.path().join("bus").display());
        if dbus_daemon().is_none() {
            private_bus(dir.path()); // says it is skipped
            return;
        }
        let dbus = SystemdDbus::at_address(&address);
        // No bus yet: a connection error, not a panic or a hang.
        let err = dbus.unit_state("libvirtd.service").await.unwrap_err();
        assert!(matches!(err, UnitError::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains(&address), "names the bus: {err}");
        let chain = keel_base::error_chain(&err);
        assert_eq!(
            chain.matches("No such file or directory").count(),
            1,
            "each part once: {chain}"
        );

        let states: States = Arc::default();
        let starts: Starts = Arc::default();
        states.lock().expect("lock").insert(
            "libvirtd.service".into(),
            UnitState::new("loaded", "active", "running"),
        );
        for round in 0..2 {
            let bus = private_bus(dir.path()).expect("bus");
            assert_eq!(bus.address.split(',').next(), Some(address.as_str()));
            let systemd = stand_in(&bus.address, &states, &starts).await;
            let state = dbus
                .unit_state("libvirtd.service")
                .await
                .unwrap_or_else(|e| panic!("round {round}: {}", keel_base::error_chain(&e)));
            assert_eq!(state.active_state, "active");
            // The bus goes away under a kept connection: the next call fails and drops
            // it, the one after that (next round, new bus) connects again.
            drop(systemd);
            drop(bus);
            let err = dbus.unit_state("libvirtd.service").await.unwrap_err();
            assert!(dbus.conn.lock().await.is_none(), "round {round}: {err:?}");
        }
    }
}
