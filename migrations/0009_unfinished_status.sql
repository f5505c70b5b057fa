-- The complement of run_status_is_terminal (0007), written as the list of unfinished statuses
-- so that, once inlined, a query looking for the few unfinished runs can use an index on
-- status. (A test checks it is the exact complement.)
CREATE FUNCTION run_status_is_unfinished(status run_status) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT status IN ('pending', 'running', 'compensating') $$;
