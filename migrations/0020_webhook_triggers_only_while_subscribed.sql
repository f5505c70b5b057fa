-- The webhook triggers are on only while an enabled subscription wants what they report.
--
-- With no subscription, 0015's row triggers still ran a PL/pgSQL function at every run's
-- finish and every outbox release, to find nobody: in the bench (no subscription), turning
-- them off cut PostgreSQL's CPU per registration by about 0.12 ms of 0.88 (three pairs).
-- A statement trigger on `webhook_subscriptions` now turns them on with the first enabled
-- subscription that wants `run.*` (the two run triggers) or `event.*` (the release trigger),
-- and off again with the last, in the transaction that changes the subscriptions: a
-- delivery is still written exactly when a change that a committed subscription wants
-- commits.
--
-- Why that holds: `ALTER TABLE ... ENABLE TRIGGER` takes a SHARE ROW EXCLUSIVE lock, so the
-- subscription's transaction waits for every transaction that is writing the table, and
-- every writer after it waits for the subscription to commit and then sees the trigger.
-- A change that commits before the subscription was never wanted by it; one that commits
-- after it fires the trigger. The lock is taken only when the state changes (the first
-- subscription, or the last gone), and then for as long as the writers in flight take:
-- those of the hot path are short; `lock_timeout` bounds the wait, and the subscription's
-- change fails with it rather than stall the hot path.
--
-- Two changes of the subscriptions at once are decided one after the other (an advisory
-- lock), each on what is committed once it holds the lock (READ COMMITTED reads anew at
-- each statement): a transaction that adds the first subscription while another removes
-- the last leaves the triggers as the subscriptions that committed last want. Under a
-- snapshot taken earlier (REPEATABLE READ or SERIALIZABLE) a subscription committed
-- meanwhile could be missed, so such a transaction never turns one off: it leaves all three on.

CREATE FUNCTION webhook_set_trigger(tab regclass, trig name, wanted boolean) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    IF wanted <> EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = tab AND tgname = trig AND tgenabled <> 'D') THEN
        EXECUTE format('ALTER TABLE %s %s TRIGGER %I', tab, CASE WHEN wanted THEN 'ENABLE' ELSE 'DISABLE' END, trig);
    END IF;
END;
$$;

-- SECURITY DEFINER: altering a table needs its owner (the role that ran the migrations),
-- and the role changing subscriptions need not be it.
CREATE FUNCTION webhook_triggers_follow_subscriptions() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT SET lock_timeout = '5s' AS $$
DECLARE
    runs_wanted boolean;
    events_wanted boolean;
    fresh boolean := current_setting('transaction_isolation') = 'read committed';
BEGIN
    -- Any constant nothing else takes: "webhooks" in ASCII, as a big-endian int8.
    PERFORM pg_advisory_xact_lock(8603390863846894451);
    SELECT coalesce(bool_or(e LIKE 'run.%'), false), coalesce(bool_or(e LIKE 'event.%'), false)
    INTO runs_wanted, events_wanted
    FROM webhook_subscriptions s, unnest(s.events) e
    WHERE s.enabled;
    PERFORM webhook_set_trigger('runs', 'runs_webhook_on_finish', runs_wanted OR NOT fresh);
    PERFORM webhook_set_trigger('runs', 'runs_webhook_on_insert_finished', runs_wanted OR NOT fresh);
    PERFORM webhook_set_trigger('outbox_events', 'outbox_webhook_on_release', events_wanted OR NOT fresh);
    RETURN NULL;
END;
$$;

CREATE TRIGGER webhook_subscriptions_switch_triggers
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON webhook_subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_triggers_follow_subscriptions();

-- Set them as the subscriptions there are now want.
UPDATE webhook_subscriptions SET enabled = enabled WHERE false;
