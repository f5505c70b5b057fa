-- A run's writes between its start and its end (an HTTP step's outcome, a waiting step's
-- record, a heartbeat) keep its status, its lease owner and everything else an index of
-- `runs` reads, so they are meant to be HOT updates: the new version beside the old one in
-- its page (0001 gave `runs` a fillfactor of 70 for that), no index touched, the old one
-- pruned in place. None was (`pg_stat_user_tables`: 23 HOT of 27,075 updates of `runs` in
-- one `sagaflow bench`): `runs_paused` (0013) indexed `updated_at`, which every write sets,
-- and an update that changes a column any index reads, whatever that index's predicate, is
-- never HOT. No query reads through it (paused runs are found by `runs_by_status`), so it
-- goes.
--
-- `tests/engine.rs` (`a_run_s_writes_between_its_start_and_its_end_are_hot_updates`) holds
-- a run's writes between its start and its end to being HOT.

DROP INDEX runs_paused;
