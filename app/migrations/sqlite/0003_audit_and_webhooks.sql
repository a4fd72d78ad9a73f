-- Append-only audit trail of state-changing actions (SQLite has no roles;
-- on PostgreSQL the runtime role gets INSERT and SELECT only).
CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT,
    outcome     TEXT NOT NULL,
    request_id  TEXT,
    detail      TEXT
);
CREATE INDEX audit_log_action ON audit_log (action, id);
CREATE INDEX audit_log_actor ON audit_log (actor, id);

-- Accepted webhook deliveries.
CREATE TABLE webhook_deliveries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    source      TEXT NOT NULL,
    nonce       TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    body_sha256 TEXT NOT NULL,
    run_id      TEXT
);

-- Nonces seen within the replay window, when Redis is not there to remember them.
CREATE TABLE webhook_nonces (
    source      TEXT NOT NULL,
    nonce       TEXT NOT NULL,
    expires_at  BIGINT NOT NULL,
    PRIMARY KEY (source, nonce)
);
CREATE INDEX webhook_nonces_expiry ON webhook_nonces (expires_at);
