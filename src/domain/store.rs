//! All SQL of the customer domain: customers and addresses, auth identities, the outbox.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

use super::{Address, AuthIdentity, Customer, NewCustomer, OutboxEvent, OutboxStatus, new_id, normalize_email};

/// The unique index allowing one registered customer per email.
pub const ONE_ACCOUNT_PER_EMAIL: &str = "customers_one_account_per_email";

/// What can go wrong in the domain's storage.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// The unique key is taken (an identity for that provider and entity, an account for that email).
    #[error("{0}")]
    Duplicate(String),
    /// `after` names no released event.
    #[error("no released event has id `{0}`")]
    UnknownEvent(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Whether `error` is a violation of the named unique constraint.
pub fn violates(error: &sqlx::Error, constraint: &str) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.constraint() == Some(constraint))
}

// ---------------------------------------------------------------------------------------
// Auth identities
// ---------------------------------------------------------------------------------------

/// Creates an auth identity with empty app metadata.
pub async fn create_identity<'e>(
    db: impl PgExecutor<'e>,
    provider: &str,
    entity_id: &str,
) -> Result<AuthIdentity, DomainError> {
    let created = sqlx::query_as(
        "INSERT INTO auth_identities (id, provider, entity_id) VALUES ($1, $2, $3)
         RETURNING id, provider, entity_id, app_metadata",
    )
    .bind(new_id("authid"))
    .bind(provider)
    .bind(entity_id)
    .fetch_one(db)
    .await;
    match created {
        Ok(identity) => Ok(identity),
        Err(e) if violates(&e, "auth_identities_provider_entity_id_key") => Err(DomainError::Duplicate(format!(
            "an auth identity for provider `{provider}` and entity `{entity_id}` already exists"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// An auth identity by id.
pub async fn identity<'e>(db: impl PgExecutor<'e>, id: &str) -> Result<Option<AuthIdentity>, sqlx::Error> {
    sqlx::query_as("SELECT id, provider, entity_id, app_metadata FROM auth_identities WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await
}

/// An auth identity by id, locked until the transaction ends (two registrations racing for
/// one identity are serialized here).
pub async fn identity_for_update(conn: &mut PgConnection, id: &str) -> Result<Option<AuthIdentity>, sqlx::Error> {
    sqlx::query_as("SELECT id, provider, entity_id, app_metadata FROM auth_identities WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// What [`link_identity`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Link {
    /// No identity has that id.
    NotFound,
    /// The key already holds another value, left as it was.
    Taken(Value),
    /// The key now holds the value; this was there before (absent or JSON null: `None`).
    Linked(Option<Value>),
}

/// Sets `key` of an identity's app metadata to `value` unless it already holds another value,
/// in one statement that locks the identity (two registrations racing for one identity are
/// serialized here).
pub async fn link_identity(conn: &mut PgConnection, id: &str, key: &str, value: &Value) -> Result<Link, sqlx::Error> {
    let found: Option<(Option<Value>, bool)> = sqlx::query_as(
        "WITH current AS (
             SELECT app_metadata -> $2 AS old FROM auth_identities WHERE id = $1 FOR UPDATE
         ), linked AS (
             UPDATE auth_identities a
             SET app_metadata = jsonb_set(a.app_metadata, ARRAY[$2], $3), updated_at = now()
             FROM current c
             WHERE a.id = $1 AND (c.old IS NULL OR c.old = 'null'::jsonb OR c.old = $3)
             RETURNING 1
         )
         SELECT c.old, EXISTS (SELECT 1 FROM linked) FROM current c",
    )
    .bind(id)
    .bind(key)
    .bind(value)
    .fetch_optional(conn)
    .await?;
    Ok(match found {
        None => Link::NotFound,
        Some((old, true)) => Link::Linked(old.filter(|v| !v.is_null())),
        Some((old, false)) => Link::Taken(old.unwrap_or(Value::Null)),
    })
}

/// Sets (`Some`) or removes (`None`) one key of an identity's app metadata.
pub async fn set_app_metadata_key(
    conn: &mut PgConnection,
    id: &str,
    key: &str,
    value: Option<&Value>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE auth_identities
         SET app_metadata = CASE WHEN $3::jsonb IS NULL THEN app_metadata - $2
                                 ELSE jsonb_set(app_metadata, ARRAY[$2], $3::jsonb) END,
             updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(key)
    .bind(value)
    .execute(conn)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Customers
// ---------------------------------------------------------------------------------------

#[derive(FromRow)]
struct CustomerRow {
    id: String,
    email: String,
    has_account: bool,
    first_name: Option<String>,
    last_name: Option<String>,
    company_name: Option<String>,
    phone: Option<String>,
    metadata: Option<Value>,
    default_billing_address_id: Option<String>,
    default_shipping_address_id: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    deleted_at: Option<DateTime<Utc>>,
}

impl CustomerRow {
    fn with(self, addresses: Vec<Address>) -> Customer {
        Customer {
            id: self.id,
            email: self.email,
            has_account: self.has_account,
            first_name: self.first_name,
            last_name: self.last_name,
            company_name: self.company_name,
            phone: self.phone,
            metadata: self.metadata,
            addresses,
            default_billing_address_id: self.default_billing_address_id,
            default_shipping_address_id: self.default_shipping_address_id,
            created_at: self.created_at,
            updated_at: self.updated_at,
            deleted_at: self.deleted_at,
        }
    }
}

const CUSTOMER_COLUMNS: &str = "id, email, has_account, first_name, last_name, company_name, phone, metadata, \
     default_billing_address_id, default_shipping_address_id, created_at, updated_at, deleted_at";
const ADDRESS_COLUMNS: &str = "id, customer_id, address_name, is_default_shipping, is_default_billing, company, \
     first_name, last_name, address_1, address_2, city, country_code, province, postal_code, phone, metadata, \
     created_at, updated_at, deleted_at";

/// For a registration: the identity's app metadata (None: no such identity) and whether a
/// registered customer already has this email, in one round trip.
pub async fn registration_check(
    conn: &mut PgConnection,
    identity: &str,
    email: &str,
) -> Result<Option<(Value, bool)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.app_metadata,
                EXISTS (SELECT 1 FROM customers c WHERE c.email = $2 AND c.has_account AND c.deleted_at IS NULL)
         FROM auth_identities a WHERE a.id = $1",
    )
    .bind(identity)
    .bind(normalize_email(email))
    .fetch_optional(conn)
    .await
}

/// Inserts a customer with its addresses. A registered customer whose email already has an
/// account violates [`ONE_ACCOUNT_PER_EMAIL`].
pub async fn insert_customer(
    conn: &mut PgConnection,
    data: &NewCustomer,
    has_account: bool,
    created_by_run: Uuid,
) -> Result<Customer, sqlx::Error> {
    let addresses = data.addresses.clone().unwrap_or_default();
    let address_ids: Vec<String> = addresses.iter().map(|_| new_id("cuaddr")).collect();
    let default_of = |pick: fn(&super::NewAddress) -> bool| {
        addresses
            .iter()
            .zip(&address_ids)
            .find(|(a, _)| pick(a))
            .map(|(_, id)| id.clone())
    };
    let billing = default_of(|a| a.is_default_billing == Some(true));
    let shipping = default_of(|a| a.is_default_shipping == Some(true));
    let row: CustomerRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO customers (id, email, has_account, first_name, last_name, company_name, phone, metadata,
                                default_billing_address_id, default_shipping_address_id, created_by_run)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         RETURNING {CUSTOMER_COLUMNS}"
    )))
    .bind(new_id("cus"))
    .bind(normalize_email(&data.email))
    .bind(has_account)
    .bind(&data.first_name)
    .bind(&data.last_name)
    .bind(&data.company_name)
    .bind(&data.phone)
    .bind(data.metadata.clone().map(Value::Object))
    .bind(billing)
    .bind(shipping)
    .bind(created_by_run)
    .fetch_one(&mut *conn)
    .await?;
    let mut created = Vec::new();
    if !addresses.is_empty() {
        let text = |f: fn(&super::NewAddress) -> &Option<String>| -> Vec<Option<String>> {
            addresses.iter().map(|a| f(a).clone()).collect()
        };
        created = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO customer_addresses (id, customer_id, address_name, is_default_shipping, is_default_billing,
                 company, first_name, last_name, address_1, address_2, city, country_code, province, postal_code,
                 phone, metadata)
             SELECT a.id, $1, a.address_name, a.shipping, a.billing, a.company, a.first_name, a.last_name,
                    a.address_1, a.address_2, a.city, lower(a.country_code), a.province, a.postal_code, a.phone,
                    a.metadata
             FROM unnest($2::text[], $3::text[], $4::bool[], $5::bool[], $6::text[], $7::text[], $8::text[],
                         $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[],
                         $16::jsonb[])
                  WITH ORDINALITY AS a(id, address_name, shipping, billing, company, first_name, last_name,
                                       address_1, address_2, city, country_code, province, postal_code, phone,
                                       metadata, ord)
             ORDER BY a.ord
             RETURNING {ADDRESS_COLUMNS}"
        )))
        .bind(&row.id)
        .bind(&address_ids)
        .bind(text(|a| &a.address_name))
        .bind(
            addresses
                .iter()
                .map(|a| a.is_default_shipping == Some(true))
                .collect::<Vec<_>>(),
        )
        .bind(
            addresses
                .iter()
                .map(|a| a.is_default_billing == Some(true))
                .collect::<Vec<_>>(),
        )
        .bind(text(|a| &a.company))
        .bind(text(|a| &a.first_name))
        .bind(text(|a| &a.last_name))
        .bind(text(|a| &a.address_1))
        .bind(text(|a| &a.address_2))
        .bind(text(|a| &a.city))
        .bind(text(|a| &a.country_code))
        .bind(text(|a| &a.province))
        .bind(text(|a| &a.postal_code))
        .bind(text(|a| &a.phone))
        .bind(
            addresses
                .iter()
                .map(|a| a.metadata.clone().map(Value::Object))
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *conn)
        .await?;
        created.sort_by_key(|a: &Address| address_ids.iter().position(|id| id == &a.id));
    }
    Ok(row.with(created))
}

