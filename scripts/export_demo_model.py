"""Write the GMM MFM that `python -m mfm_fast demo` steers to outputs/gmm_mfm.pt, the file README's first example
loads (`mfm_fast.load("outputs/gmm_mfm.pt")`). `make demo` runs it after the demo.

The demo caches its model by recipe under $MFM_FAST_CACHE or ~/.cache/mfm_fast (`experiments.common.gmm_mfm`), a
path with a hash in its name; this asks `gmm_mfm` for the same model (a cache hit right after the demo, trained
otherwise) and saves its EMA weights with `mfm_fast.save`.

    python scripts/export_demo_model.py [OUT] [--quick]     # --quick: the model of `demo --quick`
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/export_demo_model.py", description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="outputs/gmm_mfm.pt", help="where to write it (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="the model of `python -m mfm_fast demo --quick`")
    args = p.parse_args(argv)
    from mfm_fast.experiments import common
    from mfm_fast.train import save
    model, info = common.gmm_mfm("cpu", quick=args.quick, progress=False)
    save(model, args.out, source=info)
    print(f"wrote {args.out}: the demo's GMM MFM ({info}); mfm_fast.load({args.out!r}) reads it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
