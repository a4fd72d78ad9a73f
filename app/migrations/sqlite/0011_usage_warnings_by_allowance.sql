-- Warning thresholds are reached once per tenant, period, meter, threshold
-- AND allowance in force (issue: after an upgrade from 100 runs to 10,000
-- mid-month, the 80 % and 100 % already reached under the 100 silenced the
-- new plan's 80 % and 100 %). A plan change back to an allowance already
-- warned about does not warn again.
--
-- A new table rather than a new primary key on `usage_thresholds`: a build
-- of migration 10 or older (a rollback) writes `usage_thresholds` with
-- `ON CONFLICT (tenant, period, meter, threshold)`, which needs that key to
-- stay. This build reads and writes `usage_warnings` only; the rows reached
-- so far are copied, so nothing is warned about twice.
CREATE TABLE usage_warnings (
    tenant      TEXT NOT NULL,
    period      TEXT NOT NULL,
    meter       TEXT NOT NULL,
    allowance   BIGINT NOT NULL,
    threshold   TEXT NOT NULL,
    used        BIGINT NOT NULL,
    run_id      TEXT,
    crossed_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant, period, meter, allowance, threshold)
);
INSERT INTO usage_warnings (tenant, period, meter, allowance, threshold, used, run_id, crossed_at)
    SELECT tenant, period, meter, allowance, threshold, used, run_id, crossed_at FROM usage_thresholds;
