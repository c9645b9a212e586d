"""Transfer rules, one file each: how many (or which) positions of the current block a step commits. Each
registers a `Transfer` (engine/decoding/registry.py); files here are discovered automatically. The fixed
schedules (llada, dream, rnd1) share select.top_count; Dream's origin rule lives with its remasking rule."""
