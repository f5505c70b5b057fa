//! Workflows defined as data (docs/contract.md §8): JSON definitions stored in PostgreSQL
//! and versioned by content, whose steps are signed HTTP calls to a backend's own services.
//!
//! - [`spec`]: the definition as `PUT` takes it, and the checks naming each refused field;
//! - [`compile`]: a definition made into an engine [`Workflow`] (schema, secrets, steps);
//! - `call`: the HTTP step (request, signature, how the answer is read);
//! - [`store`]: its SQL.
//!
//! [`Definitions`] is what the server and the API use: it stores versions, and keeps the
//! engine of this instance running every stored version (at start, when any instance
//! stores or deletes one, and every [`REFRESH_EVERY`] in case a notification was missed).

mod call;
pub mod compile;
pub mod spec;
pub mod store;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use call::{MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES};
pub use spec::{Definition, Environment, MAX_DEFINITION_BYTES, Refusal, Vars};
pub use store::VersionRow;

use crate::engine::{Engine, EngineError, Source, Workflow};

/// How often every instance reloads the stored definitions even without a notification.
pub const REFRESH_EVERY: Duration = Duration::from_secs(30);

/// Why a definition operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DefinedError {
    /// The definition cannot work: the field and why.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The name is a workflow compiled into the server.
    #[error("`{0}` is a built-in workflow; a definition needs another name")]
    BuiltIn(String),
    /// No such definition or version.
    #[error("workflow definition `{0}` not found")]
    NotFound(String),
    /// Unfinished runs use the version.
    #[error("version {version} of `{name}` has {unfinished} unfinished run(s); it can be deleted once they finish")]
    InUse {
        /// The workflow.
        name: String,
        /// The version.
        version: i32,
        /// How many runs.
        unfinished: i64,
    },
    /// The engine refused the compiled workflow.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// A stored version, as the API answers it.
#[derive(Debug, Clone, Serialize)]
pub struct StoredDefinition {
    /// The workflow's name.
    pub name: String,
    /// The version.
    pub version: i32,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
    /// The definition.
    #[serde(flatten)]
    pub definition: Definition,
}

impl TryFrom<store::StoredRow> for StoredDefinition {
    type Error = Refusal;

    fn try_from(row: store::StoredRow) -> Result<Self, Refusal> {
        Ok(Self {
            definition: spec::parse(&row.definition)?,
            name: row.name,
            version: row.version,
            created_at: row.created_at,
        })
    }
}

/// The outcome of a `PUT`.
#[derive(Debug, Clone)]
pub struct Put {
    /// The version stored (or the newest, when the content did not change).
    pub stored: StoredDefinition,
    /// Whether a new version was created.
    pub created: bool,
}

/// Stores definitions and keeps this instance's engine running every stored version.
#[derive(Clone)]
pub struct Definitions {
    engine: Engine,
    env: Environment,
    client: reqwest::Client,
    /// Held while this instance changes which versions it runs, so a refresh that read the
    /// stored versions just before a `PUT` here committed cannot drop the version it added.
    changing: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Definitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Definitions").field("env", &self.env).finish()
    }
}

