-- A run's writes between its start and its end (an HTTP step's outcome, a waiting step's
-- record, a heartbeat) keep its status, its lease owner and everything else an index of
-- `runs` reads: they could be HOT updates, the new version beside the old one in its page,
-- no index touched, the old one pruned in place. None was (`pg_stat_user_tables`: 23 HOT of
-- 27,075 updates of `runs` in one `sagaflow bench`), for two reasons:
--
-- 1. `runs_paused` (0013) indexed `updated_at`, which every write sets, and an update that
--    changes a column any index reads, whatever the index's predicate, is never HOT. No query
--    reads through it: paused runs are found by `runs_by_status`. It goes.
-- 2. Inserts fill a page to the brim, so a later version of a run finds no room beside it and
--    moves (with new entries in every index). A fillfactor of 85 keeps about two versions'
--    worth of each new page (a run's row is about 530 bytes) for its rows' later writes;
--    pruning reclaims the dead ones when the page is next read. It costs the runs that are
--    never updated (a registration inserted finished by its first segment) 15% more pages.
--    Existing pages keep their fill until rewritten.
--
-- `tests/engine.rs` (`a_run_s_writes_between_its_start_and_its_end_are_hot_updates`) holds
-- a run's writes between its start and its end to being HOT.

DROP INDEX runs_paused;
ALTER TABLE runs SET (fillfactor = 85);
