//! What the fault tests break: a private NATS or Redis server the test can stop and start
//! again on the same port, and a TCP link between a node and a service that the test can cut
//! and restore. The shared services on the standard ports are never touched, so the other
//! tests running beside these see no fault.

use std::net::SocketAddr;
use std::process::Stdio;

use anyhow::Context as _;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// A service process of the test's own (nats-server or redis-server) on a port chosen once,
/// so clients reconnect to the same address after a restart.
pub struct Service {
    program: &'static str,
    args: Vec<String>,
    pub port: u16,
    child: Option<Child>,
}

impl Service {
    /// nats-server on a free port (no JetStream: Ampora's bus does not use it).
    pub async fn nats() -> anyhow::Result<Self> {
        let port = free_port()?;
        let args = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ];
        Self::start("nats-server", args, port).await
    }

    /// redis-server on a free port, keeping nothing on disk: a restart comes back empty.
    pub async fn redis() -> anyhow::Result<Self> {
        let port = free_port()?;
        let args = [
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .map(String::from)
        .to_vec();
        Self::start("redis-server", args, port).await
    }

    async fn start(program: &'static str, args: Vec<String>, port: u16) -> anyhow::Result<Self> {
        let mut s = Self {
            program,
            args,
            port,
            child: None,
        };
        s.restart().await?;
        Ok(s)
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Kills the process (SIGKILL: nothing said goodbye) and waits until the port is closed.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        crate::eventually("service port closed", crate::DEADLINE, || async {
            Ok(TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_err()
                .then_some(()))
        })
        .await
    }

    /// Starts the process (again) on its port and waits until it accepts connections.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let child = Command::new(self.program)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} (is it installed?)", self.program))?;
        self.child = Some(child);
        crate::eventually("service accepting", crate::DEADLINE, || async {
            Ok(TcpStream::connect(("127.0.0.1", self.port))
                .await
                .ok()
                .map(|_| ()))
        })
        .await
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A TCP relay to one service that the test can cut: a cut resets every relayed connection
/// and refuses new ones (accepted, then reset at once) until restored, as a network partition
/// or a dead host looks to the client.
pub struct Link {
    pub addr: SocketAddr,
    up: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    pub async fn to(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (up, _) = watch::channel(true);
        let watch = up.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut up = watch.subscribe();
                if !*up.borrow_and_update() {
                    reset(client);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        reset(client);
                        return;
                    };
                    relay(client, server, up).await;
                });
            }
        });
        Ok(Self { addr, up, task })
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// Copies both ways until either side ends or the link is cut; a cut resets both sides.
async fn relay(mut client: TcpStream, mut server: TcpStream, mut up: watch::Receiver<bool>) {
    let was_cut = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
        _ = up.wait_for(|up| !*up) => true,
    };
    if was_cut {
        reset(client);
        reset(server);
    } else {
        let _ = client.shutdown().await;
        let _ = server.shutdown().await;
    }
}

/// Closes with RST rather than FIN, as a vanished peer looks.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
