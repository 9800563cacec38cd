BEGIN TRANSACTION;
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    status INTEGER NOT NULL,
    answer TEXT NOT NULL,
    created_at REAL NOT NULL
);
INSERT INTO "idempotency" VALUES('key-201','print-201',201,'{"body":{"session_id":"active-0"},"headers":{"Location":"/x"}}',1764590400.0);
INSERT INTO "idempotency" VALUES('key-422','print-422',422,'{"body":{"error":"invalid_field"},"headers":{}}',1764590401.0);
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY,
    vehicle_id TEXT NOT NULL,
    state TEXT NOT NULL,
    record TEXT NOT NULL,
    updated_at REAL NOT NULL
);
INSERT INTO "sessions" VALUES('active-0','ev-active-0','active','{"session_id":"active-0","vehicle_id":"ev-active-0","substation":"substation-1","amount_kw":11.0,"started_at":"2026-12-01T12:00:00.000Z","ends_at":"2099-01-01T00:00:00.000Z","queued_at":null,"token_digest":"digest-active-0"}',1796126400.0);
INSERT INTO "sessions" VALUES('active-1','ev-active-1','active','{"session_id":"active-1","vehicle_id":"ev-active-1","substation":"substation-2","amount_kw":11.0,"started_at":"2026-12-01T12:00:00.000Z","ends_at":"2099-01-01T00:00:00.000Z","queued_at":null,"token_digest":"digest-active-1"}',1796126400.0);
INSERT INTO "sessions" VALUES('active-2','ev-active-2','active','{"session_id":"active-2","vehicle_id":"ev-active-2","substation":"substation-3","amount_kw":11.0,"started_at":"2026-12-01T12:00:00.000Z","ends_at":"2099-01-01T00:00:00.000Z","queued_at":null,"token_digest":"digest-active-2"}',1796126400.0);
INSERT INTO "sessions" VALUES('pending-0','ev-pending-0','pending','{"session_id":"pending-0","vehicle_id":"ev-pending-0","amount_kw":7.0,"created_at":"2026-12-01T12:00:00.000Z"}',1796126400.0);
INSERT INTO "sessions" VALUES('queued-0','ev-queued-0','queued','{"vehicle_id":"ev-queued-0","request":{"vehicle_id":"ev-queued-0","amount":22.0,"duration_seconds":60.0,"session_id":"queued-0"},"queued_at":"2026-12-01T12:00:00.000Z","expires_at":"2026-12-01T12:05:00.000Z","token_digest":"digest-queued-0"}',1796126400.0);
INSERT INTO "sessions" VALUES('queued-1','ev-queued-1','queued','{"vehicle_id":"ev-queued-1","request":{"vehicle_id":"ev-queued-1","amount":22.0,"duration_seconds":60.0,"session_id":"queued-1"},"queued_at":"2026-12-01T12:00:01.000Z","expires_at":"2026-12-01T12:05:01.000Z","token_digest":"digest-queued-1"}',1796126401.0);
INSERT INTO "sessions" VALUES('stopped-0','ev-stopped-0','stopped','{"session_id":"stopped-0","vehicle_id":"ev-stopped-0","amount_kw":11.0,"state":"stopped","finished_at":"2026-12-01T12:00:02.000Z","session":{"session_id":"stopped-0","vehicle_id":"ev-stopped-0","substation":"substation-1","amount_kw":11.0,"started_at":"2026-12-01T12:00:02.000Z","ends_at":"2026-12-01T13:00:02.000Z","queued_at":null,"token_digest":"digest-stopped-0"},"queued_at":null,"final":{"state":"ended","energy_kwh":0.5,"end_reason":"stopped"},"token_digest":"digest-stopped-0"}',1796126402.0);
INSERT INTO "sessions" VALUES('cancelled-0','ev-cancelled-0','cancelled','{"session_id":"cancelled-0","vehicle_id":"ev-cancelled-0","amount_kw":5.0,"state":"cancelled","finished_at":"2026-12-01T12:00:02.000Z","session":null,"queued_at":"2026-12-01T12:00:02.000Z","final":null,"token_digest":"digest-cancelled-0"}',1796126402.0);
CREATE INDEX sessions_by_state ON sessions (state, updated_at);
CREATE INDEX idempotency_by_age ON idempotency (created_at);
COMMIT;
