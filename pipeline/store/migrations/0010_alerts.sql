-- Alert state and history, written by the alert evaluator (pipeline/alerts/state.py).
-- One row per write of one alert episode; an episode is one alert (fingerprint = its labels) from
-- the moment its condition began (active_at) until it resolved or cleared. The newest row of an
-- episode (highest revision) is its state: read with FINAL, or argMax(..., revision).
--   state: pending (condition holds, `for` not yet met), firing (sent to Alertmanager),
--          resolved (was firing, condition gone: ends_at set), cleared (was pending, never fired).
--   sent_state: what Alertmanager was last told (none, firing, resolved), so a restarted evaluator
--          neither re-fires nor forgets a resolve it could not deliver.
-- Dashboards: firing now = `SELECT * FROM alerts FINAL WHERE state = 'firing'`; history =
-- episodes with starts_at in the range.
CREATE TABLE IF NOT EXISTS ${db}.alerts ${on_cluster}
(
    alertname    LowCardinality(String),
    fingerprint  String COMMENT 'hash of the sorted labels',
    active_at    DateTime64(3, 'UTC') COMMENT 'when the condition began (from the samples)',
    severity     LowCardinality(String),
    state        Enum8('pending' = 0, 'firing' = 1, 'resolved' = 2, 'cleared' = 3),
    labels       Map(LowCardinality(String), String),
    annotations  Map(LowCardinality(String), String),
    starts_at    Nullable(DateTime64(3, 'UTC')) COMMENT 'when it started firing (the startsAt sent to Alertmanager)',
    ends_at      Nullable(DateTime64(3, 'UTC')) COMMENT 'when it resolved or cleared',
    last_eval    DateTime64(3, 'UTC') COMMENT 'evaluation that wrote this row',
    value        Nullable(Float64) COMMENT 'the number the alert is about (docs/alerts.md)',
    sent_state   Enum8('none' = 0, 'firing' = 1, 'resolved' = 2),
    last_sent_at Nullable(DateTime64(3, 'UTC')),
    revision     UInt64
)
ENGINE = ${replicated}ReplacingMergeTree(revision)
PARTITION BY toYYYYMM(active_at)
ORDER BY (alertname, fingerprint, active_at);
