-- Indexes the retention sweep and a worker's start were missing.
--
-- `retry_of` and `retried_by` reference `runs (id) ON DELETE SET NULL`, so deleting a run
-- makes PostgreSQL look for the runs that point at it: without an index on each column, two
-- sequential scans of `runs` per deleted run. Measured on 200,000 runs, deleting 100 took
-- 11 s; at a million runs, a day's sweep would take hours and hold its rows locked meanwhile.
-- Few runs are retries, so these indexes are partial and nearly empty, and cost a write
-- nothing unless it sets a link.
CREATE INDEX runs_retry_of ON runs (retry_of) WHERE retry_of IS NOT NULL;
CREATE INDEX runs_retried_by ON runs (retried_by) WHERE retried_by IS NOT NULL;

-- A worker's start makes the parked runs of each workflow version it can run due again; that
-- was a sequential scan of `runs` per version. Parked runs are rare.
CREATE INDEX runs_parked ON runs (workflow, workflow_version) WHERE parked_reason IS NOT NULL;
