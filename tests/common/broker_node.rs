//! A RabbitMQ node of the test's own — its own node name, AMQP and
//! distribution ports, data dir and Erlang cookie — so a test can stop,
//! start or restart a broker without touching the shared one on 5672 (or
//! other tests). Stopped and removed on drop, also when the test fails.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::Command;

/// How long a node may take to boot, stop or start its app.
const NODE_WAIT: Duration = Duration::from_secs(120);

/// Where the RabbitMQ server scripts are: `$RABBITMQ_BIN_DIR`, else the
/// Debian package's (run directly: the `/usr/sbin` wrappers switch to the
/// `rabbitmq` user and the shared node's cookie).
fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("RABBITMQ_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/rabbitmq/bin"));
    dir.join(name)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

pub struct BrokerNode {
    pub name: String,
    pub port: u16,
    dir: TempDir,
}

impl BrokerNode {
    /// Boots a fresh node and waits until it serves AMQP.
    pub async fn start() -> BrokerNode {
        let dir = tempfile::Builder::new()
            .prefix("cwtest-rabbit")
            .tempdir()
            .unwrap();
        let port = free_port();
        let dist_port = free_port();
        let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
        let name = format!("cwtest-{id}@localhost");
        let d = dir.path().to_path_buf();
        std::fs::write(
            d.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\n"),
        )
        .unwrap();
        std::fs::write(d.join("enabled_plugins"), "[].\n").unwrap();
        let cookie = d.join(".erlang.cookie");
        std::fs::write(&cookie, format!("cwtest{id}")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).unwrap();
        let node = BrokerNode { name, port, dir };
        let mut server = node.command("rabbitmq-server");
        server
            .arg("-detached")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"));
        let status = tokio::time::timeout(NODE_WAIT, server.status())
            .await
            .expect("rabbitmq-server -detached returns")
            .expect("rabbitmq-server runs");
        assert!(status.success(), "rabbitmq-server -detached: {status}");
        // The node registers with epmd a moment after `-detached` returns:
        // ask until it answers, then until it has booted.
        let deadline = tokio::time::Instant::now() + NODE_WAIT;
        while node
            .try_ctl(&["await_startup", "--timeout", "60"])
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the test's RabbitMQ node did not boot (logs in {})",
                node.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        node
    }

    /// Runs one of the node's scripts with its own home (cookie), node name
    /// and no shared env file.
    fn command(&self, script: &str) -> Command {
        let mut cmd = Command::new(bin(script));
        cmd.current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.path().join("none.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// `rabbitmqctl -n <node> args…`, bounded; panics if it fails.
    pub async fn ctl(&self, args: &[&str]) -> String {
        self.try_ctl(args)
            .await
            .unwrap_or_else(|e| panic!("rabbitmqctl {args:?}: {e}"))
    }

    async fn try_ctl(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = self.command("rabbitmqctl");
        cmd.arg("-n").arg(&self.name).args(args);
        let out = tokio::time::timeout(NODE_WAIT, cmd.output())
            .await
            .map_err(|_| "did not return".to_string())?
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The broker goes away: every connection drops, AMQP is refused.
    pub async fn stop_app(&self) {
        self.ctl(&["stop_app"]).await;
    }

    /// The broker comes back with its durable exchanges, queues and
    /// persistent messages.
    pub async fn start_app(&self) {
        self.ctl(&["start_app"]).await;
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        // Blocking on purpose: the node must be gone before its dir is.
        let _ = std::process::Command::new("timeout")
            .arg("30")
            .arg(bin("rabbitmqctl"))
            .args(["-n", &self.name, "stop"])
            .current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.path().join("none.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // If it would not stop, do not leave it running.
        let _ = std::process::Command::new("pkill")
            .args([
                "-9",
                "-f",
                self.name.split('@').next().unwrap_or(&self.name),
            ])
            .status();
    }
}
