//! The set-based forms of the registration's statements in `domain::store` (one statement
//! for many items, the building blocks of batch steps) against their one-item forms: on two
//! databases seeded alike, the set-based call answers, item for item, what the one-item calls
//! answer one after another, and leaves the same rows.

mod common;

use sagaflow::domain::store::{self as domain, Link};
use sagaflow::domain::{NewAddress, NewCustomer};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Identities: three without a link, one linked already, one whose key is JSON null; and a
/// registered customer with `taken@x.io`.
async fn seeded() -> common::TestDb {
    let db = common::test_db().await;
    sqlx::raw_sql(
        r#"INSERT INTO auth_identities (id, provider, entity_id, app_metadata) VALUES
               ('free1', 'emailpass', 'free1', '{}'),
               ('free2', 'emailpass', 'free2', '{"other": 1}'),
               ('free3', 'emailpass', 'free3', '{}'),
               ('linked', 'emailpass', 'linked', '{"customer_id": "cus_old"}'),
               ('nullkey', 'emailpass', 'nullkey', '{"customer_id": null}');
           INSERT INTO customers (id, email, has_account) VALUES ('cus_taken', 'taken@x.io', true);"#,
    )
    .execute(&db.pool)
    .await
    .expect("seed");
    db
}

fn customer(email: &str) -> NewCustomer {
    NewCustomer {
        email: email.to_string(),
        first_name: Some(format!("first {email}")),
        last_name: None,
        company_name: Some("Acme".into()),
        phone: None,
        metadata: None,
        addresses: None,
    }
}

/// (identity, customer, has_account): a fresh one with two addresses and metadata, one
/// without an identity, one whose email has an account, one whose identity is linked, one
/// whose identity another item names too, one whose key is null, an unregistered customer
/// with a taken email, and a second spelling of the first item's email.
fn registrations() -> Vec<(&'static str, NewCustomer, bool)> {
    let address = |name: &str, shipping: bool, billing: bool| NewAddress {
        address_name: Some(name.into()),
        is_default_shipping: Some(shipping),
        is_default_billing: Some(billing),
        city: Some(format!("{name} city")),
        country_code: Some("DK".into()),
        ..NewAddress::default()
    };
    let mut first = customer("a@x.io");
    first.metadata = json!({"tier": "gold"}).as_object().cloned();
    first.addresses = Some(vec![address("home", true, false), address("work", false, true)]);
    let mut second_address = customer("b2@x.io");
    second_address.addresses = Some(vec![address("only", true, true)]);
    vec![
        ("free1", first, true),
        ("missing", customer("b@x.io"), true),
        ("free2", customer("taken@x.io"), true),
        ("linked", customer("c@x.io"), true),
        ("free1", second_address, true),
        ("nullkey", customer("e@x.io"), true),
        ("free3", customer("taken@x.io"), false),
        ("free3", customer(" A@X.io "), true),
    ]
}

/// What a customer holds beyond its generated ids and times: its fields, its defaults and
/// addresses by position.
fn comparable(customer: &sagaflow::domain::Customer) -> Value {
    let position = |id: &Option<String>| {
        id.as_ref()
            .and_then(|id| customer.addresses.iter().position(|a| &a.id == id))
    };
    json!({
        "email": customer.email,
        "has_account": customer.has_account,
        "first_name": customer.first_name,
        "company_name": customer.company_name,
        "metadata": customer.metadata,
        "billing": position(&customer.default_billing_address_id),
        "shipping": position(&customer.default_shipping_address_id),
        "addresses": customer.addresses.iter().map(|a| json!({
            "customer": a.customer_id == customer.id,
            "name": a.address_name, "city": a.city, "country": a.country_code,
            "shipping": a.is_default_shipping, "billing": a.is_default_billing,
        })).collect::<Vec<_>>(),
    })
}

