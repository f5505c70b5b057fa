//! All SQL of the customer domain: customers and addresses, auth identities, the outbox.

use std::collections::HashMap;

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
    Ok(link_of(found))
}

/// [`link_identity`] for many identities (id, value) and one `key`, with the outcome of each
/// as if they were linked one after another, in order. Either way it locks the identities in
/// id order first, as a concurrent call does too, so two calls naming the same identities
/// wait for each other instead of deadlocking. Distinct identities take one statement; an
/// identity named twice must see its earlier item's link, so such a call locks them all in
/// one statement and then links one item at a time.
pub async fn link_identities(
    conn: &mut PgConnection,
    items: &[(&str, &Value)],
    key: &str,
) -> Result<Vec<Link>, sqlx::Error> {
    let mut distinct: Vec<&str> = items.iter().map(|(id, _)| *id).collect();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() < items.len() {
        sqlx::query("SELECT 1 FROM auth_identities WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&distinct)
            .execute(&mut *conn)
            .await?;
        let mut links = Vec::with_capacity(items.len());
        for (id, value) in items {
            links.push(link_identity(conn, id, key, value).await?);
        }
        return Ok(links);
    }
    let found: Vec<(bool, Option<Value>, bool)> = sqlx::query_as(
        "WITH input AS (
             SELECT * FROM unnest($1::text[], $2::jsonb[]) WITH ORDINALITY AS i(id, value, ord)
         ), current AS (
             SELECT i.ord, a.app_metadata -> $3 AS old
             FROM input i JOIN auth_identities a ON a.id = i.id
             ORDER BY a.id
             FOR UPDATE OF a
         ), linked AS (
             UPDATE auth_identities a
             SET app_metadata = jsonb_set(a.app_metadata, ARRAY[$3], i.value), updated_at = now()
             FROM input i JOIN current c ON c.ord = i.ord
             WHERE a.id = i.id AND (c.old IS NULL OR c.old = 'null'::jsonb OR c.old = i.value)
             RETURNING i.ord
         )
         SELECT c.ord IS NOT NULL, c.old, EXISTS (SELECT 1 FROM linked l WHERE l.ord = i.ord)
         FROM input i LEFT JOIN current c ON c.ord = i.ord
         ORDER BY i.ord",
    )
    .bind(items.iter().map(|(id, _)| id.to_string()).collect::<Vec<_>>())
    .bind(items.iter().map(|(_, value)| (*value).clone()).collect::<Vec<_>>())
    .bind(key)
    .fetch_all(conn)
    .await?;
    Ok(found
        .into_iter()
        .map(|(exists, old, linked)| link_of(exists.then_some((old, linked))))
        .collect())
}

