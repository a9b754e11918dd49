"""What each part runs at: ``SIZES["full"]`` (the GPU figures) and ``SIZES["tiny"]`` (``--tiny``: the
same code paths in seconds on a CPU)."""

SIZES = {
    "full": {
        "numerics": dict(
            backbone="dit",
            kwargs=dict(depth=2, hidden_size=128, num_heads=4, patch_size=2),
            shape=(4, 16, 16),
            batch=8,
            num_classes=10,
        ),
        "bench": dict(
            backbone="dit_b_2",
            shape=(4, 32, 32),
            batch=256,
            min_batch=8,
            steps=10,
            warmup=3,
            precision="bf16",
            compile_backend="inductor",
        ),
        "sampling": dict(
            models=(("dit_b_2", "DiT-B/2", {}), ("dit_xl_2", "DiT-XL/2", {})),
            shape=(4, 32, 32),
            num_classes=1000,
            batch=256,
            min_batch=8,
            warmup=2,
            iters=10,
        ),
        "distributed": dict(
            toy=["train.steps=300"],
            digits=["train.steps=200", "eval.every=100", "eval.num_samples=500"],
            timeouts=dict(smoke=60, toy=150, digits=200),
        ),
    },
    "tiny": {
        "numerics": dict(
            backbone="dit",
            kwargs=dict(depth=2, hidden_size=32, num_heads=2, patch_size=2),
            shape=(4, 8, 8),
            batch=4,
            num_classes=10,
        ),
        "bench": dict(
            backbone="test_dit",
            shape=(4, 8, 8),
            batch=4,
            min_batch=1,
            steps=2,
            warmup=1,
            precision="bf16",
            compile_backend="eager",
        ),
        "sampling": dict(
            models=(
                ("test_dit", "test_dit", {}),
                ("dit", "dit depth 2 width 64", dict(depth=2, hidden_size=64, num_heads=2)),
            ),
            shape=(4, 8, 8),
            num_classes=10,
            batch=4,
            min_batch=1,
            warmup=1,
            iters=2,
        ),
        "distributed": dict(
            toy=["train.steps=4", "train.batch_size=64", "backbone.width=32", "train.log_every=2"],
            digits=[
                "train.steps=4",
                "train.batch_size=8",
                "train.log_every=2",
                "eval.every=2",
                "eval.num_samples=30",
                "eval.batch_size=30",
                "eval.nfe=[1]",
                "backbone.depth=1",
                "backbone.hidden_size=32",
                "backbone.num_heads=2",
            ],
            timeouts=dict(smoke=60, toy=150, digits=200),
        ),
    },
}