/// The domain's rows with generated ids and times left out (a customer's id by its email).
async fn rows(pool: &PgPool) -> Value {
    let rows: Value = sqlx::query_scalar(
        "SELECT jsonb_build_object(
             'customers', (SELECT jsonb_agg(jsonb_build_object('email', email, 'has_account', has_account,
                     'first_name', first_name, 'metadata', metadata, 'run', created_by_run,
                     'billing', (SELECT address_name FROM customer_addresses WHERE id = default_billing_address_id),
                     'shipping', (SELECT address_name FROM customer_addresses WHERE id = default_shipping_address_id),
                     'addresses', (SELECT jsonb_agg(jsonb_build_array(address_name, city, country_code,
                                                    is_default_shipping, is_default_billing) ORDER BY address_name)
                                   FROM customer_addresses a WHERE a.customer_id = c.id))
                 ORDER BY email, has_account) FROM customers c),
             'identities', (SELECT jsonb_agg(jsonb_build_array(id, app_metadata) ORDER BY id) FROM auth_identities),
             'events', (SELECT jsonb_agg(jsonb_build_array(run_id, name, data, status, released_at IS NOT NULL,
                                                          released_xid IS NOT NULL) ORDER BY run_id, name)
                        FROM outbox_events))",
    )
    .fetch_one(pool)
    .await
    .expect("read the rows");
    rows
}

async fn conn(db: &common::TestDb) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
    db.pool.acquire().await.expect("a connection")
}

/// The one-item forms, one item after another, as the steps call them.
async fn one_by_one(
    conn: &mut PgConnection,
    registrations: &[(&str, NewCustomer, bool)],
    runs: &[Uuid],
) -> (Vec<Option<(Value, bool)>>, Vec<Option<Value>>, Vec<Link>, Vec<u64>) {
    let mut checks = Vec::new();
    for (identity, data, _) in registrations {
        checks.push(
            domain::registration_check(conn, identity, &data.email)
                .await
                .expect("check"),
        );
    }
    let mut created = Vec::new();
    for ((_, data, has_account), &run) in registrations.iter().zip(runs) {
        match domain::insert_customer(conn, data, *has_account, run).await {
            Ok(customer) => {
                domain::hold_event(conn, run, "customer.created", &json!({"email": customer.email}))
                    .await
                    .expect("hold");
                created.push(Some(comparable(&customer)));
            }
            Err(e) if domain::violates(&e, domain::ONE_ACCOUNT_PER_EMAIL) => created.push(None),
            Err(e) => panic!("insert: {e}"),
        }
    }
    let mut links = Vec::new();
    for (i, (identity, _, _)) in registrations.iter().enumerate() {
        links.push(
            domain::link_identity(conn, identity, "customer_id", &json!(format!("cus_{i}")))
                .await
                .expect("link"),
        );
    }
    let mut settled = Vec::new();
    for (i, &run) in runs.iter().enumerate() {
        settled.push(domain::settle_events(conn, run, i % 3 != 0).await.expect("settle"));
    }
    (checks, created, links, settled)
}

