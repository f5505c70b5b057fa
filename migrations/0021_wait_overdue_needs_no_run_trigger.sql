-- A subscription to `run.wait_overdue` alone no longer turns the run triggers on.
--
-- 0020 switched the two run triggers on for any enabled subscription to a `run.*` event. But
-- `run.wait_overdue` reports no change of a run: the engine's sweep writes those deliveries
-- itself (webhooks::store::enqueue_overdue), and the triggers report only a run's finish
-- (`'run.' || status`). Such a subscription made every finish pay a PL/pgSQL call that
-- found nothing to deliver. Everything else is as in 0020, restated because CREATE OR
-- REPLACE takes the whole definition, options included.

CREATE OR REPLACE FUNCTION webhook_triggers_follow_subscriptions() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT SET lock_timeout = '5s' AS $$
DECLARE
    runs_wanted boolean;
    events_wanted boolean;
    fresh boolean := current_setting('transaction_isolation') = 'read committed';
BEGIN
    -- Any constant nothing else takes: "webhooks" in ASCII, as a big-endian int8.
    PERFORM pg_advisory_xact_lock(8603390863846894451);
    SELECT coalesce(bool_or(e LIKE 'run.%' AND e <> 'run.wait_overdue'), false),
           coalesce(bool_or(e LIKE 'event.%'), false)
    INTO runs_wanted, events_wanted
    FROM webhook_subscriptions s, unnest(s.events) e
    WHERE s.enabled;
    PERFORM webhook_set_trigger('runs', 'runs_webhook_on_finish', runs_wanted OR NOT fresh);
    PERFORM webhook_set_trigger('runs', 'runs_webhook_on_insert_finished', runs_wanted OR NOT fresh);
    PERFORM webhook_set_trigger('outbox_events', 'outbox_webhook_on_release', events_wanted OR NOT fresh);
    RETURN NULL;
END;
$$;

-- Set them as the subscriptions there are now want (turns the run triggers off where only
-- wait-overdue subscriptions asked for them).
UPDATE webhook_subscriptions SET enabled = enabled WHERE false;
