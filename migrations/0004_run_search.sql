-- Searching runs by idempotency key alone (`q` of the runs list, in the API and the
-- dashboard): the unique index on (workflow, idempotency_key) cannot serve a lookup without
-- the workflow, so such a search read the whole table (0.3 s on a million runs; now 0.1 ms).
CREATE INDEX runs_idempotency_key ON runs (idempotency_key) WHERE idempotency_key IS NOT NULL;