/// Deletes a customer and its addresses for good (what compensating a registration does).
pub async fn delete_customer(conn: &mut PgConnection, id: &str) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM customers WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?
        .rows_affected())
}

/// A customer by id, with its addresses.
pub async fn customer(conn: &mut PgConnection, id: &str) -> Result<Option<Customer>, sqlx::Error> {
    let row: Option<CustomerRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let mut with = attach_addresses(conn, vec![row]).await?;
    Ok(with.pop())
}

/// Customers, newest first, optionally only those with this email.
pub async fn customers(conn: &mut PgConnection, email: Option<&str>, limit: i64) -> Result<Vec<Customer>, sqlx::Error> {
    let rows: Vec<CustomerRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {CUSTOMER_COLUMNS} FROM customers
         WHERE deleted_at IS NULL AND ($1::text IS NULL OR email = $1)
         ORDER BY created_at DESC, id DESC LIMIT $2"
    )))
    .bind(email.map(normalize_email))
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    attach_addresses(conn, rows).await
}

async fn attach_addresses(conn: &mut PgConnection, rows: Vec<CustomerRow>) -> Result<Vec<Customer>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let addresses: Vec<Address> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ADDRESS_COLUMNS} FROM customer_addresses
         WHERE customer_id = ANY($1) AND deleted_at IS NULL ORDER BY created_at, id"
    )))
    .bind(&ids)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let mine = addresses.iter().filter(|a| a.customer_id == row.id).cloned().collect();
            row.with(mine)
        })
        .collect())
}

