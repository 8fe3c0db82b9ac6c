-- The W3C trace context (`traceparent`) of the span that enqueued the
-- event, written by enqueue when the outbox crate is built with its
-- `trace` feature, NULL otherwise. A relay sends it as the message header
-- `traceparent` (unless the event has a header of that name already), so
-- that the consumer continues the producer's trace.
ALTER TABLE outbox_events ADD COLUMN traceparent TEXT;
