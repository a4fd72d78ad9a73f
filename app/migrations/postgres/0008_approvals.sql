-- Approval steps: one row per approval step a run has reached. The row is
-- written when the step starts waiting (its job moves to the non-claimable
-- state 'awaiting_approval', with no lease) and is decided once: by a person
-- (approved, rejected), by its deadline (expired_approved, expired_rejected)
-- or by the run's cancellation (cancelled). `decision` is NULL while pending.
-- Times are milliseconds since the Unix epoch on the database clock.
CREATE TABLE approvals (
    run_id       TEXT COLLATE "C" NOT NULL,
    step_index   BIGINT NOT NULL,
    prompt       TEXT NOT NULL,
    on_timeout   TEXT NOT NULL,
    on_reject    TEXT NOT NULL,
    requested_at BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    decision     TEXT,
    decided_by   TEXT,
    comment      TEXT,
    decided_at   BIGINT,
    PRIMARY KEY (run_id, step_index)
);
-- The inbox (pending, oldest first) and the expiry sweep read only pending
-- rows; decided rows pile up outside both indexes.
CREATE INDEX approvals_pending ON approvals (requested_at, run_id, step_index) WHERE decision IS NULL;
CREATE INDEX approvals_expiry ON approvals (expires_at) WHERE decision IS NULL;
CREATE INDEX approvals_requested ON approvals (requested_at, run_id, step_index);