// ---------------------------------------------------------------------------------------
// Outbox
// ---------------------------------------------------------------------------------------

/// Holds an event until its run's outcome is known; returns its id.
pub async fn hold_event(
    conn: &mut PgConnection,
    run_id: Uuid,
    name: &str,
    data: &Value,
) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("INSERT INTO outbox_events (id, name, data, run_id) VALUES ($1, $2, $3, $4) RETURNING id")
        .bind(new_id("evt"))
        .bind(name)
        .bind(data)
        .bind(run_id)
        .fetch_one(conn)
        .await
}

/// Releases (the run completed) or discards (it did not) the run's held events. Called in the
/// transaction of the run's final status change.
pub async fn settle_events(conn: &mut PgConnection, run_id: Uuid, release: bool) -> Result<u64, sqlx::Error> {
    let to = OutboxStatus::settled(release);
    // `held` stays a literal: it is what the statement is about, and the released-events
    // index is partial on a literal status.
    let done = sqlx::query(
        "UPDATE outbox_events SET status = $2,
             released_at = CASE WHEN $2 = 'released'::outbox_status THEN now() END,
             released_xid = CASE WHEN $2 = 'released'::outbox_status THEN pg_current_xact_id() END
         WHERE run_id = $1 AND status = 'held'",
    )
    .bind(run_id)
    .bind(to)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Released events after the event `after` (exclusive), oldest release first. Only events
/// whose releasing transaction is older than every running transaction are returned, so a
/// consumer paging with `after` never skips one.
pub async fn released_events(
    conn: &mut PgConnection,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<OutboxEvent>, DomainError> {
    let cursor: Option<(String, String)> = match after {
        None => None,
        Some(id) => {
            let xid: Option<String> = sqlx::query_scalar(
                "SELECT released_xid::text FROM outbox_events WHERE id = $1 AND status = 'released'",
            )
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
            Some((
                xid.ok_or_else(|| DomainError::UnknownEvent(id.to_string()))?,
                id.to_string(),
            ))
        }
    };
    let events = sqlx::query_as(
        "SELECT id, name, data, run_id, created_at, released_at FROM outbox_events
         WHERE status = 'released'
           AND released_xid < pg_snapshot_xmin(pg_current_snapshot())
           AND ($1::text IS NULL OR (released_xid, id) > ($1::xid8, $2::text))
         ORDER BY released_xid, id
         LIMIT $3",
    )
    .bind(cursor.as_ref().map(|c| c.0.clone()))
    .bind(cursor.as_ref().map(|c| c.1.clone()))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(events)
}

/// The `customer.created` payload.
pub fn customer_created(customer_id: &str) -> Value {
    json!({"id": customer_id})
}
