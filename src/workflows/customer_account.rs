//! `create-customer-account`: registers a customer for an auth identity, after Medusa's
//! `createCustomerAccountWorkflow` (docs/contract.md §4), durably.
//!
//! Every domain write happens in the step's transaction, so it commits exactly once together
//! with the step's recorded outcome. The `customer.created` event waits in the outbox and is
//! released (completed) or discarded (anything else) in the transaction of the run's final
//! status change: consumers only ever see customers that exist.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::store::{self as domain, Link, ONE_ACCOUNT_PER_EMAIL, violates};
use crate::domain::{Customer, NewCustomer, check_email};
use crate::engine::definition::parse_input;
use crate::engine::{
    BatchItem, BatchStep, Compensate, Completed, FinishHook, InputError, RetryPolicy, RunStatus, Step, StepContext,
    StepDef, StepError, ValidateInput, Workflow,
};

/// The workflow's name.
pub const NAME: &str = "create-customer-account";
/// Step 1: checks the registration can proceed.
pub const VALIDATE: &str = "validate-customer-account-creation";
/// Step 2: inserts the customer and its addresses.
pub const CREATE_CUSTOMERS: &str = "create-customers";
/// Step 3: the hook point for the embedding application.
pub const CUSTOMERS_CREATED: &str = "customers-created";
/// Step 4: holds the `customer.created` event in the outbox.
pub const EMIT_CUSTOMER_CREATED: &str = "emit-customer-created";
/// Step 5: links the auth identity to the customer.
pub const SET_AUTH_APP_METADATA: &str = "set-auth-app-metadata";

/// The event emitted when a registration completes.
pub const CUSTOMER_CREATED_EVENT: &str = "customer.created";
/// The app-metadata key linking an identity to its customer.
pub const CUSTOMER_ID_KEY: &str = "customer_id";

/// Error messages, as Medusa's (its users match on them).
pub mod messages {
    /// No email in the customer data.
    pub const EMAIL_REQUIRED: &str = crate::domain::EMAIL_REQUIRED;
    /// An account already uses the email.
    pub const DUPLICATE_ACCOUNT: &str = "Customer with this email already has an account";
    /// The identity is already linked to a customer.
    pub const ALREADY_LINKED: &str = "Key customer_id already exists in app metadata";
}

/// The workflow input (field names as in Medusa).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCustomerAccountInput {
    /// The auth identity to attach the customer to (`authid_...`).
    #[serde(rename = "authIdentityId")]
    pub auth_identity_id: String,
    /// The customer to create.
    #[serde(rename = "customerData")]
    pub customer_data: NewCustomer,
}

impl ValidateInput for CreateCustomerAccountInput {
    fn validate(&self) -> Result<(), InputError> {
        if self.auth_identity_id.trim().is_empty() {
            return Err(InputError::new("authIdentityId", "must not be empty"));
        }
        self.customer_data.validate()
    }
}

/// What `set-auth-app-metadata` records, so its compensation can restore the old value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppMetadataChange {
    /// The identity.
    pub id: String,
    /// The key set.
    pub key: String,
    /// The value set.
    pub value: Value,
    /// The value before (absent: the key did not exist).
    #[serde(rename = "oldValue")]
    pub old_value: Option<Value>,
}

/// The workflow definition.
pub fn workflow() -> Workflow {
    let retry = RetryPolicy::attempts(3);
    Workflow::builder(NAME, 1)
        .description("Register a customer for an auth identity (Medusa's createCustomerAccountWorkflow), durably")
        .input_check(|input| {
            // serde would also read a struct from an array; say plainly what is expected.
            if !input.is_object() {
                return Err(InputError::new(
                    ".",
                    "expected a JSON object with authIdentityId and customerData",
                ));
            }
            parse_input::<CreateCustomerAccountInput>(input)?.validate()
        })
        .subject(|input| {
            input["customerData"]["email"]
                .as_str()
                .map(crate::domain::normalize_email)
        })
        .step(
            StepDef::new(VALIDATE, ValidateCustomerAccountCreation)
                .local()
                .batch(ValidateCustomerAccountCreation)
                .retry(retry),
        )
        .step(
            StepDef::compensable(CREATE_CUSTOMERS, CreateCustomers)
                .local()
                .batch(CreateCustomers)
                .retry(retry),
        )
        .step(StepDef::hook(CUSTOMERS_CREATED).retry(retry))
        .step(
            StepDef::new(EMIT_CUSTOMER_CREATED, EmitCustomerCreated)
                .local()
                .batch(EmitCustomerCreated)
                .retry(retry),
        )
        .step(
            StepDef::compensable(SET_AUTH_APP_METADATA, SetAuthAppMetadata)
                .local()
                .batch(SetAuthAppMetadata)
                .retry(retry),
        )
        .output(|view| view.output_value(CREATE_CUSTOMERS).cloned().unwrap_or(Value::Null))
        .on_finish(SettleOutbox)
        .build()
        .unwrap_or_else(|e| unreachable!("the built-in workflow is valid: {e}"))
}

