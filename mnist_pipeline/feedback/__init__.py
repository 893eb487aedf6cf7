"""Users' corrections, the loop that turns them into training data (docs/feedback.md).

store (the live, append-only store the server and the CLI write) · snapshot (frozen, DVC-tracked
shards: the only thing the pipeline reads) · curate (the user split, the admitted part and the
defence against bad labels) · cli (`mnist-feedback add/import/status/snapshot/review`).
"""
