"""Every GPU figure of the toolkit from one command, within a hard time budget.

    python tools/gpu_check.py --out gpu_check_out [--budget-s 420] [--parts a,b] [--device cuda]
    python tools/gpu_check.py --device cpu --tiny --out /tmp/gc      # the same code paths, tiny sizes

Parts, in this order (cheap and most important first; ``--parts`` selects):

1. ``environment``: GPU, memory, driver / CUDA / torch / cuDNN / NCCL versions, bf16 support, the
   SDPA backends (enabled flags, and which actually run a bf16 and an fp32 call), CPU count.
2. ``numerics``: MeanFlow loss, parameter gradients and du/dt (on the r != t samples) of a small
   randomly initialised class-conditional DiT with fixed (x, y, e, t, r) through ``loss_given``, for
   each attention JVP kernel (fused, explicit, sdpa_math), in fp32 and under bf16 autocast (with
   ``target_fp32`` true and false), against a float64 CPU reference, with pass/fail against
   ``TOLERANCES``. TF32 is switched off for this part. Other JVP objectives (``improved_meanflow``,
   ``scm``, and ``meanflow`` itself as the control) go through ``objective.loss(...)`` with every
   random draw made on the CPU from one seed (``cpu_random``), so device and reference see the same
   noise and times; absent ones are reported as "not present".
3. ``bench``: ``tools/bench.py --json`` rows (DiT-B/2, 4x32x32, bf16, batch 256) for flow matching,
   MeanFlow plain JVP, MeanFlow JVP on r != t only, MeanFlow default and MeanFlow default with its
   JVP under bf16 (``target_fp32=false``): time and memory ratios to flow matching, and the targets
   (MeanFlow step <= 1.2x flow matching, peak memory <= 1.3x). A row that runs out of memory is
   rerun (with flow matching, for its ratios) at half the batch, down to ``min_batch``.
4. ``sampling``: 1-NFE images/s and peak memory of DiT-B/2 and DiT-XL/2 (random weights) through
   ``onestep.sampling.sample`` with the meanflow objective, batch 256, bf16 autocast.
5. ``distributed``: a process-group smoke test (NCCL on GPUs, gloo on the CPU: init, all_reduce,
   all_gather, onestep's broadcast_object) and two ``torchrun -m onestep train`` runs: toy_meanflow
   (300 steps; the run dir must be the last line and the checkpoint must exist) and digits_meanflow
   with periodic eval (200 steps, eval every 100; metrics.jsonl must get rows). Wall times, final
   loss and metric values are recorded. Run dirs are temporary (``--keep-runs`` keeps them).
6. ``bench_compile``: the bench rows again with ``--compile on`` (inductor), in their own part at
   the end, with a longer timeout, rows streamed so a timeout keeps the finished ones.

Every part runs in its own subprocess with its own timeout (``DEFAULT_TIMEOUTS``, ``--timeouts``,
and never past the budget): a hung CUDA call or NCCL init cannot stall the rest. A part's failure
(exit code, timeout, the exception's tail) is recorded and the next part runs; a part that no longer
fits in what is left of ``--budget-s`` (its ``MIN_SECONDS``) is recorded as skipped. After each part
``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (a markdown table per part) are rewritten atomically,
so a kill leaves the finished parts. The markdown is printed at the end. Exit status 0 whatever
the parts did (the JSON says); 2 for bad arguments.

``--tiny`` only changes sizes (tiny DiTs, batch 4, a few steps, a handful of train steps) and the
compile backend (``eager``: dynamo captures the same graphs, but inductor would spend minutes of C++
compilation per graph on a small CPU).
"""
