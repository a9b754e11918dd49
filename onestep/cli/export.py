"""``onestep export``: a run's model as safetensors + config + model card."""

from __future__ import annotations


def run(args) -> int:
    from onestep.formats import export_model

    out = export_model(args.run, args.out, ema=not args.no_ema, force=args.force)
    print(out)
    return 0