fn input(ctx: &StepContext<'_>) -> Result<CreateCustomerAccountInput, StepError> {
    ctx.input()
}

fn not_found(identity: &str) -> StepError {
    StepError::permanent(format!("AuthIdentity with id: {identity} was not found"))
}

/// Step 1: email present and valid; identity exists and is not linked yet; no account with
/// that email. All errors are permanent (database trouble aside).
struct ValidateCustomerAccountCreation;

#[async_trait]
impl Step for ValidateCustomerAccountCreation {
    type Output = ();

    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<(), StepError> {
        let input = input(ctx)?;
        let email = input.customer_data.email.trim();
        check_email(email).map_err(StepError::permanent)?;
        let db = ctx.db().await?;
        let found = domain::registration_check(db, &input.auth_identity_id, email).await?;
        may_register(&input.auth_identity_id, found)
    }
}

/// What a registration check's answer (the identity's app metadata, `None` if it is not
/// there, and whether the email has an account) says of a registration, for the step and its
/// batch form alike.
fn may_register(identity: &str, found: Option<(Value, bool)>) -> Result<(), StepError> {
    let (app_metadata, account_exists) = found.ok_or_else(|| not_found(identity))?;
    if app_metadata.get(CUSTOMER_ID_KEY).is_some_and(|v| !v.is_null()) {
        return Err(StepError::permanent(messages::ALREADY_LINKED));
    }
    if account_exists {
        return Err(StepError::permanent(messages::DUPLICATE_ACCOUNT));
    }
    Ok(())
}

