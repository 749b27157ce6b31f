-- Attribution beyond one tenant per GPU (docs/allocation.md): the allocation source could not answer
-- (`allocation_unknown`), several jobs share the GPU (`shares`: each holder and its weight), and MIG
-- instances (one sample per instance: its parent GPU, GPU/compute instance ids, profile and its compute
-- slices out of the GPU's). Raw columns only: every existing row reads as what it was (one holder or
-- none, a whole GPU), so nothing already billed changes.

ALTER TABLE ${db}.gpu_samples ${on_cluster}
    ADD COLUMN IF NOT EXISTS allocation_unknown Bool DEFAULT false
        COMMENT 'the allocation source could not say who held the GPU: billed to nobody' AFTER job,
    ADD COLUMN IF NOT EXISTS shares Array(Tuple(tenant String, job String, weight UInt32)) CODEC(ZSTD(1))
        COMMENT 'several holders of one GPU and their weights; empty = one holder or none' AFTER allocation_unknown,
    ADD COLUMN IF NOT EXISTS parent_uuid LowCardinality(String) DEFAULT ''
        COMMENT 'MIG instance: the physical GPU; empty = a whole GPU' AFTER shares,
    ADD COLUMN IF NOT EXISTS gpu_instance_id Nullable(UInt32) AFTER parent_uuid,
    ADD COLUMN IF NOT EXISTS compute_instance_id Nullable(UInt32) AFTER gpu_instance_id,
    ADD COLUMN IF NOT EXISTS mig_profile LowCardinality(String) DEFAULT '' AFTER compute_instance_id,
    ADD COLUMN IF NOT EXISTS slices Nullable(UInt8) COMMENT 'MIG instance: compute slices held' AFTER mig_profile,
    ADD COLUMN IF NOT EXISTS slices_total Nullable(UInt8) COMMENT 'MIG instance: compute slices of the GPU' AFTER slices;

ALTER TABLE ${db}.agent_reports ${on_cluster}
    ADD COLUMN IF NOT EXISTS allocation_unknown_total UInt64 DEFAULT 0;
