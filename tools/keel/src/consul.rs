//! The Consul agent the verbs read the catalog from (`/v1/catalog/services`, `/v1/health/service/:name`), with
//! errors that name its address and the setting to change.

use keel_common::{
    config::Secret,
    consul::{ConsulAgent, HealthEntry},
};

/// Where the Consul agent is.
#[derive(clap::Args, Debug, Clone)]
pub struct ConsulArgs {
    /// Consul agent's HTTP address (`host:port`).
    #[arg(long, env = "CONSUL_HTTP_ADDR", default_value = "127.0.0.1:8500")]
    pub consul: String,
    /// Consul ACL token.
    #[arg(
        long = "consul-token",
        env = "CONSUL_HTTP_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub token: String,
}

/// The agent, and its address for error messages.
pub struct Consul {
    agent: ConsulAgent,
    addr: String,
}

impl Consul {
    pub fn new(args: &ConsulArgs) -> Self {
        Self {
            agent: ConsulAgent::new(&args.consul, Secret::new(args.token.clone())),
            addr: args.consul.clone(),
        }
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("Consul at {} (--consul / CONSUL_HTTP_ADDR): {e}", self.addr)
    }

    /// Every service name in the catalog but Consul's own, sorted.
    ///
    /// # Errors
    /// The agent does not answer or refuses.
    pub async fn services(&self) -> anyhow::Result<Vec<String>> {
        let mut names = self
            .agent
            .catalog_services()
            .await
            .map_err(|e| self.unreachable(e))?;
        names.retain(|n| n != "consul");
        Ok(names)
    }

    /// Every instance of `name` in the cluster, whatever its checks say.
    ///
    /// # Errors
    /// The agent does not answer or refuses.
    pub async fn instances(&self, name: &str) -> anyhow::Result<Vec<HealthEntry>> {
        self.agent
            .health_service(name, false)
            .await
            .map_err(|e| self.unreachable(e))
    }
}
