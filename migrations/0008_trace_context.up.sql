-- The W3C traceparent of the request that created an execution: the worker continues that
-- trace when it takes the job from the queue (opsconductor.common.tracing). NULL when tracing
-- is off. Written by the INSERT that creates the execution: no extra statement.
ALTER TABLE executions ADD COLUMN trace_context VARCHAR(128);
