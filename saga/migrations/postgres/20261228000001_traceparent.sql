-- Runs with search_path = saga.

-- The W3C trace context (`traceparent`) of the span that started the
-- instance, written when the saga crate is built with its `trace` feature
-- (NULL otherwise): each step's span continues that trace.
ALTER TABLE instances ADD COLUMN IF NOT EXISTS traceparent TEXT;