#[async_trait]
impl BatchStep for ValidateCustomerAccountCreation {
    async fn invoke_batch(
        &self,
        db: &mut PgConnection,
        items: &[BatchItem<'_>],
    ) -> Result<Vec<Result<(), StepError>>, StepError> {
        // What fails before the database fails alone; the others are checked in one statement.
        let inputs: Vec<Result<CreateCustomerAccountInput, StepError>> = items
            .iter()
            .map(|item| {
                let input: CreateCustomerAccountInput = item.input()?;
                check_email(input.customer_data.email.trim()).map_err(StepError::permanent)?;
                Ok(input)
            })
            .collect();
        let checked: Vec<(&str, &str)> = inputs
            .iter()
            .flatten()
            .map(|input| (input.auth_identity_id.as_str(), input.customer_data.email.trim()))
            .collect();
        let mut found = domain::registration_checks(db, &checked).await?.into_iter();
        Ok(inputs
            .iter()
            .map(|input| {
                let input = input.as_ref().map_err(Clone::clone)?;
                may_register(&input.auth_identity_id, found.next().flatten())
            })
            .collect())
    }
}

/// Step 2: inserts the customer (`has_account = true`) and its addresses. The unique index
/// turns a racing second registration into a permanent duplicate-account error.
struct CreateCustomers;

#[async_trait]
impl Step for CreateCustomers {
    type Output = Customer;

    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<Customer, StepError> {
        let input = input(ctx)?;
        let run_id = ctx.run_id();
        let db = ctx.db().await?;
        match domain::insert_customer(db, &input.customer_data, true, run_id).await {
            Ok(customer) => Ok(customer),
            Err(e) if violates(&e, ONE_ACCOUNT_PER_EMAIL) => Err(StepError::permanent(messages::DUPLICATE_ACCOUNT)),
            Err(e) => Err(e.into()),
        }
    }
}

#[async_trait]
impl BatchStep for CreateCustomers {
    async fn invoke_batch(
        &self,
        db: &mut PgConnection,
        items: &[BatchItem<'_>],
    ) -> Result<Vec<Result<Customer, StepError>>, StepError> {
        let inputs: Vec<Result<CreateCustomerAccountInput, StepError>> =
            items.iter().map(|item| item.input()).collect();
        let inserted: Vec<(&crate::domain::NewCustomer, bool, Uuid)> = inputs
            .iter()
            .zip(items)
            .filter_map(|(input, item)| Some((&input.as_ref().ok()?.customer_data, true, item.run_id())))
            .collect();
        // A taken email is an answer of the statement (`None`), not an error that fails it.
        let mut customers = domain::insert_customers(db, &inserted).await?.into_iter();
        Ok(inputs
            .iter()
            .map(|input| {
                input.as_ref().map_err(Clone::clone)?;
                customers
                    .next()
                    .flatten()
                    .ok_or_else(|| StepError::permanent(messages::DUPLICATE_ACCOUNT))
            })
            .collect())
    }
}

#[async_trait]
impl Compensate for CreateCustomers {
    async fn compensate(&self, ctx: &mut StepContext<'_>, done: Completed<Customer>) -> Result<(), StepError> {
        if let Completed::Output(customer) = done {
            domain::delete_customer(ctx.db().await?, &customer.id).await?;
        }
        Ok(())
    }
}

/// Step 4: holds `customer.created` in the outbox until the run's outcome is known.
struct EmitCustomerCreated;

#[async_trait]
impl Step for EmitCustomerCreated {
    type Output = Value;

    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<Value, StepError> {
        let customer: Customer = ctx.output(CREATE_CUSTOMERS)?;
        let run_id = ctx.run_id();
        let data = domain::customer_created(&customer.id);
        let event_id = domain::hold_event(ctx.db().await?, run_id, CUSTOMER_CREATED_EVENT, &data).await?;
        Ok(emitted(&event_id))
    }
}

/// What `emit-customer-created` records: the held event's id and name.
fn emitted(event_id: &str) -> Value {
    serde_json::json!({"event_id": event_id, "name": CUSTOMER_CREATED_EVENT})
}

#[async_trait]
impl BatchStep for EmitCustomerCreated {
    async fn invoke_batch(
        &self,
        db: &mut PgConnection,
        items: &[BatchItem<'_>],
    ) -> Result<Vec<Result<Value, StepError>>, StepError> {
        let customers: Vec<Result<Customer, StepError>> =
            items.iter().map(|item| item.output(CREATE_CUSTOMERS)).collect();
        let data: Vec<(Uuid, Value)> = customers
            .iter()
            .zip(items)
            .filter_map(|(customer, item)| Some((item.run_id(), domain::customer_created(&customer.as_ref().ok()?.id))))
            .collect();
        let held: Vec<(Uuid, &str, &Value)> = data
            .iter()
            .map(|(run_id, data)| (*run_id, CUSTOMER_CREATED_EVENT, data))
            .collect();
        let mut event_ids = domain::hold_events(db, &held).await?.into_iter();
        Ok(customers
            .iter()
            .map(|customer| {
                customer.as_ref().map_err(Clone::clone)?;
                let event_id = event_ids
                    .next()
                    .ok_or_else(|| StepError::retryable("the outbox answered for fewer events than were held"))?;
                Ok(emitted(&event_id))
            })
            .collect())
    }
}

/// Step 5: sets `app_metadata.customer_id` on the identity, refusing to overwrite another
/// customer's id.
struct SetAuthAppMetadata;

#[async_trait]
impl Step for SetAuthAppMetadata {
    type Output = AppMetadataChange;

    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<AppMetadataChange, StepError> {
        let input = input(ctx)?;
        let customer: Customer = ctx.output(CREATE_CUSTOMERS)?;
        let new_value = Value::String(customer.id.clone());
        let db = ctx.db().await?;
        let link = domain::link_identity(db, &input.auth_identity_id, CUSTOMER_ID_KEY, &new_value).await?;
        linked(input.auth_identity_id, new_value, link)
    }
}

/// What linking `identity` to the customer id `value` came to, for the step and its batch
/// form alike: the change to record, or why the registration cannot have it.
fn linked(identity: String, value: Value, link: Link) -> Result<AppMetadataChange, StepError> {
    match link {
        Link::NotFound => Err(not_found(&identity)),
        Link::Taken(_) => Err(StepError::permanent(messages::ALREADY_LINKED)),
        Link::Linked(old_value) => Ok(AppMetadataChange {
            id: identity,
            key: CUSTOMER_ID_KEY.into(),
            value,
            old_value,
        }),
    }
}

#[async_trait]
impl BatchStep for SetAuthAppMetadata {
    async fn invoke_batch(
        &self,
        db: &mut PgConnection,
        items: &[BatchItem<'_>],
    ) -> Result<Vec<Result<AppMetadataChange, StepError>>, StepError> {
        let asked: Vec<Result<(String, Value), StepError>> = items
            .iter()
            .map(|item| {
                let input: CreateCustomerAccountInput = item.input()?;
                let customer: Customer = item.output(CREATE_CUSTOMERS)?;
                Ok((input.auth_identity_id, Value::String(customer.id)))
            })
            .collect();
        let links: Vec<(&str, &Value)> = asked
            .iter()
            .flatten()
            .map(|(identity, value)| (identity.as_str(), value))
            .collect();
        let mut answers = domain::link_identities(db, &links, CUSTOMER_ID_KEY).await?.into_iter();
        Ok(asked
            .into_iter()
            .map(|asked| {
                let (identity, new_value) = asked?;
                let link = answers
                    .next()
                    .ok_or_else(|| StepError::retryable("the identities answered for fewer links than were asked"))?;
                linked(identity, new_value, link)
            })
            .collect())
    }
}

#[async_trait]
impl Compensate for SetAuthAppMetadata {
    async fn compensate(&self, ctx: &mut StepContext<'_>, done: Completed<AppMetadataChange>) -> Result<(), StepError> {
        let Completed::Output(change) = done else { return Ok(()) };
        let db = ctx.db().await?;
        let Some(identity) = domain::identity_for_update(db, &change.id).await? else {
            return Ok(());
        };
        // Only undo our own write: if someone changed the key since, it is theirs.
        if identity.app_metadata.get(&change.key) == Some(&change.value) {
            domain::set_app_metadata_key(db, &change.id, &change.key, change.old_value.as_ref()).await?;
        }
        Ok(())
    }
}

/// Releases the run's held events when it completed, discards them otherwise, in the
/// transaction of its final status change.
struct SettleOutbox;

#[async_trait]
impl FinishHook for SettleOutbox {
    async fn on_finish(&self, db: &mut PgConnection, run_id: Uuid, status: RunStatus) -> Result<(), StepError> {
        domain::settle_events(db, run_id, status == RunStatus::Completed).await?;
        Ok(())
    }