/// The outcome of a link from what its statement found: the identity's old value and whether
/// it was linked (`None`: no such identity).
fn link_of(found: Option<(Option<Value>, bool)>) -> Link {
    match found {
        None => Link::NotFound,
        Some((old, true)) => Link::Linked(old.filter(|v| !v.is_null())),
        Some((old, false)) => Link::Taken(old.unwrap_or(Value::Null)),
    }
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

/// [`registration_check`] for many registrations (identity, email) in one statement: one
/// answer per item, in order.
pub async fn registration_checks(
    conn: &mut PgConnection,
    items: &[(&str, &str)],
) -> Result<Vec<Option<(Value, bool)>>, sqlx::Error> {
    let found: Vec<(Option<Value>, bool)> = sqlx::query_as(
        // A lateral lookup per item, not `EXISTS`: a generic plan, which guesses ten items,
        // makes an `EXISTS` a hashed subplan over every registered customer.
        "SELECT a.app_metadata, taken.email IS NOT NULL
         FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS i(identity, email, ord)
         LEFT JOIN auth_identities a ON a.id = i.identity
         LEFT JOIN LATERAL (
             SELECT c.email FROM customers c
             WHERE c.email = i.email AND c.has_account AND c.deleted_at IS NULL
             LIMIT 1
         ) taken ON true
         ORDER BY i.ord",
    )
    .bind(
        items
            .iter()
            .map(|(identity, _)| identity.to_string())
            .collect::<Vec<_>>(),
    )
    .bind(
        items
            .iter()
            .map(|(_, email)| normalize_email(email))
            .collect::<Vec<_>>(),
    )
    .fetch_all(conn)
    .await?;
    // `app_metadata` is NOT NULL: a null one is an identity that is not there.
    Ok(found
        .into_iter()
        .map(|(metadata, exists)| metadata.map(|metadata| (metadata, exists)))
        .collect())
}

/// Inserts a customer with its addresses. A registered customer whose email already has an
/// account violates [`ONE_ACCOUNT_PER_EMAIL`].
pub async fn insert_customer(
    conn: &mut PgConnection,
    data: &NewCustomer,
    has_account: bool,
    created_by_run: Uuid,
) -> Result<Customer, sqlx::Error> {
    let prepared = Prepared::of(data);
    let row: CustomerRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO customers (id, email, has_account, first_name, last_name, company_name, phone, metadata,
                                default_billing_address_id, default_shipping_address_id, created_by_run)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         RETURNING {CUSTOMER_COLUMNS}"
    )))
    .bind(&prepared.id)
    .bind(normalize_email(&data.email))
    .bind(has_account)
    .bind(&data.first_name)
    .bind(&data.last_name)
    .bind(&data.company_name)
    .bind(&data.phone)
    .bind(data.metadata.clone().map(Value::Object))
    .bind(&prepared.billing)
    .bind(&prepared.shipping)
    .bind(created_by_run)
    .fetch_one(&mut *conn)
    .await?;
    let mut addresses = insert_addresses(conn, &[(&prepared, data)]).await?;
    Ok(row.with(addresses.remove(&prepared.id).unwrap_or_default()))
}

/// [`insert_customer`] for many customers in at most two statements, whatever their number:
/// the customers', then their addresses' (if any has some). One result per item, in order: `None` for a registered
/// customer whose email already has an account (also one an earlier item of the same call
/// takes), and nothing of that item is written; the others are inserted as [`insert_customer`]
/// inserts them.
pub async fn insert_customers(
    conn: &mut PgConnection,
    items: &[(&NewCustomer, bool, Uuid)],
) -> Result<Vec<Option<Customer>>, sqlx::Error> {
    let prepared: Vec<Prepared> = items.iter().map(|(data, _, _)| Prepared::of(data)).collect();
    let text = |f: fn(&NewCustomer) -> &Option<String>| -> Vec<Option<String>> {
        items.iter().map(|(data, _, _)| f(data).clone()).collect()
    };
    // `ON CONFLICT … DO NOTHING` names the one-account index alone, so any other violation
    // still fails the statement; it skips a row that conflicts with one inserted earlier by
    // the same statement too, as a second insert of the email would fail.
    let rows: Vec<CustomerRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO customers (id, email, has_account, first_name, last_name, company_name, phone, metadata,
                                default_billing_address_id, default_shipping_address_id, created_by_run)
         SELECT i.id, i.email, i.has_account, i.first_name, i.last_name, i.company_name, i.phone, i.metadata,
                i.billing, i.shipping, i.run
         FROM unnest($1::text[], $2::text[], $3::bool[], $4::text[], $5::text[], $6::text[], $7::text[],
                     $8::jsonb[], $9::text[], $10::text[], $11::uuid[])
              WITH ORDINALITY AS i(id, email, has_account, first_name, last_name, company_name, phone, metadata,
                                   billing, shipping, run, ord)
         ORDER BY i.ord
         ON CONFLICT (email) WHERE has_account AND deleted_at IS NULL DO NOTHING
         RETURNING {CUSTOMER_COLUMNS}"
    )))
    .bind(prepared.iter().map(|p| p.id.clone()).collect::<Vec<_>>())
    .bind(
        items
            .iter()
            .map(|(data, _, _)| normalize_email(&data.email))
            .collect::<Vec<_>>(),
    )
    .bind(items.iter().map(|&(_, has_account, _)| has_account).collect::<Vec<_>>())
    .bind(text(|c| &c.first_name))
    .bind(text(|c| &c.last_name))
    .bind(text(|c| &c.company_name))
    .bind(text(|c| &c.phone))
    .bind(
        items
            .iter()
            .map(|(data, _, _)| data.metadata.clone().map(Value::Object))
            .collect::<Vec<_>>(),
    )
    .bind(prepared.iter().map(|p| p.billing.clone()).collect::<Vec<_>>())
    .bind(prepared.iter().map(|p| p.shipping.clone()).collect::<Vec<_>>())
    .bind(items.iter().map(|&(_, _, run)| run).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    let mut rows: HashMap<String, CustomerRow> = rows.into_iter().map(|row| (row.id.clone(), row)).collect();
    let inserted: Vec<(&Prepared, &NewCustomer)> = prepared
        .iter()
        .zip(items)
        .filter(|(p, _)| rows.contains_key(&p.id))
        .map(|(p, (data, _, _))| (p, *data))
        .collect();
    let mut addresses = insert_addresses(conn, &inserted).await?;
    Ok(prepared
        .iter()
        .map(|p| {
            rows.remove(&p.id)
                .map(|row| row.with(addresses.remove(&p.id).unwrap_or_default()))
        })
        .collect())
}

