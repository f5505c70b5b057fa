-- The dashboard's own state, kept on the server so that logging out ends a session on every
-- instance, and so that nothing an unauthenticated visitor can see is derived from the admin
-- token (security probe 2, F3 and F9).

-- The random secret every instance signs session cookies and CSRF tokens with (mixed with the
-- admin token, so changing the token still ends every session). One row, created by the first
-- instance that starts; never shown, never logged.
CREATE TABLE dashboard_secret (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    secret bytea NOT NULL CHECK (length(secret) = 32),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Open sessions, by the SHA-256 of their id (the id itself is only in the browser's cookie).
CREATE TABLE dashboard_sessions (
    id_hash bytea PRIMARY KEY,
    operator text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX dashboard_sessions_expires_at ON dashboard_sessions (expires_at);

-- Login forms already submitted, kept until their form would have expired anyway: each form
-- can be submitted once.
CREATE TABLE used_login_nonces (
    nonce_hash bytea PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX used_login_nonces_expires_at ON used_login_nonces (expires_at);