impl Definitions {
    /// Definitions for `engine`, reaching what `env` allows.
    pub fn new(engine: Engine, env: Environment) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            // A participant that redirects is refused, not followed (§8: no SSRF by redirect).
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("sagaflow/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            engine,
            env,
            client,
            changing: Default::default(),
        })
    }

    /// Checks and stores a definition: a new version when its content differs from the
    /// newest one's; this instance runs it before the answer.
    pub async fn put(&self, name: &str, body: &Value) -> Result<Put, DefinedError> {
        if let Some(existing) = self.engine.workflow(name)
            && existing.source() == Source::Builtin
        {
            return Err(DefinedError::BuiltIn(name.to_string()));
        }
        let size = body.to_string().len();
        if size > MAX_DEFINITION_BYTES {
            return Err(Refusal::new(
                ".",
                format!("the definition is {size} bytes, over the limit of {MAX_DEFINITION_BYTES} bytes"),
            )
            .into());
        }
        let definition = spec::parse(body)?;
        // Everything is checked before anything is stored (the version is not known yet).
        compile::compile(name, 1, &definition, &self.env, &self.client)?;
        let normalized = spec::canonical(&serde_json::to_value(&definition).map_err(|e| {
            DefinedError::Engine(EngineError::Internal(format!(
                "a parsed definition does not serialize: {e}"
            )))
        })?);
        let hash = content_hash(&normalized);
        let _changing = self.changing.lock().await;
        let (version, created, created_at) = store::upsert(self.engine.pool(), name, &hash, &normalized).await?;
        self.run_version(name, version, &definition).await?;
        Ok(Put {
            stored: StoredDefinition {
                name: name.to_string(),
                version,
                created_at,
                definition,
            },
            created,
        })
    }

    /// A stored version (the newest when `version` is `None`).
    pub async fn get(&self, name: &str, version: Option<i32>) -> Result<StoredDefinition, DefinedError> {
        let row = store::get(self.engine.pool(), name, version)
            .await?
            .ok_or_else(|| DefinedError::NotFound(not_found(name, version)))?;
        Ok(row.try_into()?)
    }

    /// The versions of a definition, newest first, with their unfinished runs.
    pub async fn versions(&self, name: &str) -> Result<Vec<VersionRow>, DefinedError> {
        let versions = store::versions(self.engine.pool(), name).await?;
        if versions.is_empty() {
            return Err(DefinedError::NotFound(name.to_string()));
        }
        Ok(versions)
    }

    /// Deletes a version no unfinished run uses; this instance stops running it.
    pub async fn delete(&self, name: &str, version: i32) -> Result<(), DefinedError> {
        let _changing = self.changing.lock().await;
        match store::delete(self.engine.pool(), name, version).await? {
            store::Deleted::Deleted => {
                self.engine.unregister(name, version);
                Ok(())
            }
            store::Deleted::NotFound => Err(DefinedError::NotFound(not_found(name, Some(version)))),
            store::Deleted::InUse(unfinished) => Err(DefinedError::InUse {
                name: name.to_string(),
                version,
                unfinished,
            }),
        }
    }

    /// Makes this instance run exactly the stored versions: loads the new ones, drops the
    /// deleted ones. A stored version this instance cannot run (a secret variable not set
    /// here) is logged and skipped: its runs wait for an instance that can.
    pub async fn refresh(&self) -> Result<usize, DefinedError> {
        let _changing = self.changing.lock().await;
        let rows = store::all(self.engine.pool()).await?;
        let mut loaded = 0;
        let stored: Vec<(String, i32)> = rows.iter().map(|r| (r.name.clone(), r.version)).collect();
        for row in rows {
            if self.engine.workflow_version(&row.name, row.version).is_some() {
                continue;
            }
            let (name, version) = (row.name.clone(), row.version);
            let definition = match spec::parse(&row.definition) {
                Ok(definition) => definition,
                Err(refusal) => {
                    warn!(workflow = %name, version, %refusal, "a stored definition cannot be read");
                    continue;
                }
            };
            match self.run_version(&name, version, &definition).await {
                Ok(()) => loaded += 1,
                Err(e) => {
                    warn!(workflow = %name, version, error = %e, "a stored definition cannot run on this instance")
                }
            }
        }
        for workflow in self.engine.workflows() {
            let key = (workflow.name().to_string(), workflow.version());
            if workflow.source() == Source::Defined && !stored.contains(&key) {
                self.engine.unregister(&key.0, key.1);
                info!(workflow = %key.0, version = key.1, "a deleted definition version is no longer run here");
            }
        }
        Ok(loaded)
    }

    /// Keeps this instance in step with the stored definitions until `stop`: reloads when
    /// any instance announces a change, and every [`REFRESH_EVERY`].
    pub async fn follow(self, stop: CancellationToken) {
        let mut listener = match PgListener::connect_with(self.engine.pool()).await {
            Ok(mut listener) => match listener.listen(store::CHANGED_CHANNEL).await {
                Ok(()) => Some(listener),
                Err(e) => {
                    warn!(error = %e, "cannot listen for definition changes; polling only");
                    None
                }
            },
            Err(e) => {
                warn!(error = %e, "cannot listen for definition changes; polling only");
                None
            }
        };
        loop {
            let changed = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                result = changed => if let Err(e) = result {
                    debug!(error = %e, "definition listener interrupted");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                },
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
            }
            if let Err(e) = self.refresh().await {
                warn!(error = %e, "reloading definitions failed");
            }
        }
    }

    /// Upserts every definition of a `--workflows` file: a JSON object of definitions by
    /// name. Returns each name with its version and whether it was new.
    pub async fn declare(&self, file: &Value) -> Result<Vec<(String, i32, bool)>, DefinedError> {
        let Some(map) = file.as_object() else {
            return Err(Refusal::new(".", "a workflows file is a JSON object of definitions by name").into());
        };
        let sorted: BTreeMap<&String, &Value> = map.iter().collect();
        let mut done = Vec::new();
        for (name, body) in sorted {
            let put = self.put(name, body).await.map_err(|e| match e {
                DefinedError::Refused(r) => {
                    DefinedError::Refused(Refusal::new(format!("{name}.{}", r.field), r.message))
                }
                other => other,
            })?;
            done.push((name.clone(), put.stored.version, put.created));
        }
        Ok(done)
    }

    async fn run_version(&self, name: &str, version: i32, definition: &Definition) -> Result<(), DefinedError> {
        if self.engine.workflow_version(name, version).is_some() {
            return Ok(());
        }
        let workflow: Workflow = compile::compile(name, version, definition, &self.env, &self.client)?;
        match self.engine.register(workflow).await {
            Ok(_) => Ok(()),
            // Another task of this instance loaded it meanwhile.
            Err(EngineError::Definition(crate::engine::DefinitionError::AlreadyRegistered(..))) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn not_found(name: &str, version: Option<i32>) -> String {
    match version {
        Some(v) => format!("{name}@{v}"),
        None => name.to_string(),
    }
}

fn content_hash(normalized: &Value) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(normalized.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
