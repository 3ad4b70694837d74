"""Batches (OpenAI Batch API): validate an input file, split it into shard jobs, and let the
last shard to finish write the output and error files and complete the parent job.

A batch is a parent job (type `batch`, never claimed by a worker) plus shard jobs (type
`shard`, parent_id set) of about settings.shard_size items each. Shards count themselves on the
parent with one UPDATE (shards_done + 1) read back in the same transaction; whoever brings
it to shards_total finalizes. Finalizing takes a lease on the parent row (worker,
heartbeat_at), so a crash mid-way is retried by the reaper's `finalize_stalled`.

schemas: the OpenAI-shaped bodies and objects; input_file: checking an input file line by
line; create: the parent, its shards and items; finalize: counting finished shards and
writing the output files; views: the OpenAI batch object and the queries behind it.
"""