/// The set-based forms, one call each.
async fn set_based(
    conn: &mut PgConnection,
    registrations: &[(&str, NewCustomer, bool)],
    runs: &[Uuid],
) -> (Vec<Option<(Value, bool)>>, Vec<Option<Value>>, Vec<Link>, Vec<u64>) {
    let items: Vec<(&str, &str)> = registrations
        .iter()
        .map(|(identity, data, _)| (*identity, data.email.as_str()))
        .collect();
    let checks = domain::registration_checks(conn, &items).await.expect("checks");
    let inserts: Vec<(&NewCustomer, bool, Uuid)> = registrations
        .iter()
        .zip(runs)
        .map(|((_, data, has_account), &run)| (data, *has_account, run))
        .collect();
    let customers = domain::insert_customers(conn, &inserts).await.expect("inserts");
    let datas: Vec<Value> = customers.iter().flatten().map(|c| json!({"email": c.email})).collect();
    let events: Vec<(Uuid, &str, &Value)> = customers
        .iter()
        .zip(runs)
        .filter(|(c, _)| c.is_some())
        .map(|(_, &run)| run)
        .zip(&datas)
        .map(|(run, data)| (run, "customer.created", data))
        .collect();
    let ids = domain::hold_events(conn, &events).await.expect("hold");
    assert_eq!(ids.len(), events.len(), "one id per event");
    // Each id returned is the id of that item's event, as the one-item form's RETURNING gives.
    for (id, (run, _, _)) in ids.iter().zip(&events) {
        let stored: Option<Uuid> = sqlx::query_scalar("SELECT run_id FROM outbox_events WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .expect("read the event");
        assert_eq!(stored, Some(*run), "event {id}");
    }
    let values: Vec<Value> = (0..registrations.len()).map(|i| json!(format!("cus_{i}"))).collect();
    let links: Vec<(&str, &Value)> = registrations
        .iter()
        .zip(&values)
        .map(|((identity, _, _), value)| (*identity, value))
        .collect();
    let links = domain::link_identities(conn, &links, "customer_id")
        .await
        .expect("links");
    let settles: Vec<(Uuid, bool)> = runs.iter().enumerate().map(|(i, &run)| (run, i % 3 != 0)).collect();
    let settled = domain::settle_events_of(conn, &settles).await.expect("settle");
    let created = customers.iter().map(|c| c.as_ref().map(comparable)).collect();
    (checks, created, links, settled)
}

#[tokio::test]
async fn set_based_statements_answer_and_write_what_their_one_item_forms_do_one_after_another() {
    let (alone, together) = (seeded().await, seeded().await);
    let registrations = registrations();
    let runs: Vec<Uuid> = registrations.iter().map(|_| Uuid::now_v7()).collect();

    let expected = one_by_one(&mut *conn(&alone).await, &registrations, &runs).await;
    let got = set_based(&mut *conn(&together).await, &registrations, &runs).await;
    assert_eq!(got.0, expected.0, "the checks");
    assert_eq!(got.1, expected.1, "the customers inserted");
    assert_eq!(got.2, expected.2, "the links");
    assert_eq!(got.3, expected.3, "the events settled per run");
    assert_eq!(rows(&together.pool).await, rows(&alone.pool).await, "the rows left");

    // The cases the registrations were chosen for, so that the comparison covers each.
    assert_eq!(expected.0[1], None, "no such identity");
    assert_eq!(
        expected.0[2],
        Some((json!({"other": 1}), true)),
        "an email with an account"
    );
    let refused: Vec<usize> = (0..expected.1.len()).filter(|&i| expected.1[i].is_none()).collect();
    assert_eq!(
        refused,
        [2, 7],
        "the taken email, and the first item's in another spelling"
    );
    assert_eq!(
        expected.1[6].as_ref().map(|c| c["has_account"].clone()),
        Some(json!(false))
    );
    assert_eq!(expected.2[0], Link::Linked(None));
    assert_eq!(expected.2[1], Link::NotFound);
    assert_eq!(expected.2[3], Link::Taken(json!("cus_old")));
    assert_eq!(expected.2[4], Link::Taken(json!("cus_0")), "the first item named it");
    assert_eq!(expected.2[5], Link::Linked(None), "a null value links");
    assert_eq!(
        expected.3,
        [1, 1, 0, 1, 1, 1, 1, 0],
        "each inserted customer's one event, released or discarded"
    );
}

/// Distinct identities take the one statement (the call above, naming one twice, links one
/// at a time): outcomes as one after another, also where an item links what it already holds.
#[tokio::test]
async fn links_of_distinct_identities_in_one_statement_are_those_one_after_another() {
    let (alone, together) = (seeded().await, seeded().await);
    let value = |v: &str| json!(v);
    let (same, new) = (value("cus_old"), value("cus_new"));
    let items: Vec<(&str, &Value)> = vec![
        ("linked", &same),
        ("free1", &new),
        ("missing", &new),
        ("nullkey", &new),
        ("free2", &same),
    ];
    let mut expected = Vec::new();
    let mut one = conn(&alone).await;
    for (id, value) in &items {
        expected.push(
            domain::link_identity(&mut one, id, "customer_id", value)
                .await
                .expect("link"),
        );
    }
    let got = domain::link_identities(&mut *conn(&together).await, &items, "customer_id")
        .await
        .expect("links");
    assert_eq!(got, expected);
    assert_eq!(
        expected,
        [
            Link::Linked(Some(json!("cus_old"))),
            Link::Linked(None),
            Link::NotFound,
            Link::Linked(None),
            Link::Linked(None),
        ]
    );
    assert_eq!(rows(&together.pool).await, rows(&alone.pool).await);
}

/// A statement-level failure (here an item breaking the email CHECK, which the one-account
/// arbiter does not cover) fails the whole call and writes nothing of any item.
#[tokio::test]
async fn an_item_that_fails_the_statement_writes_nothing_of_any_item() {
    let db = seeded().await;
    let before = rows(&db.pool).await;
    let (good, bad) = (customer("good@x.io"), customer("   "));
    let mut tx = db.pool.begin().await.expect("begin");
    let failed =
        domain::insert_customers(&mut tx, &[(&good, true, Uuid::now_v7()), (&bad, true, Uuid::now_v7())]).await;
    let error = failed.expect_err("the CHECK fails the statement");
    assert!(
        matches!(&error, sqlx::Error::Database(e) if e.constraint() == Some("customers_email_check")),
        "{error}"
    );
    tx.rollback().await.expect("rollback");
    assert_eq!(rows(&db.pool).await, before, "nothing written");
    // An empty call writes nothing and answers nothing.
    let mut conn = conn(&db).await;
    assert!(
        domain::insert_customers(&mut conn, &[])
            .await
            .expect("empty")
            .is_empty()
    );
    assert!(
        domain::registration_checks(&mut conn, &[])
            .await
            .expect("empty")
            .is_empty()
    );
    assert!(domain::hold_events(&mut conn, &[]).await.expect("empty").is_empty());
    assert!(
        domain::link_identities(&mut conn, &[], "k")
            .await
            .expect("empty")
            .is_empty()
    );
    assert!(
        domain::settle_events_of(&mut conn, &[])
            .await
            .expect("empty")
            .is_empty()
    );
    assert_eq!(rows(&db.pool).await, before);
}

/// Many links lock their identities in id order, whatever the items' order, so two calls
/// naming the same identities in other orders wait for each other instead of deadlocking.
/// Seen in the locks: a call that finds `free2` held has already locked `free1`, though its
/// items name `free2` first; both for distinct identities (one statement) and for a call
/// naming one twice (linked one at a time).
#[tokio::test]
async fn links_lock_their_identities_in_id_order() {
    let (distinct, twice): (&[&str], &[&str]) = (&["free2", "free1"], &["free2", "free1", "free2"]);
    for ids in [distinct, twice] {
        let db = seeded().await;
        let mut holder = db.pool.begin().await.expect("begin");
        sqlx::query("SELECT 1 FROM auth_identities WHERE id = 'free2' FOR UPDATE")
            .execute(&mut *holder)
            .await
            .expect("hold free2");
        let (pool, ids_owned): (PgPool, Vec<String>) = (db.pool.clone(), ids.iter().map(|s| s.to_string()).collect());
        let linking = tokio::spawn(async move {
            let mut tx = pool.begin().await.expect("begin");
            let value = json!("cus_x");
            let items: Vec<(&str, &Value)> = ids_owned.iter().map(|id| (id.as_str(), &value)).collect();
            let links = domain::link_identities(&mut tx, &items, "customer_id")
                .await
                .expect("links");
            tx.commit().await.expect("commit");
            links
        });
        common::eventually(std::time::Duration::from_secs(10), "the call waits for free2", || {
            let pool = db.pool.clone();
            async move {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'
                       AND query LIKE '%auth_identities%' AND query NOT LIKE '%pg_stat_activity%'",
                )
                .fetch_one(&pool)
                .await
                .expect("activity");
                (waiting == 1).then_some(())
            }
        })
        .await;
        let mut other = db.pool.begin().await.expect("begin");
        let free1 = sqlx::query("SELECT 1 FROM auth_identities WHERE id = 'free1' FOR UPDATE NOWAIT")
            .execute(&mut *other)
            .await;
        assert!(
            matches!(&free1, Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03")),
            "{ids:?}: free1 is locked by the waiting call: {free1:?}"
        );
        other.rollback().await.expect("rollback");
        holder.rollback().await.expect("release free2");
        let links = linking.await.expect("the call does not panic");
        let expected: Vec<Link> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| match ids[..i].contains(id) {
                true => Link::Linked(Some(json!("cus_x"))),
                false => Link::Linked(None),
            })
            .collect();
        assert_eq!(links, expected, "{ids:?}");
    }
}