/// A customer's ids, chosen before its insert: its own, its addresses', and which of those
/// are its defaults.
struct Prepared {
    id: String,
    address_ids: Vec<String>,
    billing: Option<String>,
    shipping: Option<String>,
}

impl Prepared {
    fn of(data: &NewCustomer) -> Self {
        let addresses = data.addresses.as_deref().unwrap_or_default();
        let address_ids: Vec<String> = addresses.iter().map(|_| new_id("cuaddr")).collect();
        let default_of = |pick: fn(&super::NewAddress) -> bool| {
            addresses
                .iter()
                .zip(&address_ids)
                .find(|(a, _)| pick(a))
                .map(|(_, id)| id.clone())
        };
        Self {
            id: new_id("cus"),
            billing: default_of(|a| a.is_default_billing == Some(true)),
            shipping: default_of(|a| a.is_default_shipping == Some(true)),
            address_ids,
        }
    }
}

/// Inserts the addresses of customers just inserted, in one statement (none without any):
/// each customer's, in the order given, keyed by the customer's id.
async fn insert_addresses(
    conn: &mut PgConnection,
    customers: &[(&Prepared, &NewCustomer)],
) -> Result<HashMap<String, Vec<Address>>, sqlx::Error> {
    let all: Vec<(&str, &String, &super::NewAddress)> = customers
        .iter()
        .flat_map(|(prepared, data)| {
            let addresses = data.addresses.as_deref().unwrap_or_default();
            prepared
                .address_ids
                .iter()
                .zip(addresses)
                .map(|(id, address)| (prepared.id.as_str(), id, address))
        })
        .collect();
    let mut by_customer: HashMap<String, Vec<Address>> = HashMap::new();
    if all.is_empty() {
        return Ok(by_customer);
    }
    let text = |f: fn(&super::NewAddress) -> &Option<String>| -> Vec<Option<String>> {
        all.iter().map(|(_, _, a)| f(a).clone()).collect()
    };
    let mut created: Vec<Address> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO customer_addresses (id, customer_id, address_name, is_default_shipping, is_default_billing,
             company, first_name, last_name, address_1, address_2, city, country_code, province, postal_code,
             phone, metadata)
         SELECT a.id, a.customer_id, a.address_name, a.shipping, a.billing, a.company, a.first_name, a.last_name,
                a.address_1, a.address_2, a.city, lower(a.country_code), a.province, a.postal_code, a.phone,
                a.metadata
         FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::bool[], $6::text[], $7::text[],
                     $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
                     $15::text[], $16::jsonb[])
              WITH ORDINALITY AS a(customer_id, id, address_name, shipping, billing, company, first_name,
                                   last_name, address_1, address_2, city, country_code, province, postal_code,
                                   phone, metadata, ord)
         ORDER BY a.ord
         RETURNING {ADDRESS_COLUMNS}"
    )))
    .bind(
        all.iter()
            .map(|(customer, _, _)| customer.to_string())
            .collect::<Vec<_>>(),
    )
    .bind(all.iter().map(|(_, id, _)| (*id).clone()).collect::<Vec<_>>())
    .bind(text(|a| &a.address_name))
    .bind(
        all.iter()
            .map(|(_, _, a)| a.is_default_shipping == Some(true))
            .collect::<Vec<_>>(),
    )
    .bind(
        all.iter()
            .map(|(_, _, a)| a.is_default_billing == Some(true))
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
        all.iter()
            .map(|(_, _, a)| a.metadata.clone().map(Value::Object))
            .collect::<Vec<_>>(),
    )
    .fetch_all(&mut *conn)
    .await?;
    // RETURNING promises no order: put each customer's addresses back in the order given.
    created.sort_by_key(|address| all.iter().position(|(_, id, _)| **id == address.id));
    for address in created {
        by_customer
            .entry(address.customer_id.clone())
            .or_default()
            .push(address);
    }
    Ok(by_customer)
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

