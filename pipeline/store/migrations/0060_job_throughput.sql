-- Throughput jobs report over OTLP (`gpufleet.job.tokens`, `gpufleet.job.samples`), attributed to GPUs by the
-- agent as measured FLOPs are and carried per GPU sample (docs/wire-format.md: tokens_measured,
-- samples_measured). NULL: nothing reported for that GPU and interval (never a zero). The jobs view
-- (`gpufleet jobs`, the Jobs board) sums them per job over a window.

ALTER TABLE ${db}.gpu_samples ${on_cluster}
    ADD COLUMN IF NOT EXISTS tokens_measured Nullable(Float64) CODEC(ZSTD(1))
        COMMENT 'tokens the job(s) reported processing during the interval' AFTER flops_measured,
    ADD COLUMN IF NOT EXISTS samples_measured Nullable(Float64) CODEC(ZSTD(1))
        COMMENT 'samples the job(s) reported processing during the interval' AFTER tokens_measured;
