-- The customer domain the `create-customer-account` workflow works on (after Medusa's
-- customer and auth modules), and the outbox its events wait in until the run's outcome is
-- known. The engine knows none of these tables.

CREATE TABLE customers (
    id                           text PRIMARY KEY,
    -- Stored trimmed and lowercased, so one address cannot register twice in two spellings.
    email                        text        NOT NULL CHECK (email = lower(btrim(email)) AND email <> ''),
    has_account                  boolean     NOT NULL DEFAULT false,
    first_name                   text,
    last_name                    text,
    company_name                 text,
    phone                        text,
    metadata                     jsonb,
    default_billing_address_id   text,
    default_shipping_address_id  text,
    -- The workflow run that created the customer: lets tests prove compensation removed it.
    created_by_run               uuid,
    created_at                   timestamptz NOT NULL DEFAULT now(),
    updated_at                   timestamptz NOT NULL DEFAULT now(),
    deleted_at                   timestamptz
);

-- At most one registered (has_account) customer per email: two racing registrations
-- cannot both succeed.
CREATE UNIQUE INDEX customers_one_account_per_email ON customers (email) WHERE has_account AND deleted_at IS NULL;
CREATE INDEX customers_by_email ON customers (email, created_at DESC);
CREATE INDEX customers_by_run ON customers (created_by_run) WHERE created_by_run IS NOT NULL;

CREATE TABLE customer_addresses (
    id                   text PRIMARY KEY,
    customer_id          text        NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    address_name         text,
    is_default_shipping  boolean     NOT NULL DEFAULT false,
    is_default_billing   boolean     NOT NULL DEFAULT false,
    company              text,
    first_name           text,
    last_name            text,
    address_1            text,
    address_2            text,
    city                 text,
    country_code         text,
    province             text,
    postal_code          text,
    phone                text,
    metadata             jsonb,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    deleted_at           timestamptz
);

CREATE INDEX customer_addresses_by_customer ON customer_addresses (customer_id);

CREATE TABLE auth_identities (
    id            text PRIMARY KEY,
    provider      text        NOT NULL CHECK (provider <> ''),
    entity_id     text        NOT NULL CHECK (entity_id <> ''),
    app_metadata  jsonb       NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(app_metadata) = 'object'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, entity_id)
);

CREATE TYPE outbox_status AS ENUM ('held', 'released', 'discarded');

CREATE TABLE outbox_events (
    id             text PRIMARY KEY,
    name           text          NOT NULL,
    data           jsonb         NOT NULL,
    run_id         uuid          NOT NULL,
    status         outbox_status NOT NULL DEFAULT 'held',
    created_at     timestamptz   NOT NULL DEFAULT now(),
    released_at    timestamptz,
    -- The releasing transaction. Consumers page by (released_xid, id) and only see events
    -- whose releasing transaction is older than every transaction still running, so an event
    -- released by a slower transaction can never appear behind a consumer's cursor.
    released_xid   xid8,
    CHECK ((status = 'released') = (released_xid IS NOT NULL AND released_at IS NOT NULL))
);

CREATE INDEX outbox_events_by_run ON outbox_events (run_id);
CREATE INDEX outbox_events_released ON outbox_events (released_xid, id) WHERE status = 'released';