/// [`hold_event`] for many events (run, name, data) in one statement; their ids, in order.
pub async fn hold_events(conn: &mut PgConnection, items: &[(Uuid, &str, &Value)]) -> Result<Vec<String>, sqlx::Error> {
    let ids: Vec<String> = items.iter().map(|_| new_id("evt")).collect();
    sqlx::query(
        "INSERT INTO outbox_events (id, name, data, run_id)
         SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::uuid[])",
    )
    .bind(&ids)
    .bind(items.iter().map(|(_, name, _)| name.to_string()).collect::<Vec<_>>())
    .bind(items.iter().map(|(_, _, data)| (*data).clone()).collect::<Vec<_>>())
    .bind(items.iter().map(|(run, _, _)| *run).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(ids)
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

/// [`settle_events`] for many runs (run, release) in one statement: how many events each
/// settled, in order.
pub async fn settle_events_of(conn: &mut PgConnection, items: &[(Uuid, bool)]) -> Result<Vec<u64>, sqlx::Error> {
    // The runs as `= ANY`, not joined from `unnest`: a generic plan keeps the index on the
    // run for an array, where it would hash the join and read every event.
    let settled: Vec<(Uuid, i64)> = sqlx::query_as(
        "WITH settled AS (
             UPDATE outbox_events
             SET status = CASE WHEN run_id = ANY($2) THEN 'released'::outbox_status
                               ELSE 'discarded'::outbox_status END,
                 released_at = CASE WHEN run_id = ANY($2) THEN now() END,
                 released_xid = CASE WHEN run_id = ANY($2) THEN pg_current_xact_id() END
             WHERE run_id = ANY($1) AND status = 'held'
             RETURNING run_id
         )
         SELECT run_id, count(*) FROM settled GROUP BY run_id",
    )
    .bind(items.iter().map(|(run, _)| *run).collect::<Vec<_>>())
    .bind(
        items
            .iter()
            .filter(|(_, release)| *release)
            .map(|(run, _)| *run)
            .collect::<Vec<_>>(),
    )
    .fetch_all(conn)
    .await?;
    let counts: HashMap<Uuid, i64> = settled.into_iter().collect();
    Ok(items
        .iter()
        .map(|(run, _)| counts.get(run).map_or(0, |&n| u64::try_from(n).unwrap_or(0)))
        .collect())
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