    async fn on_finish_batch(&self, db: &mut PgConnection, runs: &[(Uuid, RunStatus)]) -> Result<(), StepError> {
        let settled: Vec<(Uuid, bool)> = runs
            .iter()
            .map(|&(run_id, status)| (run_id, status == RunStatus::Completed))
            .collect();
        domain::settle_events_of(db, &settled).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_plan_matches_the_contract() {
        let wf = workflow();
        let steps: Vec<(&str, bool, bool)> = wf
            .steps()
            .iter()
            .map(|s| (s.name(), s.has_compensation(), s.is_hook()))
            .collect();
        assert_eq!(
            steps,
            [
                (VALIDATE, false, false),
                (CREATE_CUSTOMERS, true, false),
                (CUSTOMERS_CREATED, false, true),
                (EMIT_CUSTOMER_CREATED, false, false),
                (SET_AUTH_APP_METADATA, true, false),
            ]
        );
    }

    #[test]
    fn inputs_are_checked_with_the_offending_field_named() {
        let wf = workflow();
        let ok = json!({"authIdentityId": "authid_1", "customerData": {"email": "a@b.co", "first_name": "Ada"}});
        assert!(wf.check_input(&ok).is_ok());
        let cases = [
            (json!({"customerData": {"email": "a@b.co"}}), "authIdentityId"),
            (json!({"authIdentityId": "x", "customerData": {}}), "customerData.email"),
            (
                json!({"authIdentityId": "x", "customerData": {"email": "bad"}}),
                "customerData.email",
            ),
            (
                json!({"authIdentityId": "x", "customerData": {"email": 3}}),
                "customerData.email",
            ),
            (
                json!({"authIdentityId": "x", "customerData": {"email": "a@b.co", "first_name": 1}}),
                "customerData.first_name",
            ),
            (
                json!({"authIdentityId": 1, "customerData": {"email": "a@b.co"}}),
                "authIdentityId",
            ),
            (
                json!({"authIdentityId": "x", "customerData": {"email": "a@b.co", "metadata": []}}),
                "customerData.metadata",
            ),
            (json!([]), "."),
        ];
        for (input, field) in cases {
            let error = wf.check_input(&input).expect_err("refused");
            assert_eq!(error.field, field, "{input}: {error}");
        }
        let unknown = parse_input::<CreateCustomerAccountInput>(
            &json!({"authIdentityId": "x", "customerData": {"email": "a@b.co", "firstname": "Ada"}}),
        )
        .expect_err("unknown field");
        assert!(unknown.message.contains("firstname"), "{unknown}");
    }

    #[test]
    fn the_subject_is_the_normalized_email() {
        let input = json!({"authIdentityId": "x", "customerData": {"email": " Ada@Example.COM"}});
        assert_eq!(workflow().subject_of(&input).as_deref(), Some("ada@example.com"));
    }
}
