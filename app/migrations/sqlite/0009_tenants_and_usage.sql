-- Tenants, plans and usage metering (issue 13).
--
-- Every run belongs to the tenant of the key that created it. Runs created
-- before this migration belong to `anonymous`, the tenant of the open local
-- mode (there were no tenants then); an admin key sees them, and
-- `PUT /tenants/anonymous/plan` bills them like any tenant.
ALTER TABLE runs ADD COLUMN tenant TEXT NOT NULL DEFAULT 'anonymous';
CREATE INDEX runs_tenant_id ON runs (tenant, id);
-- The tenant of the actor of an audit row (NULL: system rows and failed
-- authentications, which have no tenant).
ALTER TABLE audit_log ADD COLUMN tenant TEXT;

-- The usage ledger: append-only, one row per counted thing (a run created,
-- a step executed, the tokens of one LLM step, an approval decision), in the
-- same transaction as what it counts. `period` is the UTC month (YYYY-MM) of
-- the database clock at that moment; `at` is that clock in ms.
CREATE TABLE usage_ledger (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant      TEXT NOT NULL,
    meter       TEXT NOT NULL,
    quantity    BIGINT NOT NULL,
    period      TEXT NOT NULL,
    run_id      TEXT,
    step_index  BIGINT,
    source      TEXT NOT NULL,
    at          BIGINT NOT NULL
);
CREATE INDEX usage_ledger_period ON usage_ledger (period, tenant, meter);
-- A step's usage is recorded once: a second row for the same step and meter
-- is refused by the database, whatever the code above it does.
CREATE UNIQUE INDEX usage_ledger_once_per_step ON usage_ledger (run_id, step_index, meter)
    WHERE meter IN ('steps', 'llm_tokens');

-- Counters per tenant, period and meter, kept in the same transaction as the
-- ledger rows (so they always equal the ledger's sums; `usage verify` checks
-- it). Run admission locks the tenant's `runs` row, which makes the
-- allowance exact across API replicas.
CREATE TABLE usage_counters (
    tenant      TEXT NOT NULL,
    period      TEXT NOT NULL,
    meter       TEXT NOT NULL,
    shard       BIGINT NOT NULL DEFAULT 0,
    used        BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant, period, meter, shard)
);

-- Plan assignments made through the API, append-only: the newest row of a
-- tenant is its plan from `changed_at` on (overriding the plans file's
-- `tenants` map); older rows prorate the invoice preview.
CREATE TABLE tenant_plan_changes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant      TEXT NOT NULL,
    plan        TEXT NOT NULL,
    changed_at  BIGINT NOT NULL,
    changed_by  TEXT NOT NULL
);
CREATE INDEX tenant_plan_changes_tenant ON tenant_plan_changes (tenant, id);

-- Warning thresholds crossed, once per tenant, period, meter and threshold.
CREATE TABLE usage_thresholds (
    tenant      TEXT NOT NULL,
    period      TEXT NOT NULL,
    meter       TEXT NOT NULL,
    threshold   TEXT NOT NULL,
    used        BIGINT NOT NULL,
    allowance   BIGINT NOT NULL,
    run_id      TEXT,
    crossed_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant, period, meter, threshold)
);
